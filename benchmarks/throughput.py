"""End-to-end throughput of trivial slices: SQLite, PostgreSQL (1 and 2 replicas), and Dask
distributed, in the same run.

Ours: local scheduler(s) and worker(s) with S sandboxes in all, as real processes; an echo job
of N slices is deployed and every result read back (signing, signature checks, the outbox and
the wasm sandbox all on). Slices per second from deploy to the last result read. Backends:
SQLite (the embedded default), PostgreSQL with one replica, PostgreSQL with two replicas on one
database, each replica with its own worker (S/2 sandboxes each, both URLs given, its own
replica first: a worker holds one session, so one worker would load one replica only).
Peer: Dask distributed's LocalCluster with S single-threaded worker processes mapping a
trivial function over the same N items. R rounds each: our backends interleaved round by
round (all running at once, one loaded at a time), Dask after; medians and ratios to SQLite.

``DCP_BENCH_PROFILE=DIR`` runs each scheduler under cProfile (DIR/<backend>-<pid>.prof).

    python benchmarks/throughput.py [--quick] [--slices N] [--sandboxes S] [--rounds R]
        [--backend sqlite|postgres|both] [--replicas 1,2] [--no-dask] [--top N]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (  # noqa: E402
    Backend,
    BackendUnavailable,
    Pipeline,
    add_backend_options,
    backends,
    dask_map_rates,
    median,
    pipeline,
    report,
)


def echo(x: str) -> str:
    return x


def run_ours(
    work: Path,
    kinds: list[Backend],
    slices: int,
    sandboxes: int,
    rounds: int,
    top: int = 0,
) -> dict[str, dict[str, object]]:
    """Figures per backend, the rounds interleaved: slices/s (median, each round), on
    PostgreSQL the statements and WAL per slice (pg_stat_statements, the WAL position), and the
    ratios to SQLite: of the medians, and the median of each round's to SQLite's in the same
    round (run just before it: the ratio a noisy machine moves least)."""
    rates: dict[str, list[float]] = {b.name: [] for b in kinds}
    figures: dict[str, dict[str, object]] = {}
    with contextlib.ExitStack() as stack:
        running: dict[str, Pipeline] = {}
        for backend in kinds:
            try:
                running[backend.name] = stack.enter_context(
                    pipeline(work / backend.name, sandboxes, backend=backend)
                )
            except BackendUnavailable as exc:
                print(f"{backend.name}: skipped: {exc}", file=sys.stderr)
                rates.pop(backend.name)
        for i in range(rounds + 1):  # round 0 warms each up and is not counted
            for name, ours in running.items():
                before = ours.schedulers.statements()
                elapsed = ours.echo([f"{i}-{k}" for k in range(slices)])
                after = ours.schedulers.statements()
                print(f"round {i} {name}: {slices / elapsed:.0f} slices/s", file=sys.stderr)
                if i:
                    rates[name].append(slices / elapsed)
                    if after:  # pg_stat_statements: exact, not BEGIN/COMMIT/SAVEPOINT
                        calls = after["statements"] - before["statements"]
                        wal = after["wal_bytes"] - before["wal_bytes"]
                        figures[name] = {
                            "statements_per_slice": round(calls / slices, 2),
                            "wal_bytes_per_slice": round(wal / slices),
                        }
        for name, ours in running.items():
            for calls, total_ms, query in ours.schedulers.top_statements(top) if top else []:
                text = " ".join(query.split())[:150]
                print(f"{name}: {calls:8d} calls {total_ms:9.1f} ms  {text}", file=sys.stderr)
    sqlite = rates.get("sqlite")
    out: dict[str, dict[str, object]] = {}  # in the backends' order: the first is the headline
    for name, r in rates.items():
        out[name] = {
            "slices_per_s": round(median(r), 1),
            "rounds": [round(x) for x in r],
            **figures.get(name, {}),
        }
        if sqlite and name != "sqlite":
            out[name]["over_sqlite"] = round(median(r) / median(sqlite), 3)
            by_round = [a / b for a, b in zip(r, sqlite, strict=True)]
            out[name]["over_sqlite_by_round"] = round(median(by_round), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke mode: tiny, not saved")
    parser.add_argument("--slices", type=int, default=2000)
    parser.add_argument("--sandboxes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-dask", action="store_true", help="skip the Dask peer")
    parser.add_argument(
        "--top", type=int, default=0, metavar="N", help="print PostgreSQL's N busiest statements"
    )
    add_backend_options(parser, backend="both", replicas="1,2")
    args = parser.parse_args()
    if args.quick:
        args.slices, args.rounds = 50, 1
    kinds = backends(args.backend, args.replicas)
    with tempfile.TemporaryDirectory() as tmp:
        ours = run_ours(Path(tmp), kinds, args.slices, args.sandboxes, args.rounds, args.top)
    peer: list[float] = []
    if not args.no_dask:
        try:
            peer = dask_map_rates(
                echo,
                lambda i: [f"{i}-{k}" for k in range(args.slices)],
                args.sandboxes,
                args.rounds,
            )
        except ImportError:
            print("dask[distributed] is not installed: pip install -e '.[bench]'", file=sys.stderr)
    first = next(iter(ours.values()), None)
    base = float(str(first["slices_per_s"])) if first else 0.0
    dask_rate = median(peer) if peer else None
    figures_: dict[str, object] = {
        "slices": args.slices,
        "sandboxes": args.sandboxes,
        "rounds": args.rounds,
        "backends": ours,
        # The figures of earlier runs, kept under their names: the first backend's.
        "ours_slices_per_s": base or None,
        "dask_slices_per_s": round(dask_rate, 1) if dask_rate else None,
        "ours_over_dask": round(base / dask_rate, 3) if dask_rate and base else None,
    }
    report("throughput", figures_, save=not args.quick)


if __name__ == "__main__":
    main()
