"""The signal ladder: a second signal (or SIGQUIT) returns everything and exits at once."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from scheduler.client import ComputeClient
from scheduler.sqlite_store import SQLiteStore

from ..conftest import Keystore, SchedulerProcess, WorkerProcess, wait_for
from ..test_pipeline import PUZZLE, counts, job_file


@pytest.mark.parametrize(
    "signals", [(signal.SIGINT, signal.SIGINT), (signal.SIGQUIT,)], ids=["second-sigint", "sigquit"]
)
def test_immediate_stop_returns_everything(
    tmp_path: Path,
    scheduler: SchedulerProcess,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
    signals: tuple[signal.Signals, ...],
) -> None:
    worker = workers(scheduler.url, make_keystore("w"), 2)
    prefixes = [f"slow-{i}" for i in range(8)]
    with ComputeClient(scheduler.url, make_keystore("owner").identity) as client:
        job = client.deploy(
            job_file(tmp_path, "puzzle", PUZZLE, prefixes, ["24"], "memory_bytes = 33554432")
        )
        wait_for(
            lambda: (
                counts(scheduler.db, job).get("leased", 0) >= 2
                and "running slice" in worker.output()
            ),
            30,
        )
        started = time.monotonic()
        for sig in signals:
            worker.proc.send_signal(sig)
            time.sleep(0.1)
        rc = worker.proc.wait(20)
        elapsed = time.monotonic() - started
    assert rc == 5, worker.output()[-2000:]
    assert elapsed < 10
    assert "returned" in worker.output() and "on an immediate stop" in worker.output()
    store = SQLiteStore(scheduler.db)
    slices = store.slices(job)
    store.close()
    # Everything it held went back to the queue at once, uncharged: nothing waits for expiry.
    assert all(s.state == "queued" and s.attempts == 0 for s in slices)
