"""Sandbox start: what a slice pays before it runs, from a cold process to a warm sandbox.

Measured through the worker's own :class:`evaluator.client.Sandbox` against real evaluator
processes (``dcp-evaluator-start --stdio``, hardened as the worker starts them):

* cold start: spawn an evaluator and get its ``describe`` reply (it probes the OpenCL devices);
  spawn one and get its first echo slice back (what the worker pays each time it replaces an
  evaluator); beside them, in the same run, the interpreter's own floor (``python -c pass``)
  and ``python -c "import wasmtime"``;
* first assignment: a fresh evaluator is given a job with its module bytes (compiled by
  Cranelift), for the echo module and the hash-puzzle module;
* warm job switch: an evaluator that has compiled both modules is switched between two jobs
  (the module cache hits, no bytes are sent): one ``assign`` round trip;
* a slice on a warm sandbox: one echo slice per round trip, and per slice in batches of 32;
  the peer is the same runtime class running the same module in this process (no process
  boundary, no pipe), so the ratio is what isolation costs a trivial slice.

Medians of many repetitions; prints one JSON line last.

    python benchmarks/sandbox_start.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import ROOT, median, ms, per_slice, report, us  # noqa: E402

from dcp_protocol import JobSpec, Limits  # noqa: E402
from evaluator.client import Sandbox, SliceWork  # noqa: E402
from evaluator.wasm import WasmRuntime  # noqa: E402

ECHO = ROOT / "examples" / "echo" / "echo.wasm"
PUZZLE = ROOT / "examples" / "hash-puzzle" / "puzzle.wasm"
LIMITS = Limits()


def spec(job: str, path: Path) -> JobSpec:
    module = path.read_bytes()
    return JobSpec(job, "wasm", module, hashlib.sha256(module).hexdigest(), argv=("1",))


def interpreter(code: str, n: int) -> float:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        times.append(time.perf_counter() - started)
    return median(times)


async def cold(n: int) -> dict[str, float]:
    """Medians: spawn to ``describe`` reply; spawn to the first echo slice's result (what a
    worker pays each time it replaces an evaluator: no describe, the module sent and
    compiled); and a fresh evaluator's first assignment of each module."""
    figures: dict[str, list[float]] = {
        "describe": [],
        "first_slice": [],
        "assign_echo": [],
        "assign_puzzle": [],
    }
    for i in range(n):
        sandbox = Sandbox(i)
        try:
            started = time.perf_counter()
            await sandbox.describe()
            figures["describe"].append(time.perf_counter() - started)
            for name, path in (("puzzle", PUZZLE), ("echo", ECHO)):
                started = time.perf_counter()
                await sandbox._assign(spec(name, path), LIMITS)
                figures[f"assign_{name}"].append(time.perf_counter() - started)
        finally:
            await sandbox.stop(graceful=True)
        sandbox = Sandbox(i)
        try:
            started = time.perf_counter()
            await sandbox.run(spec("echo", ECHO), LIMITS, b"x", 0)
            figures["first_slice"].append(time.perf_counter() - started)
        finally:
            await sandbox.stop(graceful=True)
    return {name: median(times) for name, times in figures.items()}


async def warm(n: int) -> dict[str, float]:
    echo, puzzle = spec("echo", ECHO), spec("puzzle", PUZZLE)
    sandbox = Sandbox(0, slices_per_evaluator=10**9)
    try:
        await sandbox.run(echo, LIMITS, b"x", 0)
        await sandbox._assign(puzzle, LIMITS)  # both modules compiled and cached now
        switches = []
        for i in range(n):
            job = puzzle if i % 2 else echo
            started = time.perf_counter()
            await sandbox._assign(job, LIMITS)
            switches.append(time.perf_counter() - started)
        await sandbox._assign(echo, LIMITS)
        singles = []
        for i in range(n):
            started = time.perf_counter()
            await sandbox.run(echo, LIMITS, b"x", i)
            singles.append(time.perf_counter() - started)
        batched = []
        for _ in range(max(1, n // 32)):
            items = [SliceWork(k, b"x") for k in range(32)]
            started = time.perf_counter()
            await sandbox.run_batch(echo, LIMITS, items)
            batched.append((time.perf_counter() - started) / len(items))
    finally:
        await sandbox.stop(graceful=True)
    return {
        "switch": median(switches),
        "slice": median(singles),
        "slice_batched": median(batched),
    }


def in_process(n: int) -> float:
    """The same runtime and module in this process: the floor of a trivial slice."""
    echo = spec("echo", ECHO)
    runtime = WasmRuntime()
    runtime.compile(echo.module, echo.sha256, LIMITS)
    return per_slice(lambda: runtime.run(echo.sha256, echo.argv, LIMITS, b"x"), 1, n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke mode: tiny, not saved")
    args = parser.parse_args()
    n_cold, n_warm = (2, 64) if args.quick else (10, 2000)
    python_floor = interpreter("pass", n_cold)
    import_wasmtime = interpreter("import wasmtime", n_cold)
    cold_figures = asyncio.run(cold(n_cold))
    warm_figures = asyncio.run(warm(n_warm))
    floor = in_process(n_warm)
    figures = {
        "cold_start_ms": ms(cold_figures["describe"]),
        "cold_first_slice_ms": ms(cold_figures["first_slice"]),
        "python_start_ms": ms(python_floor),
        "python_import_wasmtime_ms": ms(import_wasmtime),
        "cold_first_slice_over_import_wasmtime": round(
            cold_figures["first_slice"] / import_wasmtime, 2
        ),
        "first_assign_echo_ms": ms(cold_figures["assign_echo"]),
        "first_assign_puzzle_ms": ms(cold_figures["assign_puzzle"]),
        "warm_switch_ms": ms(warm_figures["switch"]),
        "warm_slice_us": us(warm_figures["slice"]),
        "warm_slice_batched_us": us(warm_figures["slice_batched"]),
        "in_process_slice_us": us(floor),
        "warm_slice_over_in_process": round(warm_figures["slice"] / floor, 2),
        "batched_slice_over_in_process": round(warm_figures["slice_batched"] / floor, 2),
    }
    report("sandbox_start", figures, save=not args.quick)


if __name__ == "__main__":
    main()
