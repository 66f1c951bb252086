"""Redundancy end to end: a real scheduler, workers as real websocket sessions (two honest,
one cheating), the owner's view of the votes, the operator's view of a cheater, the blocklist,
and a job's own comparison function (floats within a tolerance) run in the scheduler's
sandbox."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import subprocess
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest

from dcp_keys.identity import Identity
from dcp_protocol import Ack, Fetch, Metrics, Result, Work, signing
from dcp_worker.connection import SessionError, open_session
from scheduler import open_store
from scheduler.client import ComputeClient
from scheduler.jobdoc import job_document
from scheduler.store import MICRO

from .conftest import QUICK, ROOT, Keystore, SchedulerProcess, command

ECHO = (ROOT / "examples" / "echo" / "echo.wasm").read_bytes()
CAPABILITIES = {"runtimes": {"wasm": {}}}


@pytest.fixture
def scheduler(db: str, tmp_path: Path) -> Iterator[SchedulerProcess]:
    """These tests hold on both store backends. On PostgreSQL the store calls run on 4
    threads, so that the votes of one slice are accepted side by side, as by two replicas:
    the races that found (a comparison against votes that changed meanwhile, a deadlock
    between two decisions) failed 1 run in 2 here before their fixes."""
    proc = SchedulerProcess(db, *QUICK, "--db-connections", "4", log=tmp_path / "scheduler.log")
    yield proc
    proc.stop()


def deploy(
    scheduler: SchedulerProcess, owner: Keystore, data: list[bytes], redundancy: dict[str, object]
) -> str:
    store = open_store(str(scheduler.db))
    try:
        store.mint(owner.identity.address, 100 * MICRO, 0.0)
    finally:
        store.close()
    document = job_document(
        name="voted",
        runtime="wasm",
        module=ECHO,
        argv=[],
        offer=1,
        limits={},
        max_attempts=2,
        group="",
        requirements={},
        config={},
        data=data,
        redundancy=redundancy,
    )
    with ComputeClient(scheduler.url, owner.identity) as client:
        return client.deploy_document(json.dumps(document).encode())


async def work(url: str, identity: Identity, answer: Callable[[bytes], bytes], job: str) -> int:
    """A simulated worker: fetch one slice, answer, sign, submit, until no public job is
    active; the results it submitted. One lease at a time: it sends no heartbeats, and a
    result waiting for the scheduler's sandbox keeps only its own lease alive."""
    session = await open_session(url, identity, identity.address)
    submitted = 0
    try:
        while True:
            # A long poll: an empty answer comes once the scheduler has had nothing for it
            # for a second (replicas appear as results disagree), not at once.
            reply = await session.request(
                partial(
                    Fetch,
                    max_slices=1,
                    capabilities=CAPABILITIES,
                    known_jobs=(job,),
                    wait_seconds=1,
                )
            )
            assert isinstance(reply, Work)
            if not reply.slices:
                with ComputeClient(url) as anyone:
                    if not anyone.jobs():  # no active public job left
                        return submitted
                continue
            for lease in reply.slices:
                result = answer(lease.datum)
                payload = signing.result_payload(
                    lease.job, lease.slice, lease.token, result, identity.address
                )
                ack = await session.request(
                    partial(
                        Result,
                        job=lease.job,
                        slice=lease.slice,
                        token=lease.token,
                        result=result,
                        payment_address=identity.address,
                        signature=identity.sign(payload),
                        metrics=Metrics(bytes_in=len(lease.datum), bytes_out=len(result)),
                    )
                )
                assert isinstance(ack, Ack), ack
                submitted += 1
    finally:
        await session.close()


def honest(datum: bytes) -> bytes:
    return hashlib.sha256(datum).hexdigest().encode()


def cheat(datum: bytes) -> bytes:
    return b"garbage " + datum


