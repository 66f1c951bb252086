"""The store's contract: atomic fenced leases, bounded attempts, exactly-once acceptance.

Runs against every backend (tests/conftest.py's ``db``: SQLite and PostgreSQL)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from dcp_protocol import LeaseRef, Limits, Metrics
from scheduler import NewJob, SQLiteStore, StaleLease, Store, UnknownJob, UnknownSlice, open_store
from scheduler.store import ResultRow, Settled

W1 = "0x" + "11" * 20
W2 = "0x" + "22" * 20
PAY = "0x" + "33" * 20


@pytest.fixture
def store(db: str) -> Iterator[Store]:
    s = open_store(db)
    yield s
    s.close()


def new_job(n: int = 3, attempts: int = 2, tag: str = "a", offer: int = 0) -> NewJob:
    return NewJob(
        owner=W1,
        name="t",
        runtime="wasm",
        module=b"\x00asm",
        module_sha256=hashlib.sha256(b"\x00asm").hexdigest(),
        argv=("1",),
        limits=Limits(),
        offer_micro=offer,
        data=tuple(f"d{i}".encode() for i in range(n)),
        payload_sha256=hashlib.sha256(tag.encode()).hexdigest(),
        max_attempts=attempts,
    )


def accept(store: Store, lease_job: str, idx: int, token: str, worker: str = W1) -> str:
    settled = store.accept_result(
        worker, ResultRow(lease_job, idx, token, b"r", PAY, "00" * 65, Metrics()), 1.0
    )
    return settled.status


def test_lease_is_fifo_and_disjoint(store: Store) -> None:
    job = store.create_job(new_job(5), 0.0)
    first = store.lease(W1, 3, 0.0, 10.0)
    second = store.lease(W2, 3, 0.0, 10.0)
    assert [lease.slice for lease in first] == [0, 1, 2]
    assert [lease.slice for lease in second] == [3, 4]
    assert all(
        (lease.job, lease.attempt, lease.deadline) == (job, 1, 10.0) for lease in first + second
    )
    assert len({lease.token for lease in first + second}) == 5
    assert first[0].datum == b"d0"
    assert store.lease(W1, 3, 0.0, 10.0) == []


def test_replayed_deploy_is_the_same_job(store: Store) -> None:
    assert store.create_job(new_job(), 0.0) == store.create_job(new_job(), 1.0)
    assert len(store.list_jobs()) == 1


def test_accept_once_then_duplicate(store: Store) -> None:
    job = store.create_job(new_job(1), 0.0)
    (lease,) = store.lease(W1, 1, 0.0, 10.0)
    assert accept(store, job, 0, lease.token) == "accepted"
    assert accept(store, job, 0, lease.token) == "duplicate"
    record = store.job(job)
    assert record.state == "finished" and record.counts == {"done": 1}


def test_a_batch_of_results_is_one_transaction_with_outcomes_of_its_own(store: Store) -> None:
    job = store.create_job(new_job(4), 0.0)
    leases = store.lease(W1, 4, 0.0, 10.0)
    assert accept(store, job, 0, leases[0].token) == "accepted"

    def row(idx: int, token: str) -> ResultRow:
        return ResultRow(job, idx, token, b"r%d" % idx, PAY, "00" * 65, Metrics())

    outcomes = store.accept_results(
        W1,
        [
            row(0, leases[0].token),  # already accepted: duplicate
            row(1, "not-the-token"),  # fenced: its own StaleLease, nothing of it happens
            row(2, leases[2].token),
            row(3, leases[3].token),
        ],
        1.0,
    )
    assert outcomes[0] == Settled("duplicate", 0)
    assert isinstance(outcomes[1], StaleLease)
    assert outcomes[2].status == "accepted" and outcomes[3].status == "accepted"  # type: ignore[union-attr]
    record = store.job(job)
    assert record.state == "active" and record.counts == {"done": 3, "leased": 1}
    (last,) = store.accept_results(W1, [row(1, leases[1].token)], 2.0)
    assert last == Settled("accepted")
    record = store.job(job)
    assert record.state == "finished" and record.counts == {"done": 4}


def test_wrong_token_or_worker_is_fenced(store: Store) -> None:
    job = store.create_job(new_job(1), 0.0)
    (lease,) = store.lease(W1, 1, 0.0, 10.0)
    with pytest.raises(StaleLease):
        accept(store, job, 0, "forged")
    with pytest.raises(StaleLease):
        accept(store, job, 0, lease.token, worker=W2)
    with pytest.raises(UnknownSlice):
        accept(store, job, 7, lease.token)


def test_superseded_lease_is_rejected_and_never_paid_twice(store: Store) -> None:
    job = store.create_job(new_job(1), 0.0)
    (old,) = store.lease(W1, 1, 0.0, 1.0)
    assert store.expire_leases(2.0) == 1
    (new,) = store.lease(W2, 1, 2.0, 10.0)
    assert new.attempt == 2 and new.token != old.token
    with pytest.raises(StaleLease):
        accept(store, job, 0, old.token)
    assert accept(store, job, 0, new.token, worker=W2) == "accepted"
    with pytest.raises(StaleLease):
        accept(store, job, 0, old.token)


def test_late_result_under_last_token_is_accepted(store: Store) -> None:
    """Expired but not yet re-leased: the work is good, nobody else holds the slice."""
    job = store.create_job(new_job(1), 0.0)
    (lease,) = store.lease(W1, 1, 0.0, 1.0)
    store.expire_leases(2.0)
    assert accept(store, job, 0, lease.token) == "accepted"
    assert store.lease(W2, 1, 3.0, 10.0) == []


def test_heartbeat_extends_and_reports_lost(store: Store) -> None:
    job = store.create_job(new_job(2), 0.0)
    a, b = store.lease(W1, 2, 0.0, 5.0)
    lost = store.heartbeat(
        W1, [LeaseRef(job, 0, a.token, 0.5), LeaseRef(job, 1, "bogus")], 4.0, 5.0
    )
    assert lost == [LeaseRef(job, 1, "bogus")]
    assert store.expire_leases(6.0) == 1  # slice 1 expired; slice 0 lives until 9.0
    assert [(s.state, s.progress) for s in store.slices(job)] == [("leased", 0.5), ("queued", None)]


def test_leases_held_across_a_restart_get_one_more_lease_timeout(store: Store) -> None:
    job = store.create_job(new_job(2), 0.0)
    a, _b = store.lease(W1, 2, 0.0, 5.0)
    # The scheduler comes back at 20.0 (its leases' deadlines long past) with 15 s leases.
    assert store.extend_leases(35.0, 20.0) == 2
    assert store.extend_leases(30.0, 20.0) == 0  # never shortened
    assert store.expire_leases(21.0) == 0
    assert accept(store, job, 0, a.token) == "accepted"  # the worker came back and delivered
    assert store.expire_leases(36.0) == 1  # the other worker never did


def test_attempts_are_bounded_then_reset(store: Store) -> None:
    job = store.create_job(new_job(1, attempts=2), 0.0)
    for now in (0.0, 10.0):
        (lease,) = store.lease(W1, 1, now, 1.0)
        state = store.fail_slice(job, 0, lease.token, W1, "wasm_trap", "boom", now)
    assert state == "failed"
    (s,) = store.slices(job)
    assert (s.state, s.attempts, s.error_code, s.error) == ("failed", 2, "wasm_trap", "boom")
    assert store.job(job).state == "finished"
    assert store.lease(W1, 1, 20.0, 1.0) == []
    assert store.reset_job(job) == 1
    assert store.job(job).state == "active"
    (again,) = store.lease(W1, 1, 30.0, 1.0)
    assert again.attempt == 1


def test_expiry_counts_as_an_attempt(store: Store) -> None:
    job = store.create_job(new_job(1, attempts=1), 0.0)
    store.lease(W1, 1, 0.0, 1.0)
    store.expire_leases(5.0)
    (s,) = store.slices(job)
    assert (s.state, s.error_code) == ("failed", "lease_expired")


def test_return_refunds_the_attempt(store: Store) -> None:
    job = store.create_job(new_job(1, attempts=1), 0.0)
    (lease,) = store.lease(W1, 1, 0.0, 10.0)
    assert store.return_slices(W2, [LeaseRef(job, 0, lease.token)]) == 0  # not W2's lease
    assert store.return_slices(W1, [LeaseRef(job, 0, lease.token)]) == 1
    (again,) = store.lease(W1, 1, 1.0, 10.0)
    assert again.attempt == 1


def test_cancel_and_remove(store: Store) -> None:
    job = store.create_job(new_job(3), 0.0)
    (lease,) = store.lease(W1, 1, 0.0, 10.0)
    assert store.cancel_job(job, 1.0) == 3
    with pytest.raises(StaleLease):
        accept(store, job, 0, lease.token)
    assert store.lease(W1, 3, 1.0, 10.0) == []
    assert store.job(job).state == "cancelled"
    store.remove_job(job)
    with pytest.raises(UnknownJob):
        store.job(job)
    with pytest.raises(UnknownJob):
        store.remove_job(job)


def test_fail_requires_the_current_lease(store: Store) -> None:
    job = store.create_job(new_job(1), 0.0)
    store.lease(W1, 1, 0.0, 10.0)
    with pytest.raises(StaleLease):
        store.fail_slice(job, 0, "forged", W1, "wasm_trap", "", 1.0)


def test_state_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    s = SQLiteStore(path)
    job = s.create_job(new_job(2), 0.0)
    (lease,) = s.lease(W1, 1, 0.0, 10.0)
    s.close()
    s = SQLiteStore(path)
    assert accept(s, job, 0, lease.token) == "accepted"
    assert s.job(job).counts == {"done": 1, "queued": 1}
    s.close()


def test_final_prefix_stops_at_the_first_unfinished_slice(store: Store) -> None:
    job = store.create_job(new_job(4), 0.0)
    leases = store.lease(W1, 4, 0.0, 10.0)
    for lease in (leases[0], leases[1], leases[3]):
        accept(store, job, lease.slice, lease.token)
    assert [s.slice for s in store.slices(job, final_prefix=True)] == [0, 1]
    assert [s.slice for s in store.slices(job, after=1, final_prefix=True)] == []
    assert [s.slice for s in store.slices(job)] == [0, 1, 2, 3]


def test_a_page_of_slices_stops_after_the_result_that_passes_its_bytes(store: Store) -> None:
    """Results of 1 MiB read 5,000 at a time were 5 GiB of one reply: a page stops once its
    results pass ``max_bytes`` (the one that passes it included, so a page is never empty)."""
    job = store.create_job(new_job(4), 0.0)
    for lease in store.lease(W1, 4, 0.0, 10.0):
        row = ResultRow(job, lease.slice, lease.token, b"x" * 100, PAY, "00" * 65, Metrics())
        assert store.accept_result(W1, row, 1.0).status == "accepted"
    assert [s.slice for s in store.slices(job, max_bytes=250)] == [0, 1, 2]
    assert [s.slice for s in store.slices(job, max_bytes=1)] == [0]
    assert [s.slice for s in store.slices(job, after=2, max_bytes=1)] == [3]
    assert [s.slice for s in store.slices(job, max_bytes=400)] == [0, 1, 2, 3]


def test_finished_jobs_are_collected_after_their_lifetime(store: Store) -> None:
    done = store.create_job(new_job(1, tag="done"), 0.0)
    (lease,) = store.lease(W1, 1, 0.0, 10.0)
    accept(store, done, 0, lease.token)  # finished at 1.0
    cancelled = store.create_job(new_job(2, tag="cancelled"), 0.0)
    store.cancel_job(cancelled, 5.0)
    active = store.create_job(new_job(2, tag="active"), 0.0)
    assert store.collect_garbage(100.0, 200.0) == []
    assert sorted(store.collect_garbage(300.0, 200.0)) == sorted([done, cancelled])
    assert [j.id for j in store.list_jobs()] == [active]


def test_a_nonce_is_spent_once_and_forgotten_after_it_is_kept(store: Store) -> None:
    assert store.use_nonce(W1, "ab" * 16, now=1000.0, keep_until=1360.0)
    assert not store.use_nonce(W1, "ab" * 16, now=1001.0, keep_until=1361.0)
    assert not store.use_nonce(W1.upper().replace("0X", "0x"), "ab" * 16, 1359.0, 1719.0)
    assert store.use_nonce(W2, "ab" * 16, now=1001.0, keep_until=1361.0)  # per signer
    # Past keep_until the row is collected: the scheduler's window refuses the request by
    # its timestamp by then, so forgetting the nonce lets nothing through.
    assert store.use_nonce(W1, "cd" * 16, now=1400.0, keep_until=1760.0)
    assert store.use_nonce(W1, "ab" * 16, now=1400.0, keep_until=1760.0)


def test_read_tokens_are_stored_by_hash_revocable_and_go_with_their_job(store: Store) -> None:
    job = store.create_job(new_job(), 1.0)
    other = store.create_job(new_job(tag="b"), 1.0)
    record = store.create_read_token(job, "h1", now=10.0, expires=20.0)
    assert store.read_token("h1") == record and record.job == job and record.revoked is None
    assert store.read_token("h2") is None
    with pytest.raises(UnknownJob):
        store.create_read_token("f" * 32, "h3", 10.0, 20.0)
    assert not store.revoke_read_token(other, record.id, 11.0)  # not that job's token
    assert store.revoke_read_token(job, record.id, 12.0)
    assert store.revoke_read_token(job, record.id, 13.0)  # again: still revoked at 12
    assert store.read_token("h1") == replace(record, revoked=12.0)
    store.create_read_token(job, "h4", 10.0, 20.0)
    store.remove_job(job)
    assert store.read_token("h4") is None and store.read_token("h1") is None


def test_a_worker_holds_at_most_max_held_leases_and_gets_more_as_it_returns_them(
    store: Store,
) -> None:
    """BOINC's "max tasks in progress": a worker asking for everything held every queued
    slice until its leases expired (100,000 in one benchmark run), starving the others."""
    job = store.create_job(new_job(10), 0.0)
    first = store.lease(W1, 64, 0.0, 10.0, max_held=4)
    assert [lease.slice for lease in first] == [0, 1, 2, 3]
    assert store.lease(W1, 64, 0.0, 10.0, max_held=4) == []  # it holds 4
    assert [lease.slice for lease in store.lease(W2, 2, 0.0, 10.0, max_held=4)] == [4, 5]
    assert accept(store, job, 0, first[0].token) == "accepted"
    assert [lease.slice for lease in store.lease(W1, 64, 0.0, 10.0, max_held=4)] == [6]


def test_has_queued_says_whether_any_slice_waits(store: Store) -> None:
    assert not store.has_queued()
    job = store.create_job(new_job(2), 0.0)
    assert store.has_queued()
    leases = store.lease(W1, 2, 0.0, 10.0)
    assert not store.has_queued()
    store.return_slices(W1, [LeaseRef(job, leases[0].slice, leases[0].token)])
    assert store.has_queued()


def test_the_leases_of_a_batch_are_read_at_once_each_fenced_on_its_own(store: Store) -> None:
    job = store.create_job(new_job(4), 0.0)
    other = store.create_job(new_job(1, tag="b"), 0.0)
    leases = store.lease(W1, 5, 0.0, 10.0)
    mine = {(lease.job, lease.slice): lease.token for lease in leases}
    assert accept(store, job, 2, mine[(job, 2)]) == "accepted"
    refs = [
        LeaseRef(job, 3, mine[(job, 3)]),
        LeaseRef(job, 0, "f" * 32),  # not the current lease
        LeaseRef(other, 0, mine[(other, 0)]),
        LeaseRef(job, 2, mine[(job, 2)]),  # accepted before: done, a duplicate to come
        LeaseRef(job, 9, "e" * 32),  # no such slice
        LeaseRef(job, 1, mine[(job, 1)]),
    ]
    found = store.result_leases(W1, refs)
    assert [getattr(f, "state", type(f).__name__) for f in found] == [
        "leased", "StaleLease", "leased", "done", "UnknownSlice", "leased",
    ]  # fmt: skip
    assert [(f.job, f.slice, f.datum_bytes) for f in found if not isinstance(f, Exception)] == [
        (job, 3, 2), (other, 0, 2), (job, 2, 2), (job, 1, 2),
    ]  # fmt: skip
    assert all(isinstance(f, StaleLease) for f in store.result_leases(W2, refs[:1]))
    assert store.result_leases(W1, []) == []


def test_one_result_twice_in_a_batch_is_paid_once_across_jobs_and_unknown_slices(
    store: Store,
) -> None:
    store.mint(W1, 100, 0.0)
    job = store.create_job(new_job(2, offer=7), 0.0)
    other = store.create_job(new_job(1, tag="b", offer=5), 0.0)
    token = {(lease.job, lease.slice): lease.token for lease in store.lease(W2, 3, 0.0, 10.0)}

    def row(job_id: str, idx: int) -> ResultRow:
        lease = token.get((job_id, idx), "e" * 32)
        return ResultRow(job_id, idx, lease, b"r", PAY, "00" * 65, Metrics())

    outcomes = store.accept_results(
        W2, [row(other, 0), row(job, 1), row(job, 5), row(job, 1), row(job, 0)], 1.0
    )
    assert outcomes[0] == Settled("accepted", 5) and outcomes[4] == Settled("accepted", 7)
    assert outcomes[1] == Settled("accepted", 7) and outcomes[3] == Settled("duplicate", 0)
    assert isinstance(outcomes[2], UnknownSlice)
    assert store.balance(PAY) == 19 and store.balance(W1) == 100 - 19
    assert store.job(job).state == "finished" and store.job(other).state == "finished"
    totals = store.totals()  # the books balance
    assert totals["minted"] == 100 == totals["accounts"] + totals["escrow"]
    assert totals["paid"] == 19
