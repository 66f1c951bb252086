"""A worker behind a manager that holds work: it waits, shows why, leases nothing meanwhile
and works once the manager lets it (a real manager, scheduler and worker)."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from scheduler.client import ComputeClient
from scheduler.store.sqlite import SQLiteStore

from .conftest import Keystore, SchedulerProcess, WorkerProcess, command, wait_for
from .test_manager import ManagerProcess, managers  # noqa: F401  (the fixture)
from .test_pipeline import PUZZLE, job_file


def _snapshot(state_dir: Path) -> dict:  # type: ignore[type-arg]
    out = subprocess.run(
        [command("dcp-worker"), "status", "--json", "--socket", str(state_dir / "control.sock")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return json.loads(out.stdout) if out.returncode == 0 else {}  # type: ignore[no-any-return]


def _held(state_dir: Path, reason: str) -> Callable[[], bool]:
    def check() -> bool:
        snap = _snapshot(state_dir)
        return (
            bool(snap) and snap["state"] == "held" and reason in snap["statistics"]["held_reason"]
        )

    return check


def test_a_held_manager_makes_the_worker_wait_not_refuse(
    tmp_path: Path,
    managers: Callable[..., ManagerProcess],  # noqa: F811
    scheduler: SchedulerProcess,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    loadavg = tmp_path / "loadavg"
    loadavg.write_text("7.50 3.00 1.00 2/300 12345\n")  # the machine is busy
    path = tmp_path / "m.sock"
    manager = managers(
        "--no-tcp",
        "--socket",
        str(path),
        "--max-load",
        "2",
        "--poll",
        "0.1",
        "--loadavg-file",
        str(loadavg),
        "--tty-idle",
        "0",
        "--ignore-screensaver",
    )
    state = tmp_path / "worker-state"
    with ComputeClient(scheduler.url, make_keystore("owner").identity) as client:
        first = client.deploy(job_file(tmp_path, "first", PUZZLE, ["a", "b", "c"], ["12"]))
        worker = workers(
            scheduler.url,
            make_keystore("w"),
            2,
            "--evaluator",
            str(path),
            "--busy-retry-seconds",
            "0.2",  # ask the held manager again soon: the test waits for its answers
        )
        # 1. Held from the start: the worker waits (it used to exit 6, "describe got error"),
        # says why, and asks the manager again; nothing is leased meanwhile.
        wait_for(_held(state, "load_high"), 30)
        wait_for(lambda: manager.status()["refused"] >= 2, 30)  # it asked again
        assert worker.proc.poll() is None, worker.output()
        assert client.status(first)["counts"] == {"queued": 3}
        log = worker.output()
        assert log.count("work held by the evaluator manager") == 1, log
        assert "load_high" in log and "refusing slice" not in log
        # 2. Released: the work runs.
        loadavg.write_text("0.10 0.10 0.10 1/300 12345\n")
        results = list(client.results(first, wait=True, timeout=60))
        assert [r.state for r in results] == ["done"] * 3
        assert "work resumes" in worker.output()
        assert _snapshot(state)["statistics"]["held_reason"] == ""
        # 3. Held while working (an operator hold stops evaluators): the slices leased when
        # it begins go back once, then nothing is fetched until the manager lets go.
        manager.proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: not manager.status()["accepting"], 10)
        second = client.deploy(job_file(tmp_path, "second", PUZZLE, ["d", "e"], ["12"]))
        wait_for(_held(state, "operator"), 30)
        refused = manager.status()["refused"]
        wait_for(lambda: manager.status()["refused"] >= refused + 1, 30)  # it asks again
        returned = worker.output().count("refusing slice")
        assert returned <= 2, worker.output()  # at most the two slices leased at the start
        assert client.status(second)["counts"] == {"queued": 2}
        manager.proc.send_signal(signal.SIGUSR1)
        results = list(client.results(second, wait=True, timeout=60))
        assert [r.state for r in results] == ["done"] * 2
    assert worker.stop() == 0
    store = SQLiteStore(scheduler.db)
    assert all(s.attempts <= 1 for s in store.slices(second))  # no attempt was charged twice
    store.close()
