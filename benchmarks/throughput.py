"""End-to-end throughput of trivial slices, against Dask distributed in the same run.

Ours: a local scheduler (SQLite) and one worker with S sandboxes, as real processes; an echo
job of N slices is deployed and every result read back (signing, signature checks, the
outbox and the wasm sandbox all on). Slices per second from deploy to the last result read.
Peer: Dask distributed's LocalCluster with S single-threaded worker processes mapping a
trivial function over the same N items. Median of R rounds each, interleaved.

    python benchmarks/throughput.py [--quick] [--slices N] [--sandboxes S] [--rounds R]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import median, pipeline, report  # noqa: E402


def echo(x: str) -> str:
    return x


def run_ours(work: Path, slices: int, sandboxes: int, rounds: int) -> list[float]:
    rates = []
    with pipeline(work, sandboxes) as ours:
        for i in range(rounds + 1):  # round 0 warms the worker up and is not counted
            elapsed = ours.echo([f"{i}-{k}" for k in range(slices)])
            if i:
                rates.append(slices / elapsed)
    return rates


def run_dask(slices: int, sandboxes: int, rounds: int) -> list[float]:
    import dask
    from distributed import Client, LocalCluster

    dask.config.set({"distributed.worker.daemon": False})
    rates = []
    with (
        LocalCluster(
            n_workers=sandboxes, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        for i in range(rounds + 1):
            values = [f"{i}-{k}" for k in range(slices)]
            started = time.perf_counter()
            out = client.gather(client.map(echo, values, pure=False))
            elapsed = time.perf_counter() - started
            assert out == values
            if i:
                rates.append(slices / elapsed)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke mode: tiny, not saved")
    parser.add_argument("--slices", type=int, default=2000)
    parser.add_argument("--sandboxes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.quick:
        args.slices, args.rounds = 50, 1
    ours, peer = [], []
    with tempfile.TemporaryDirectory() as tmp:
        ours = run_ours(Path(tmp), args.slices, args.sandboxes, args.rounds)
    try:
        peer = run_dask(args.slices, args.sandboxes, args.rounds)
    except ImportError:
        print("dask[distributed] is not installed: pip install -e '.[bench]'", file=sys.stderr)
    figures = {
        "slices": args.slices,
        "sandboxes": args.sandboxes,
        "rounds": args.rounds,
        "ours_slices_per_s": round(median(ours), 1),
        "dask_slices_per_s": round(median(peer), 1) if peer else None,
        "ours_over_dask": round(median(ours) / median(peer), 3) if peer else None,
    }
    report("throughput", figures, save=not args.quick)


if __name__ == "__main__":
    main()
