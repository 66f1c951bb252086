"""Reconnecting after the scheduler went away: while results wait, the worker comes back well
within the lease timeout, and a restarted scheduler keeps the leases it had for one more."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable
from itertools import islice
from pathlib import Path

from dcp_worker.supervisor import backoff
from scheduler.client import ComputeClient

from .conftest import Keystore, SchedulerProcess, WorkerProcess, wait_for
from .test_pipeline import job_file

SPIN = Path(__file__).parent / "wasm" / "spin.c"


def _largest(_low: float, high: float) -> float:
    return high


def test_backoff_is_exponential_and_capped() -> None:
    delays = list(islice(backoff(30.0, uniform=_largest), 10))
    assert delays == [0.25, 0.5, 1, 2, 4, 8, 16, 30, 30, 30]


def test_backoff_stays_under_its_bound_while_it_holds() -> None:
    bound = [3.75]
    delays = backoff(30.0, uniform=_largest, bound=lambda: bound[0])
    assert list(islice(delays, 8)) == [0.25, 0.5, 1, 2, 3.75, 3.75, 3.75, 3.75]
    bound[0] = float("inf")  # nothing waits any more: the usual cap again
    assert next(delays) == 30


def test_a_scheduler_down_longer_than_a_lease_loses_no_result(
    tmp_path: Path,
    zig_build: Callable[[Path], bytes],
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    db = tmp_path / "restart.db"
    lease_timeout = 3.0
    args = ("--lease-timeout", str(lease_timeout), "--heartbeat-interval", "0.5")
    first = SchedulerProcess(db, *args, listen=f"127.0.0.1:{port}")
    # Slices that spin for a while: the worker holds leases while the scheduler is down.
    spin = tmp_path / "spin.wasm"
    spin.write_bytes(zig_build(SPIN))
    worker = workers(first.url, make_keystore("worker"), 2)
    values = ["1500"] * 6
    with ComputeClient(first.url, make_keystore("owner").identity) as client:
        job = client.deploy(job_file(tmp_path, "spin", spin, values, limits="wall_seconds = 30"))
        wait_for(lambda: "running slice" in worker.output(), 60)
        first.proc.kill()
        first.proc.wait()
        first.stop()
        killed = time.monotonic()
        # Down until the leases are over by the clock and the worker has retried many times
        # (an uncapped backoff would be drawing from 0-16 s by now).
        wait_for(
            lambda: (
                len(re.findall("retrying in", worker.output())) >= 8
                and time.monotonic() - killed > lease_timeout + 0.5
            ),
            60,
        )
        connected = worker.output().count("connected to")
        second = SchedulerProcess(db, *args, listen=f"127.0.0.1:{port}")
        restarted = time.monotonic()
        try:
            wait_for(lambda: worker.output().count("connected to") > connected, 30)
            back = time.monotonic() - restarted
            results = list(client.results(job, wait=True, timeout=120))
        finally:
            assert worker.stop() == 0
            second.stop()
    assert [r.result for r in results] == [b"done\n"] * len(values)
    assert back < lease_timeout, f"back {back:.1f} s after the restart"
    assert "stale_lease" not in worker.output()
