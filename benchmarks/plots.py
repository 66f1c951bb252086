"""Throughput against sandbox count and against slice size, with Dask beside it; one PNG.

Ours: the echo pipeline of ``throughput.py`` (local scheduler, one worker, signing, the
outbox and the wasm sandbox all on). Peer: Dask distributed's LocalCluster, one
single-threaded worker process per sandbox, mapping the identity over the same items.

* sandbox count 1, 2, 4 (this machine has 2 cores: 4 shows oversubscription), 16-byte slices;
* slice size 16 B, 1 KiB, 16 KiB, 64 KiB, 1 MiB (the datum, echoed back as the result), 2
  sandboxes.

Each point is the median of R rounds after a warm-up round. Writes
``benchmarks/results/throughput.png`` (or ``--png``) and prints one JSON line last.

    python benchmarks/plots.py [--quick] [--rounds R] [--png PATH]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, median, pipeline, report  # noqa: E402

#: Items in a round at most (``--quick``: 200, the smoke test's few seconds).
MOST = 2000


def values(size: int, tag: str) -> list[str]:
    """Items of ``size`` bytes each, as many as keeps a round near 32 MiB (at most MOST)."""
    n = max(min(100, MOST), min(MOST, (32 << 20) // size))
    return [f"{tag}-{k}-".ljust(size, "x")[:size] for k in range(n)]


def ours(work: Path, sandboxes: int, sizes: list[int], rounds: int) -> dict[int, float]:
    rates: dict[int, float] = {}
    with pipeline(work, sandboxes) as p:
        p.echo(values(16, "warm"))
        for size in sizes:
            runs = []
            for r in range(rounds):
                items = values(size, f"{size}.{r}")
                runs.append(len(items) / p.echo(items))
            rates[size] = median(runs)
    return rates


def echo(x: str) -> str:
    return x


def dask(sandboxes: int, sizes: list[int], rounds: int) -> dict[int, float]:
    import time

    import dask as dask_module
    from distributed import Client, LocalCluster

    dask_module.config.set({"distributed.worker.daemon": False})
    rates: dict[int, float] = {}
    with (
        LocalCluster(
            n_workers=sandboxes, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        client.gather(client.map(echo, values(16, "warm"), pure=False))
        for size in sizes:
            runs = []
            for r in range(rounds):
                items = values(size, f"{size}.{r}")
                started = time.perf_counter()
                out = client.gather(client.map(echo, items, pure=False))
                runs.append(len(items) / (time.perf_counter() - started))
                assert out == items
            rates[size] = median(runs)
    return rates


def plot(
    path: Path, by_sandboxes: dict[str, dict[int, float]], by_size: dict[str, dict[int, float]]
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, style in (("ours", "o-"), ("dask", "s--")):
        xs = sorted(by_sandboxes[name])
        left.plot(xs, [by_sandboxes[name][x] for x in xs], style, label=name)
        xs = sorted(by_size[name])
        right.plot(xs, [by_size[name][x] for x in xs], style, label=name)
    left.set(xlabel="sandboxes (worker processes for Dask)", ylabel="slices / s")
    left.set_title("Echo throughput by sandbox count (16-byte slices)")
    left.set_xticks(sorted(by_sandboxes["ours"]))
    right.set(xlabel="slice size (bytes)", ylabel="slices / s", xscale="log")
    right.set_title("Echo throughput by slice size (2 sandboxes)")
    for ax in (left, right):
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def points(table: dict[str, dict[int, float]]) -> dict[str, dict[str, float]]:
    """Each point's two rates and their ratio, for the JSON line."""
    ours, dask = table["ours"], table["dask"]
    return {
        str(x): {
            "ours": round(ours[x], 1),
            "dask": round(dask[x], 1),
            "ratio": round(ours[x] / dask[x], 2),
        }
        for x in sorted(ours)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke mode: tiny, not saved")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--png", type=Path, default=None)
    args = parser.parse_args()
    counts, sizes = [1, 2, 4], [16, 1024, 16384, 65536, 1 << 20]
    if args.quick:
        global MOST
        counts, sizes, args.rounds, MOST = [2], [16, 4096], 1, 200
    by_sandboxes: dict[str, dict[int, float]] = {"ours": {}, "dask": {}}
    by_size: dict[str, dict[int, float]] = {"ours": {}, "dask": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            measured = ours(Path(tmp) / f"s{n}", n, sizes if n == 2 else [16], args.rounds)
            by_sandboxes["ours"][n] = measured[16]
            if n == 2:
                by_size["ours"] = measured
            peer = dask(n, sizes if n == 2 else [16], args.rounds)
            by_sandboxes["dask"][n] = peer[16]
            if n == 2:
                by_size["dask"] = peer
        png = args.png or (
            Path(tmp) / "throughput.png" if args.quick else RESULTS / "throughput.png"
        )
        png.parent.mkdir(parents=True, exist_ok=True)
        plot(png, by_sandboxes, by_size)
        figures = {
            "png": str(png),
            "rounds": args.rounds,
            "by_sandboxes": points(by_sandboxes),
            "by_size": points(by_size),
            "png_bytes": png.stat().st_size,
        }
    report("plots", figures, save=not args.quick)


if __name__ == "__main__":
    main()
