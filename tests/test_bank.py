"""The bank: escrow on deploy, payment on acceptance, refund on cancel; credits conserved and
each slice paid exactly once, whatever the sequence of events. On both store backends (the
property test with fewer examples on PostgreSQL: each needs a database of its own)."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dcp_protocol import Limits, Metrics
from scheduler import StaleLease, Store, UnknownSlice, open_store
from scheduler.store import MICRO, InsufficientFunds, NewJob, ResultRow, Settled

from .conftest import BACKENDS, postgres_server

OWNERS = ["0x" + f"{i:02x}" * 20 for i in (1, 2)]
WORKERS = ["0x" + f"{i:02x}" * 20 for i in (0xA1, 0xA2)]


def job(owner: str, n: int, offer_micro: int, tag: str) -> NewJob:
    return NewJob(
        owner=owner,
        name="t",
        runtime="wasm",
        module=b"\x00asm",
        module_sha256=hashlib.sha256(b"\x00asm").hexdigest(),
        argv=(),
        limits=Limits(),
        offer_micro=offer_micro,
        data=tuple(b"d" for _ in range(n)),
        payload_sha256=hashlib.sha256(tag.encode()).hexdigest(),
        max_attempts=2,
    )


def check_books(store: Store) -> None:
    t = store.totals()
    assert t["minted"] == t["accounts"] + t["escrow"]
    assert t["escrowed"] == t["paid"] + t["refunded"] + t["escrow"]
    paid = [(e.job, e.slice) for e in store.ledger(limit=10**6) if e.kind == "payment"]
    assert len(paid) == len(set(paid)), "a slice was paid twice"
    for record in store.list_jobs():
        done = record.counts.get("done", 0)
        assert sum(1 for j, _ in paid if j == record.id) == (done if record.offer_micro else 0)
        if record.state != "cancelled":
            unpaid = record.total - done
            assert record.escrow_micro == unpaid * record.offer_micro
        else:
            assert record.escrow_micro == 0


def test_deploy_escrows_and_refuses_without_funds(db: str) -> None:
    store = open_store(db)
    store.mint(OWNERS[0], 10 * MICRO, 0.0)
    with pytest.raises(InsufficientFunds) as info:
        store.create_job(job(OWNERS[0], 11, MICRO, "big"), 0.0)
    assert info.value.missing == MICRO
    assert "1.000000 missing" in str(info.value)
    assert store.balance(OWNERS[0]) == 10 * MICRO
    job_id = store.create_job(job(OWNERS[0], 4, 2 * MICRO, "ok"), 0.0)
    assert store.balance(OWNERS[0]) == 2 * MICRO
    assert store.job(job_id).escrow_micro == 8 * MICRO
    (lease,) = store.lease(WORKERS[0], 1, 0.0, 10.0)
    assert lease.offer_micro == 2 * MICRO
    settled = store.accept_result(
        WORKERS[0],
        ResultRow(
            job_id, lease.slice, lease.token, b"r", WORKERS[1], "00" * 65, Metrics(cpu_seconds=2)
        ),
        1.0,
    )
    assert settled == Settled("accepted", 2 * MICRO)
    assert store.balance(WORKERS[1]) == 2 * MICRO  # the payment address, not the identity
    assert store.accept_result(
        WORKERS[0],
        ResultRow(job_id, lease.slice, lease.token, b"r", WORKERS[1], "00" * 65, Metrics()),
        2.0,
    ) == Settled("duplicate", 0)
    assert store.cancel_job(job_id, 3.0) == 3
    assert store.balance(OWNERS[0]) == 8 * MICRO
    assert [e.kind for e in store.ledger()] == ["mint", "escrow", "payment", "refund"]
    (worker,) = [w for w in store.workers() if w.address == WORKERS[0]]
    assert (worker.accepted, worker.earned_micro) == (1, 2 * MICRO)
    check_books(store)
    store.close()


def test_rejected_result_is_not_paid_and_goes_back(db: str) -> None:
    store = open_store(db)
    store.mint(OWNERS[0], MICRO, 0.0)
    job_id = store.create_job(job(OWNERS[0], 1, MICRO, "r"), 0.0)
    (lease,) = store.lease(WORKERS[0], 1, 0.0, 10.0)
    assert (
        store.reject_result(
            job_id, 0, lease.token, WORKERS[0], "result_rejected", "wrong nonce", 1.0
        )
        == "queued"
    )
    assert store.lease(WORKERS[0], 1, 2.0, 10.0) == []  # not back to the worker it fooled
    (again,) = store.lease(WORKERS[1], 1, 2.0, 10.0)
    assert store.accept_result(
        WORKERS[1], ResultRow(job_id, 0, again.token, b"r", WORKERS[1], "00" * 65, Metrics()), 3.0
    ) == Settled("accepted", MICRO)
    (cheat,) = [w for w in store.workers() if w.address == WORKERS[0]]
    assert (cheat.rejected, cheat.earned_micro) == (1, 0)
    assert [(r.worker, r.code) for r in store.refusals(job_id)] == [(WORKERS[0], "result_rejected")]
    check_books(store)
    store.close()


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("mint"), st.integers(0, 1), st.integers(1, 50 * MICRO)),
        st.tuples(
            st.just("deploy"), st.integers(0, 1), st.integers(0, 4), st.integers(0, 3 * MICRO)
        ),
        st.tuples(st.just("lease"), st.integers(0, 1), st.integers(1, 3)),
        st.tuples(st.just("accept"), st.integers(0, 20)),
        st.tuples(st.just("resubmit"), st.integers(0, 20)),
        st.tuples(st.just("reject"), st.integers(0, 20)),
        st.tuples(st.just("fail"), st.integers(0, 20)),
        st.tuples(st.just("expire")),
        st.tuples(st.just("cancel"), st.integers(0, 10)),
        st.tuples(st.just("remove"), st.integers(0, 10)),
        st.tuples(st.just("crash")),
    ),
    max_size=60,
)


@pytest.mark.parametrize("kind", BACKENDS)
def test_credits_are_conserved_and_slices_paid_once(kind: str) -> None:
    examples = 150 if kind == "sqlite" else 50

    @settings(max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(OPS)
    def run(ops: list[tuple]) -> None:  # type: ignore[type-arg]
        with tempfile.TemporaryDirectory() as tmp:
            where = str(Path(tmp) / "s.db")
            if kind == "postgres":
                where = postgres_server().create_database()
            _run_ops(open_store(where), where, ops)

    run()


def _run_ops(store: Store, where: str, ops: list[tuple]) -> None:  # type: ignore[type-arg]
    """The prologue and ``ops`` on ``store`` (at ``where``: a crash reopens it), the books
    checked after each step."""
    leases: list[tuple[str, object]] = []  # (worker, Lease), including superseded ones
    accepted: list[tuple[str, object]] = []
    now = 0.0
    prologue = [
        ("mint", 0, 100 * MICRO),
        ("mint", 1, 100 * MICRO),
        ("deploy", 0, 4, MICRO),
        ("deploy", 1, 3, 2 * MICRO),
        ("lease", 0, 2),
        ("lease", 1, 2),
    ]
    for n, op in enumerate(prologue + ops):
        now += 1.0
        kind = op[0]
        try:
            if kind == "mint":
                store.mint(OWNERS[op[1]], op[2], now)
            elif kind == "deploy":
                try:
                    store.create_job(job(OWNERS[op[1]], op[2], op[3], f"j{n}"), now)
                except InsufficientFunds:
                    pass
            elif kind == "lease":
                worker = WORKERS[op[1]]
                leases += [(worker, lease) for lease in store.lease(worker, op[2], now, 5.0)]
            elif kind in ("accept", "reject", "fail") and leases:
                worker, lease = leases[op[1] % len(leases)]
                if kind == "accept":
                    store.accept_result(
                        worker,
                        ResultRow(
                            lease.job,
                            lease.slice,
                            lease.token,
                            b"r",
                            worker,
                            "00" * 65,
                            Metrics(),
                        ),
                        now,
                    )
                    accepted.append((worker, lease))
                elif kind == "reject":
                    store.reject_result(
                        lease.job,
                        lease.slice,
                        lease.token,
                        worker,  # type: ignore[attr-defined]
                        "result_rejected",
                        "",
                        now,
                    )
                else:
                    store.fail_slice(
                        lease.job,
                        lease.slice,
                        lease.token,
                        worker,  # type: ignore[attr-defined]
                        "wasm_trap",
                        "",
                        now,
                    )
            elif kind == "resubmit" and accepted:
                worker, lease = accepted[op[1] % len(accepted)]
                settled = store.accept_result(
                    worker,
                    ResultRow(
                        lease.job, lease.slice, lease.token, b"r", worker, "00" * 65, Metrics()
                    ),
                    now,
                )
                assert settled == Settled("duplicate", 0)
            elif kind == "expire":
                now += 10.0
                store.expire_leases(now)
            elif kind in ("cancel", "remove"):
                jobs = store.list_jobs()
                if jobs:
                    target = jobs[op[1] % len(jobs)].id
                    if kind == "cancel":
                        store.cancel_job(target, now)
                    else:
                        store.remove_job(target, now)
            elif kind == "crash":
                store.close()
                store = open_store(where)
        except (StaleLease, UnknownSlice):
            pass  # superseded, final or removed: refused, and never paid
        check_books(store)
    t = store.totals()
    event("some slices paid" if t["paid"] else "nothing paid")
    event("some credits refunded" if t["refunded"] else "nothing refunded")
    store.close()