def admin(scheduler: SchedulerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [command("dcp-scheduler"), *args, "--db", str(scheduler.db)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_cheater_is_outvoted_unpaid_shown_and_can_be_blocked(
    scheduler: SchedulerProcess, make_keystore: Callable[[str], Keystore]
) -> None:
    owner, a, b, liar = (make_keystore(n) for n in ("owner", "a", "b", "liar"))
    data = [f"slice {i}".encode() for i in range(6)]
    job = deploy(scheduler, owner, data, {"quorum": 2, "max_replicas": 4})

    async def run() -> list[int]:
        return list(
            await asyncio.gather(
                work(scheduler.url, liar.identity, cheat, job),
                work(scheduler.url, a.identity, honest, job),
                work(scheduler.url, b.identity, honest, job),
            )
        )

    done = asyncio.run(run())
    assert sum(done) >= 2 * len(data)
    with ComputeClient(scheduler.url, owner.identity) as client:
        results = {r.slice: r.result for r in client.results(job)}
        assert results == {i: honest(d) for i, d in enumerate(data)}
        votes = list(client.votes(job))
        status = client.status(job)
        assert client.account(liar.identity.address)["balance"] == 0
    assert status["redundancy"]["quorum"] == 2 and status["state"] == "finished"
    assert [v["needed"] for v in votes] == [2] * len(data)
    caught = [r for v in votes for r in v["replicas"] if r["worker"] == liar.identity.address]
    if caught:  # the liar got some replicas: each was outvoted, its result kept to inspect
        assert {r["vote"] for r in caught} <= {"disagreed", "forfeit"}
        assert all(r["result_base64"] for r in caught if r["vote"] == "disagreed")
    shown = admin(scheduler, "workers", "show", liar.identity.address, "--json")
    assert shown.returncode == 0, shown.stderr
    record = json.loads(shown.stdout)
    assert record["worker"]["earned"] == 0 and record["worker"]["consecutive_valid"] == 0
    assert record["worker"]["outvoted"] == sum(1 for r in caught if r["vote"] == "disagreed")
    if record["worker"]["outvoted"]:
        assert 0 < record["worker"]["error_rate"] <= 1 and record["payee"]["error_rate"] > 0
    table = admin(scheduler, "jobs", "show", job)
    assert "redundancy: quorum 2, max_replicas 4" in table.stdout
    assert "needed=2 agreed=2" in table.stdout

    blocked = admin(scheduler, "workers", "block", liar.identity.address, "--reason", "garbage")
    assert blocked.returncode == 0, blocked.stderr

    async def refused() -> SessionError:
        with pytest.raises(SessionError) as caught:
            await open_session(scheduler.url, liar.identity, liar.identity.address)
        return caught.value

    error = asyncio.run(refused())
    assert "blocked" in str(error) and "garbage" in str(error)


COMPARE = b"""
def compare(datum, a, b):
    return abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(a)))
"""


def test_the_job_s_comparison_function_decides_which_results_agree(
    scheduler: SchedulerProcess, make_keystore: Callable[[str], Keystore]
) -> None:
    owner, a, b, c = (make_keystore(n) for n in ("owner", "a", "b", "c"))
    data = [b"2", b"3"]
    job = deploy(
        scheduler,
        owner,
        data,
        {
            "quorum": 2,
            "max_replicas": 3,
            "compare": base64.b64encode(COMPARE).decode(),
            "compare_runtime": "python",
        },
    )

    def rounded(last: str) -> Callable[[bytes], bytes]:
        # The same square root, printed with different last digits: equal within 1e-6.
        return lambda datum: (f"{float(datum) ** 0.5:.9f}"[:-1] + last).encode()

    async def run() -> None:
        await asyncio.gather(
            work(scheduler.url, a.identity, rounded("1"), job),
            work(scheduler.url, b.identity, rounded("7"), job),
            work(scheduler.url, c.identity, lambda d: b"42", job),
        )

    asyncio.run(run())
    with ComputeClient(scheduler.url, owner.identity) as client:
        results = {r.slice: r.result for r in client.results(job)}
    for i, d in enumerate(data):
        got = results[i]
        assert got is not None and abs(float(got) - float(d) ** 0.5) < 1e-6
