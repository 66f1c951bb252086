"""Shared helpers of the benchmarks: medians, the final JSON line, result files."""

from __future__ import annotations

import json
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
ECHO = ROOT / "examples" / "echo" / "echo.wasm"
BIN = Path(sys.executable).parent

sys.path.insert(0, str(ROOT))

from dcp_keys.identity import create_keystore  # noqa: E402
from scheduler.client import ComputeClient  # noqa: E402
from scheduler.local import LocalScheduler  # noqa: E402


@dataclass
class Pipeline:
    """A local scheduler (SQLite), one worker as a real process, and a job owner's client."""

    work: Path
    scheduler: LocalScheduler
    worker: subprocess.Popen[bytes]
    client: ComputeClient
    deployed: int = 0

    def echo(self, values: list[str]) -> float:
        """Deploy an echo job over ``values``, read every result back, check them; seconds
        from the deploy to the last result."""
        self.deployed += 1
        # The values go in a data file (one per line), as a user with much data would give
        # them: a 32 MB TOML list cost the client 4 s of parsing before anything was deployed.
        data = self.work / f"job{self.deployed}.txt"
        data.write_text("".join(f"{v}\n" for v in values))
        job_toml = self.work / f"job{self.deployed}.toml"
        job_toml.write_text(f'module = "{ECHO}"\n[inputs]\nfile = "{data}"\n')
        started = time.perf_counter()
        job = self.client.deploy(job_toml)
        results = list(self.client.results(job, wait=True, timeout=600))
        elapsed = time.perf_counter() - started
        assert [r.result for r in results] == [v.encode() for v in values]
        return elapsed


@contextmanager
def pipeline(work: Path, sandboxes: int, *worker_args: str) -> Iterator[Pipeline]:
    """Start a :class:`Pipeline` under ``work``; stop both processes with SIGINT after."""
    work.mkdir(parents=True, exist_ok=True)
    pw = work / "pw"
    pw.write_text("bench\n")
    owner = create_keystore(work / "owner.json", b"bench", iterations=1024)
    create_keystore(work / "worker.json", b"bench", iterations=1024)
    sched = LocalScheduler(work / "s.db")
    worker = subprocess.Popen(
        [
            str(BIN / "dcp-worker"),
            "--scheduler",
            sched.url,
            "--identity",
            str(work / "worker.json"),
            "--passphrase-file",
            str(pw),
            "--sandboxes",
            str(sandboxes),
            "--state-dir",
            str(work / "state"),
            "-o",
            "console",  # plain logs, even on a terminal
            *worker_args,
        ]
    )
    try:
        with ComputeClient(sched.url, owner) as client:
            yield Pipeline(work, sched, worker, client)
    finally:
        worker.send_signal(signal.SIGINT)
        worker.wait(60)
        sched.stop(30)


def median(values: list[float]) -> float:
    return statistics.median(values)


def per_slice(step: Callable[[], object], slices: int, reps: int) -> float:
    """Median seconds per slice of ``step``, which handles ``slices`` slices a call (one call
    first, untimed, to warm it)."""
    step()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        step()
        times.append((time.perf_counter() - started) / slices)
    return median(times)


def ms(seconds: float) -> float:
    """Seconds as milliseconds, for the JSON line."""
    return round(1000 * seconds, 3)


def us(seconds: float) -> float:
    """Seconds as microseconds, for the JSON line."""
    return round(1e6 * seconds, 1)


def machine() -> dict[str, Any]:
    import os

    return {
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }


def report(name: str, figures: dict[str, Any], save: bool) -> None:
    """Print the figures as the last line (JSON); keep a copy under results/ unless quick."""
    figures = {
        "benchmark": name,
        **figures,
        "machine": machine(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    line = json.dumps(figures, sort_keys=True)
    if save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{name}.json").write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    print(line)
