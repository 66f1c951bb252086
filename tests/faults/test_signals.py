"""The signal ladder: a second signal (or SIGQUIT) returns everything and exits at once."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from scheduler.client import ComputeClient
from scheduler.store.backends import open_store

from ..conftest import Keystore, SchedulerProcess, WorkerProcess, wait_for, wait_until
from ..test_pipeline import PUZZLE, counts, job_file


@pytest.fixture
def scheduler(scheduler_on_every_backend: SchedulerProcess) -> SchedulerProcess:
    """The fault suite runs on both backends (tests/conftest.py)."""
    return scheduler_on_every_backend


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
        for i, sig in enumerate(signals):
            # Two SIGINTs pending at once are one signal: send the next once this one is seen.
            seen = worker.output().count("stopping")
            worker.proc.send_signal(sig)
            if i + 1 < len(signals):
                wait_for(lambda seen=seen: worker.output().count("stopping") > seen, 10)
        rc = worker.proc.wait(20)
        elapsed = time.monotonic() - started
    assert rc == 5, worker.output()[-2000:]
    assert elapsed < 10
    assert "returned" in worker.output() and "on an immediate stop" in worker.output()
    store = open_store(str(scheduler.db))
    slices = store.slices(job)
    store.close()
    # Everything it held went back to the queue at once, uncharged: nothing waits for expiry.
    assert all(s.state == "queued" and s.attempts == 0 for s in slices)


def test_scheduler_stops_cleanly_with_workers_connected(
    tmp_path: Path,
    db: str,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    scheduler = SchedulerProcess(db, log=tmp_path / "scheduler.log")
    worker = workers(scheduler.url, make_keystore("w"), 1)
    wait_for(lambda: "connected to" in worker.output(), 30)
    started = time.monotonic()
    scheduler.proc.send_signal(signal.SIGTERM)
    assert scheduler.proc.wait(20) == 0
    assert time.monotonic() - started < 10
    scheduler.stop()
    wait_for(lambda: "reconnecting" in worker.output(), 20)  # told to go; it will come back
    assert worker.stop() == 0


def test_manager_sigterm_stops_its_evaluators(tmp_path: Path) -> None:
    import socket
    import subprocess

    import psutil

    from ..conftest import command

    status = tmp_path / "m.json"
    manager = subprocess.Popen(
        [
            command("dcp-evaluator-manager"),
            "serve",
            "--socket",
            str(tmp_path / "m.sock"),
            "--max-load",
            "1000",
            "--tty-idle",
            "0",
            "--run-on-battery",
            "--status-file",
            str(status),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert manager.stdout is not None
    address = manager.stdout.readline().split()[3].rstrip(";,")
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(address)
        wait_for(lambda: psutil.Process(manager.pid).children(), 20)
        (evaluator,) = psutil.Process(manager.pid).children()
        manager.send_signal(signal.SIGTERM)
        assert manager.wait(20) == 0
    assert not evaluator.is_running() or evaluator.status() == psutil.STATUS_ZOMBIE
    manager.stdout.close()


def test_a_stop_while_the_evaluator_starts_is_prompt(tmp_path: Path) -> None:
    """An evaluator that never answers `describe` (here: a process that only sleeps) does not
    hold a graceful stop for describe's 30 s."""
    import asyncio

    import psutil

    from dcp_keys.identity import Identity
    from dcp_worker.config import load_config
    from dcp_worker.supervisor import Supervisor

    config = load_config(None, {"state_dir": str(tmp_path), "sandboxes": 1})
    supervisor = Supervisor(
        config, Identity.from_private_key(b"\x02" * 32), evaluator_command=["sleep", "60"]
    )

    def starting() -> bool:  # the "evaluator" (sleep 60) runs, and describe waits on it
        return any(c.name() == "sleep" for c in psutil.Process().children())

    async def go() -> tuple[bool, float]:
        task = asyncio.create_task(supervisor.run())
        await wait_until(starting, 20)
        started = time.monotonic()
        supervisor.stop()
        clean = await asyncio.wait_for(task, 20)
        return clean, time.monotonic() - started

    clean, elapsed = asyncio.run(go())
    assert clean and elapsed < 5
