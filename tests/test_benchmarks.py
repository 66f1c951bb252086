"""The benchmarks in smoke mode: they run and end with one JSON line of figures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import ROOT


@pytest.mark.parametrize(
    "name", ["hashrate", "throughput", "scale", "sandbox_start", "breakdown", "plots"]
)
def test_benchmark_smoke(name: str) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["benchmark"] == name
    if name == "scale":
        for load in ("workers_20_compute_0s", "workers_20_compute_0.2s"):
            assert figures[load]["results_per_s"] > 0
            assert figures[load]["lease_p99_ms"] > 0
        return
    if name == "plots":
        assert figures["png_bytes"] > 10_000  # a real figure
        assert all(p["ours"] > 0 and p["dask"] > 0 for p in figures["by_size"].values())
        return
    if name == "breakdown":
        assert all(v > 0 for v in figures["steps_us"].values())
        assert all(v > 0 for v in figures["end_to_end_us"].values())
        return
    if name == "sandbox_start":
        assert 0 < figures["warm_switch_ms"] < figures["cold_first_slice_ms"]
        assert figures["warm_slice_over_in_process"] > 0
        return
    ratio = figures["wasm_over_native" if name == "hashrate" else "ours_over_dask"]
    assert ratio is not None and ratio > 0
