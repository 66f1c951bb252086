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
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import ROOT, median, report  # noqa: E402

from dcp_worker.identity import create_keystore  # noqa: E402
from scheduler.client import ComputeClient  # noqa: E402
from scheduler.local import LocalScheduler  # noqa: E402

BIN = Path(sys.executable).parent
ECHO = ROOT / "examples" / "echo" / "echo.wasm"


def echo(x: str) -> str:
    return x


def run_ours(work: Path, slices: int, sandboxes: int, rounds: int) -> list[float]:
    pw = work / "pw"
    pw.write_text("bench\n")
    owner = create_keystore(work / "owner.json", b"bench", iterations=1024)
    create_keystore(work / "worker.json", b"bench", iterations=1024)
    sched = LocalScheduler(work / "s.db")
    url = sched.url
    worker = subprocess.Popen(
        [
            str(BIN / "dcp-worker"),
            "--scheduler",
            url,
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
        ]
    )
    rates = []
    try:
        with ComputeClient(url, owner) as client:
            for i in range(rounds + 1):  # round 0 warms the worker up and is not counted
                job_toml = work / f"job{i}.toml"
                values = [f"{i}-{k}" for k in range(slices)]
                job_toml.write_text(f'module = "{ECHO}"\n[inputs]\nvalues = {json.dumps(values)}\n')
                started = time.perf_counter()
                job = client.deploy(job_toml)
                results = list(client.results(job, wait=True, timeout=600))
                elapsed = time.perf_counter() - started
                assert [r.result for r in results] == [v.encode() for v in values]
                if i:
                    rates.append(slices / elapsed)
    finally:
        worker.send_signal(signal.SIGINT)
        worker.wait(60)
        sched.stop(30)
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
