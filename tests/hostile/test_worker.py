"""Hostile work at the worker level: a job that never ends and an evaluator killed mid-slice
are contained with named errors; the worker keeps working and other slices are unaffected."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import wasmtime

from scheduler.client import ComputeClient

from ..conftest import Keystore, SchedulerProcess, WorkerProcess, command, wait_for
from ..test_pipeline import ECHO, PUZZLE, counts, job_file


def test_hostile_job_fails_with_named_error_while_good_work_goes_on(
    tmp_path: Path,
    scheduler: SchedulerProcess,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    owner = make_keystore("owner")
    loop = tmp_path / "loop.wasm"
    loop.write_bytes(
        wasmtime.wat2wasm(
            '(module (memory (export "memory") 1) (func (export "_start") (loop (br 0))))'
        )
    )
    workers(scheduler.url, make_keystore("worker"), 2)
    with ComputeClient(scheduler.url, owner.identity) as client:
        bad = client.deploy(
            job_file(tmp_path, "loop", loop, ["x", "y"], limits="wall_seconds = 0.3")
        )
        good = client.deploy(job_file(tmp_path, "echo", ECHO, ["ok1", "ok2", "ok3"]))
        bad_results = list(client.results(bad, wait=True, timeout=60))
        good_results = list(client.results(good, wait=True, timeout=60))
    assert [r.result for r in good_results] == [b"ok1", b"ok2", b"ok3"]
    assert [(r.state, r.error and r.error["code"]) for r in bad_results] == [
        ("failed", "wasm_timeout")
    ] * 2
    shown = subprocess.run(
        [command("dcp-scheduler"), "jobs", "show", "--db", str(scheduler.db), bad],
        capture_output=True,
        text=True,
    )
    assert shown.returncode == 0
    assert shown.stdout.count("wasm_timeout") == 2
    assert "attempts=2" in shown.stdout


def test_evaluator_killed_mid_slice_is_replaced(
    tmp_path: Path,
    scheduler: SchedulerProcess,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    owner = make_keystore("owner")
    worker = workers(scheduler.url, make_keystore("worker"), 1)
    with ComputeClient(scheduler.url, owner.identity) as client:
        job = client.deploy(
            job_file(
                tmp_path,
                "puzzle",
                PUZZLE,
                ["victim", "next"],
                ["22"],
                "memory_bytes = 33554432",
                attempts=3,
            )
        )

        def evaluator_pids() -> list[int]:
            out = subprocess.run(
                ["pgrep", "-P", str(worker.proc.pid)], capture_output=True, text=True
            ).stdout
            return [int(pid) for pid in out.split()]

        wait_for(
            lambda: (
                bool(evaluator_pids())
                and counts(scheduler.db, job).get("leased", 0) > 0
                and f"running slice {job}" in worker.output()
            ),
            30,
        )
        for pid in evaluator_pids():
            os.kill(pid, signal.SIGKILL)
        results = list(client.results(job, wait=True, timeout=120))
    assert all(r.state == "done" for r in results)
    assert "evaluator_died" in worker.output()
    assert worker.stop() == 0
