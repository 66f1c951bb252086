"""Short slices go to an evaluator in batches: one write carries many requests, each slice
still gets its own outcome, and a failing slice does not take its batch with it."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from dcp_protocol import JobSpec, Limits
from evaluator.client import Sandbox, SliceFailure, SliceWork
from scheduler.client import ComputeClient

from .conftest import Keystore, SchedulerProcess, WorkerProcess
from .test_pipeline import ECHO, job_file


def _work(data: list[bytes]) -> list[SliceWork]:
    return [SliceWork(i, datum) for i, datum in enumerate(data)]


def test_one_batch_many_outcomes_and_a_failure_stays_its_own() -> None:
    module = ECHO.read_bytes()
    job = JobSpec("j", "wasm", module, hashlib.sha256(module).hexdigest())
    limits = Limits(output_bytes=4)  # a datum over 4 bytes fails with output_too_large

    async def go() -> tuple[list[object], list[object]]:
        sandbox = Sandbox(0)
        try:
            data = [b"ab", b"far too long", b"cd", *(b"%d" % i for i in range(50))]
            first = await sandbox.run_batch(job, limits, _work(data))
            # The same evaluator goes on with the next batch.
            second = await sandbox.run_batch(job, limits, [SliceWork(0, b"ok")])
            return first, second
        finally:
            await sandbox.stop(graceful=True)

    first, second = asyncio.run(go())
    assert len(first) == 53
    assert first[0].result == b"ab" and first[2].result == b"cd"  # type: ignore[union-attr]
    failure = first[1]
    assert isinstance(failure, SliceFailure) and failure.code == "output_too_large"
    assert [o.result for o in first[3:]] == [b"%d" % i for i in range(50)]  # type: ignore[union-attr]
    assert second[0].result == b"ok"  # type: ignore[union-attr]


@pytest.mark.timeout(120)
def test_a_batch_of_large_slices_does_not_deadlock_on_the_pipes() -> None:
    # 32 x 16 KiB: the replies fill the evaluator's stdout pipe long before the worker has
    # written the whole batch. Waiting for the write to drain before reading hung forever.
    module = ECHO.read_bytes()
    job = JobSpec("j", "wasm", module, hashlib.sha256(module).hexdigest())
    data = [bytes([65 + i % 26]) * 16384 for i in range(32)]

    async def go() -> list[object]:
        sandbox = Sandbox(0)
        try:
            return await asyncio.wait_for(sandbox.run_batch(job, Limits(), _work(data)), 60)
        finally:
            await sandbox.stop(graceful=False)

    outcomes = asyncio.run(go())
    assert [o.result for o in outcomes] == data  # type: ignore[union-attr]


def test_a_dead_evaluator_fails_what_it_had_not_answered() -> None:
    module = ECHO.read_bytes()
    job = JobSpec("j", "wasm", module, hashlib.sha256(module).hexdigest())

    async def go() -> tuple[list[object], list[object]]:
        sandbox = Sandbox(0)
        try:
            await sandbox.describe()
            assert sandbox.pid is not None
            os.kill(sandbox.pid, signal.SIGKILL)  # dies while the batch is on its way
            lost = await sandbox.run_batch(job, Limits(), _work([b"a", b"b"]))
            again = await sandbox.run_batch(job, Limits(), [SliceWork(2, b"c")])  # a new evaluator
            return lost, again
        finally:
            await sandbox.stop(graceful=False)

    lost, again = asyncio.run(go())
    assert all(isinstance(o, SliceFailure) and o.code == "evaluator_died" for o in lost)
    assert again[0].result == b"c"  # type: ignore[union-attr]


def test_short_slices_are_batched_end_to_end(
    tmp_path: Path,
    scheduler: SchedulerProcess,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    worker = workers(scheduler.url, make_keystore("w"), 2)
    values = [f"v{i}" for i in range(600)]
    with ComputeClient(scheduler.url, make_keystore("owner").identity) as client:
        job = client.deploy(job_file(tmp_path, "echo", ECHO, values))
        results = list(client.results(job, wait=True, timeout=120))
    assert [r.result for r in results] == [v.encode() for v in values]
    assert "more in one batch" in worker.output()
    assert worker.stop() == 0
