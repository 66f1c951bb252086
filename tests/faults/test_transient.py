"""A result submission that fails for a moment (the scheduler's database is locked by someone
else) stays in the outbox and is sent again on the same session, then paid exactly once."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from scheduler.client import ComputeClient
from scheduler.store import MICRO
from scheduler.store.sqlite import SQLiteStore

from ..conftest import Keystore, SchedulerProcess, WorkerProcess, wait_for
from ..test_pipeline import PUZZLE, job_file


def test_submission_refused_for_now_is_retried(
    tmp_path: Path,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    scheduler = SchedulerProcess(
        tmp_path / "s.db", "--db-busy-timeout", "0.05", "--lease-timeout", "60"
    )
    owner = make_keystore("owner")
    store = SQLiteStore(scheduler.db)
    store.mint(owner.identity.address, 10 * MICRO, 0.0)
    store.close()
    worker = workers(scheduler.url, make_keystore("w"), 1)
    try:
        with ComputeClient(scheduler.url, owner.identity) as client:
            job = client.deploy(
                job_file(tmp_path, "puzzle", PUZZLE, ["a", "b", "c"], ["21"], offer=0.5)
            )
            wait_for(lambda: "running slice" in worker.output(), 30)
            # An admin holding the write lock: every write of the scheduler fails meanwhile.
            lock = sqlite3.connect(scheduler.db, timeout=10, isolation_level=None)
            lock.execute("BEGIN EXCLUSIVE")
            try:
                wait_for(lambda: "not accepted now (internal)" in worker.output(), 60)
            finally:
                lock.execute("ROLLBACK")
                lock.close()
            results = list(client.results(job, wait=True, timeout=60))
        assert [r.state for r in results] == ["done"] * 3
        # Retried on the same session: one connection, never dropped.
        assert worker.output().count("connected to") == 1
        assert "disconnected from the scheduler" not in worker.output()
    finally:
        assert worker.stop() == 0
        scheduler.stop()
    store = SQLiteStore(scheduler.db)
    try:
        payments = [e.slice for e in store.ledger(limit=1000) if e.kind == "payment"]
        assert sorted(payments) == [0, 1, 2]
        totals = store.totals()
        assert totals["minted"] == totals["accounts"] + totals["escrow"]
    finally:
        store.close()
