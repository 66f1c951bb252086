"""The benchmarks in smoke mode: they run and end with one JSON line of figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from .conftest import ROOT, postgres_server

#: The benchmarks that run on PostgreSQL too (they skip it, saying why, where there is none).
ON_POSTGRES = {"throughput", "scale_postgres", "wakeups", "drivers", "store_ops"}


def run_benchmark(name: str, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    script = name.removesuffix("_postgres")
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--quick", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    figures: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["benchmark"] == name
    return figures


def postgres_env() -> dict[str, str]:
    """The benchmark's environment: the tests' server (one cluster for all the smoke runs)."""
    server = postgres_server()  # skips (or fails under DCP_REQUIRE_POSTGRES) without one
    return {**os.environ, "DCP_TEST_POSTGRES": server.admin_url}


@pytest.mark.parametrize(
    "name", ["hashrate", "scale", "sandbox_start", "breakdown", "plots", "kernels", "codec"]
)
def test_benchmark_smoke(name: str) -> None:
    figures = run_benchmark(name)
    if name == "scale":
        assert figures["backend"] == "sqlite"
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
    if name == "kernels":  # every kernel built three ways, each build's answer the same
        kernels = {"sha256_puzzle", "matmul", "sort", "json_parse", "coremark_like"}
        assert set(figures["kernels"]) == kernels
        assert all(k["wasm_over_native"] > 0 for k in figures["kernels"].values())
        assert figures["median_wasm_simd128_over_native"] > 0
        return
    if name == "codec":  # each side decoded what it encoded; every figure measured
        assert set(figures["frames"]) == {"results_64x16B", "results_1x64KiB", "slice_done_16B"}
        assert all(v > 0 for row in figures["frames"].values() for v in row.values())
        return
    if name == "sandbox_start":
        assert 0 < figures["warm_switch_ms"] < figures["cold_first_slice_ms"]
        assert figures["warm_slice_over_in_process"] > 0
        return
    assert figures["wasm_over_native"] > 0


def test_throughput_smoke() -> None:
    """SQLite, PostgreSQL with one and two replicas, and Dask, in one run."""
    figures = run_benchmark("throughput", env=postgres_env())
    assert figures["ours_over_dask"] is not None and figures["ours_over_dask"] > 0
    backends = figures["backends"]
    assert set(backends) == {"sqlite", "postgres_1r", "postgres_2r"}
    for name in ("postgres_1r", "postgres_2r"):
        assert backends[name]["slices_per_s"] > 0
        assert backends[name]["over_sqlite"] > 0


def test_scale_postgres_smoke() -> None:
    """Simulated workers spread over two replicas on one database."""
    args = ("--backend", "postgres", "--replicas", "2")
    figures = run_benchmark("scale_postgres", *args, env=postgres_env())
    assert figures["backend"] == "postgres_2r"
    for load in ("workers_20_compute_0s", "workers_20_compute_0.2s"):
        assert figures[load]["results_per_s"] > 0
        assert figures[load]["refused"] == 0


def test_wakeups_smoke() -> None:
    """A deploy on replica A reaches the fetches parked on B, in each mode measured."""
    figures = run_benchmark("wakeups", env=postgres_env())
    for mode in ("notify", "poll:0.1"):
        assert figures[mode]["lost"] == 0
        assert 0 < figures[mode]["deploy_to_lease_ms"] < 10_000
        assert figures[mode]["idle_xact_commit_per_s"] >= 0


def test_drivers_smoke() -> None:
    figures = run_benchmark("drivers", env=postgres_env())
    drivers = ["psycopg_sync", "psycopg_pipeline", "psycopg_async"]
    if "asyncpg" not in figures["skipped"]:
        drivers.append("asyncpg")
    for driver in drivers:
        assert figures[driver]["lease_tx_ms"] > 0
        assert figures[driver]["accept_batch_ms"] > 0


def test_store_ops_smoke() -> None:
    """The store's lease and acceptance per slice, PostgreSQL against SQLite."""
    figures = run_benchmark("store_ops", env=postgres_env())
    assert figures["skipped"] == []
    for backend in ("sqlite", "postgres"):
        for offer in (0, 10):
            row = figures[f"{backend}_offer_{offer}"]
            assert row["lease_us"] > 0 and row["accept_us"] > 0
    assert figures["postgres_offer_10"]["over_sqlite"] > 0


def test_postgres_benchmarks_listed() -> None:
    """Every benchmark on PostgreSQL has its smoke test here, and make bench runs it."""
    tests = {name.removeprefix("test_").removesuffix("_smoke") for name in globals()}
    assert ON_POSTGRES <= tests
    makefile = (ROOT / "Makefile").read_text()
    for name in ON_POSTGRES - {"scale_postgres"}:
        assert f"benchmarks/{name}.py" in makefile, name
