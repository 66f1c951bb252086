"""Several scheduler URLs: the worker's rotation over them, a worker and an owner that skip a
dead replica, and a worker that moves to a second scheduler on the same database when the
first dies, losing no slice and paid once for each (docs/protocol.md "Several schedulers")."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dcp_worker.rotation import SchedulerRotation
from scheduler.client import ComputeClient, ComputeError, http_base
from scheduler.local import LocalScheduler
from scheduler.store import MICRO
from scheduler.store.backends import open_store
from scheduler.store.sqlite import SQLiteStore

from .conftest import Keystore, SchedulerProcess, WorkerProcess, command, wait_for
from .test_pipeline import ECHO, job_file

SPIN = Path(__file__).parent / "wasm" / "spin.c"
A, B, C = "http://a:1", "http://b:2", "http://c:3"


def _dead_url() -> str:
    """A loopback URL nothing listens on: a port bound, then closed (connecting is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# ------------------------------------------------------------------ the rotation, pure


def test_one_url_backs_off_after_every_failure_as_before() -> None:
    rotation = SchedulerRotation([A])
    assert [rotation.failed() for _ in range(3)] == [True, True, True]
    assert rotation.current == A
    rotation.connected()
    rotation.lost()  # a lost session is retried at once...
    assert rotation.current == A
    assert rotation.failed() is True  # ...and a refusal after it backs off


def test_a_dead_replica_costs_one_immediate_retry_a_dead_round_a_backoff() -> None:
    rotation = SchedulerRotation([A, B, C])
    tried = []
    backoffs = []
    for _ in range(6):
        tried.append(rotation.current)
        backoffs.append(rotation.failed())
    assert tried == [A, B, C, A, B, C]
    assert backoffs == [False, False, True, False, False, True]


def test_a_session_resets_the_round_and_its_loss_moves_on() -> None:
    rotation = SchedulerRotation([A, B, C])
    assert rotation.failed() is False  # A refused
    rotation.connected()  # B took us
    assert rotation.current == B
    rotation.lost()  # B dropped us: C at once; B counts as the round's first failure
    assert rotation.current == C
    assert rotation.failed() is False  # C refused: A at once
    assert rotation.current == A
    assert rotation.failed() is True  # A refused too: every one failed since B's session
    assert rotation.current == B
    rotation.connected()
    assert [rotation.failed() for _ in range(3)] == [False, False, True]  # a fresh round


def test_two_urls_alternate_with_a_backoff_per_pair() -> None:
    rotation = SchedulerRotation([A, B])
    steps = []
    for _ in range(4):
        steps.append((rotation.current, rotation.failed()))
    assert steps == [(A, False), (B, True), (A, False), (B, True)]


def test_a_rotation_needs_a_url() -> None:
    with pytest.raises(ValueError, match="at least one scheduler URL"):
        SchedulerRotation([])


# ------------------------------------------------------------------ a dead first replica


def test_a_worker_skips_a_dead_first_url_without_backing_off(
    tmp_path: Path,
    scheduler: SchedulerProcess,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    dead = _dead_url()
    worker = workers(dead, make_keystore("worker"), 1, "--scheduler", scheduler.url)
    values = [f"datum-{i}" for i in range(20)]
    with ComputeClient(scheduler.url, make_keystore("owner").identity) as client:
        job = client.deploy(job_file(tmp_path, "echo", ECHO, values))
        results = list(client.results(job, wait=True, timeout=30))
    assert [r.result for r in results] == [v.encode() for v in values]
    out = worker.output()
    assert f"trying {scheduler.url} next" in out
    assert f"connected to {scheduler.url}" in out
    # One round had a live replica in it: nothing waited for a backoff.
    assert "retrying in" not in out.split(f"connected to {scheduler.url}")[0]
    assert worker.stop() == 0


def test_an_owner_skips_a_dead_first_url(
    tmp_path: Path, scheduler: SchedulerProcess, make_keystore: Callable[[str], Keystore]
) -> None:
    owner = make_keystore("owner")
    dead = _dead_url()
    with ComputeClient([dead, scheduler.url], owner.identity) as client:
        job = client.deploy(job_file(tmp_path, "echo", ECHO, ["x"]))
        assert client.base == http_base(scheduler.url)  # the one that answered is kept
        assert client.status(job)["job"] == job
    # The command line: the option repeated, and the variable's list.
    argv = [command("dcp-compute"), "--scheduler", dead, "--scheduler", scheduler.url]
    keys = ("--identity", str(owner.path), "--passphrase-file", str(owner.passphrase_file))
    out = subprocess.run(
        [*argv, "deploy", str(job_file(tmp_path, "echo2", ECHO, ["y"])), *keys],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.strip()) == 32
    out = subprocess.run(
        [command("dcp-compute"), "account", owner.identity.address],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "DCP_SCHEDULER": f"{dead} {scheduler.url}"},
    )
    assert out.returncode == 0, out.stderr
    other = _dead_url()
    out = subprocess.run(
        [
            command("dcp-compute"),
            "--scheduler",
            f"{dead},{other}",
            "--connect-wait",
            "0.3",
            "account",
            "--identity",
            keys[1],
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert "cannot reach any scheduler" in out.stderr
    assert dead in out.stderr and other in out.stderr
    assert "trying again for up to 0.3 s" in out.stderr  # it waited, and said so once
    assert out.stderr.count("trying again") == 1


def test_an_owner_waits_for_a_scheduler_that_is_starting(
    tmp_path: Path, make_keystore: Callable[[str], Keystore]
) -> None:
    """The README starts `serve &` and deploys at once: a deploy that finds the port not yet
    listening tries again (--connect-wait) instead of failing; with 0 it fails at once."""
    owner = make_keystore("owner")
    url = _dead_url()
    with ComputeClient(url, owner.identity) as client, pytest.raises(ComputeError) as refused:
        client.account()  # the library's default: no wait
    assert "cannot reach the scheduler" in str(refused.value)
    refusals = threading.Event()
    answers: list[object] = []

    def ask() -> None:
        with ComputeClient(
            url, owner.identity, connect_wait=300, notice=lambda _: refusals.set()
        ) as client:
            answers.append(client.account())

    asking = threading.Thread(target=ask)
    asking.start()
    try:
        assert refusals.wait(60), "the client never found the port refusing"
        scheduler = SchedulerProcess(tmp_path / "late.db", listen=url.removeprefix("http://"))
        try:
            asking.join(120)
            assert answers and answers[0]["balance"] == 0  # type: ignore[index]
        finally:
            scheduler.stop()
    finally:
        asking.join(300)


def test_an_answer_is_not_resent_to_another_replica(
    tmp_path: Path, scheduler: SchedulerProcess, make_keystore: Callable[[str], Keystore]
) -> None:
    """The first replica refuses a paid deploy (no credits in its database); a second, whose
    database has them, would accept it, so only a client that resent the answered request
    would deploy."""
    owner = make_keystore("owner")
    rich = tmp_path / "rich.db"
    store = SQLiteStore(rich)
    try:
        store.mint(owner.identity.address, 100 * MICRO, time.time())
    finally:
        store.close()
    with (
        LocalScheduler(rich) as other,
        ComputeClient([scheduler.url, other.url], owner.identity) as client,
    ):
        assert client.account()["balance"] == 0  # the first answers, and stays first
        with pytest.raises(ComputeError) as refused:
            client.deploy(job_file(tmp_path, "paid", ECHO, ["x"], offer=1))
        assert refused.value.code == "insufficient_funds"
        assert client.base == http_base(scheduler.url)
    with LocalScheduler(rich) as other, ComputeClient(other.url, owner.identity) as client:
        assert client.jobs() == []  # nothing was deployed there


# ------------------------------------------------------------------ a replica that dies


def test_a_worker_moves_to_a_second_scheduler_on_the_same_database(
    tmp_path: Path,
    db: str,
    zig_build: Callable[[Path], bytes],
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    """Two replicas on one database (PostgreSQL; or one SQLite file, which in WAL mode both
    may write). The first dies with slices leased, running and finished; the worker goes on
    at the second, which takes heartbeats of the first's leases and their results."""
    args = ("--lease-timeout", "5", "--heartbeat-interval", "0.5")
    first = LocalScheduler(db, *args, log=tmp_path / "first.log")
    second = LocalScheduler(db, *args, log=tmp_path / "second.log")
    owner = make_keystore("owner")
    store = open_store(db)
    store.mint(owner.identity.address, 100 * MICRO, time.time())
    spin = tmp_path / "spin.wasm"
    spin.write_bytes(zig_build(SPIN))
    worker = workers(first.url, make_keystore("worker"), 2, "--scheduler", second.url)
    values = ["700"] * 8
    try:
        with ComputeClient([first.url, second.url], owner.identity) as client:
            job = client.deploy(
                job_file(tmp_path, "spin", spin, values, limits="wall_seconds = 30", offer=1)
            )
            wait_for(lambda: f"connected to {first.url}" in worker.output(), 30)
            # Killed once a result was accepted there and slices still run: some of the job
            # is done at the first, the rest held under its leases.
            wait_for(lambda: store.job(job).counts.get("done", 0) >= 1, 30)
            first.proc.kill()
            first.stop()
            results = list(client.results(job, wait=True, timeout=60))
            assert client.base == http_base(second.url)
        out = worker.output()
        assert f"connected to {second.url}" in out
        assert [r.result for r in results] == [b"done\n"] * len(values)
        counts = store.job(job).counts
        assert counts.get("done") == len(values), counts
        payments = [e for e in store.ledger() if e.kind == "payment" and e.job == job]
        assert sorted(e.slice for e in payments) == list(range(len(values)))  # once each
        assert all(e.amount_micro == MICRO for e in payments)
        totals = store.totals()
        assert totals["minted"] == totals["accounts"] + totals["escrow"]
        assert "stale_lease" not in out
        assert worker.stop() == 0
    finally:
        store.close()
        first.stop()
        second.stop()
