"""Scheduler scale: many concurrent workers on one scheduler process.

A local scheduler (SQLite) serves W simulated workers, each a real websocket session on
loopback with its own identity (challenge signed at login). Each worker loops: fetch one slice,
compute it (echo: the result is the datum), sign the result and submit it; the job has enough
slices for the run. Measured per worker count: results accepted per second over the run, and the
latency of fetches that leased a slice (p50, p99). Runs 100 and 1,000 workers in the same run.

Two loads per worker count. ``compute 0``: each worker fetches again as soon as its result is
acknowledged, so the scheduler is saturated and the latency is mostly queueing (by Little's law,
workers / throughput); this gives the capacity. ``compute C``: each worker holds its slice C
seconds (uniform in [C/2, 3C/2], as a real slice takes time to compute) before submitting it;
this is the latency a volunteer sees when the scheduler is not the bottleneck. The simulated
workers run in one client process sharing the machine with the scheduler.

    python benchmarks/scale.py [--quick] [--workers 100,1000] [--compute 0,1] [--seconds S]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import ROOT, report  # noqa: E402

from dcp_worker.connection import Session, SessionError, open_session  # noqa: E402
from dcp_worker.identity import Identity, create_keystore  # noqa: E402
from dcp_worker.protocol import Fetch, Result, Work, signing  # noqa: E402
from scheduler.client import ComputeClient  # noqa: E402
from scheduler.local import LocalScheduler  # noqa: E402

ECHO = ROOT / "examples" / "echo" / "echo.wasm"
CAPABILITIES = {"runtimes": {"wasm": {}}}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def one_worker(
    url: str,
    identity: Identity,
    deadline: float,
    compute: float,
    latencies: list[float],
    done: list[int],
) -> None:
    session: Session = await open_session(url, identity, identity.address, timeout=60)
    known: tuple[str, ...] = ()
    try:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            reply = await session.request(
                partial(Fetch, max_slices=1, capabilities=CAPABILITIES, known_jobs=known)
            )
            if not isinstance(reply, Work) or not reply.slices:
                await asyncio.sleep(0.05)
                continue
            latencies.append(time.perf_counter() - started)
            known = tuple({*known, *(job.job for job in reply.jobs)})
            for lease in reply.slices:
                if compute:
                    await asyncio.sleep(random.uniform(compute / 2, compute * 1.5))
                payload = signing.result_payload(
                    lease.job, lease.slice, lease.token, lease.datum, identity.address
                )
                await session.request(
                    partial(
                        Result,
                        job=lease.job,
                        slice=lease.slice,
                        token=lease.token,
                        result=lease.datum,
                        payment_address=identity.address,
                        signature=identity.sign(payload),
                    )
                )
                done[0] += 1
    except SessionError:
        pass
    finally:
        await session.close()


async def run_workers(url: str, n: int, compute: float, seconds: float) -> dict[str, float]:
    identities = [Identity.from_private_key(os.urandom(32)) for _ in range(n)]
    latencies: list[float] = []
    done = [0]
    # Connect them all first (a login storm is its own test), then measure a steady run.
    deadline = time.monotonic() + 3600
    tasks = []
    for identity in identities:
        tasks.append(
            asyncio.create_task(one_worker(url, identity, deadline, compute, latencies, done))
        )
        await asyncio.sleep(0)
    await asyncio.sleep(min(5.0, 0.01 * n) + 2 * compute)
    latencies.clear()
    done[0] = 0
    started = time.monotonic()
    await asyncio.sleep(seconds)
    elapsed = time.monotonic() - started
    count, sample = done[0], list(latencies)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "results_per_s": round(count / elapsed, 1),
        "lease_p50_ms": round(1000 * percentile(sample, 0.5), 2),
        "lease_p99_ms": round(1000 * percentile(sample, 0.99), 2),
        "leases": len(sample),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke mode: tiny, not saved")
    parser.add_argument("--workers", default="100,1000")
    parser.add_argument(
        "--compute", default="0,1", help="seconds each worker holds a slice (0: saturate)"
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    computes = [float(c) for c in args.compute.split(",")]
    if args.quick:
        counts, computes, args.seconds = [5, 20], [0.0, 0.2], 2.0
    figures: dict[str, object] = {"seconds": args.seconds}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        owner = create_keystore(work / "owner.json", b"bench", iterations=1024)
        scheduler = LocalScheduler(work / "s.db", "--lease-timeout", "60")
        try:
            with ComputeClient(scheduler.url, owner) as client:
                values = [f"v{i}" for i in range(200_000 if not args.quick else 40_000)]
                job_toml = work / "job.toml"
                job_toml.write_text(f'module = "{ECHO}"\n[inputs]\nvalues = {json.dumps(values)}\n')
                client.deploy(job_toml)
            for n in counts:
                for compute in computes:
                    figures[f"workers_{n}_compute_{compute:g}s"] = asyncio.run(
                        run_workers(scheduler.url, n, compute, args.seconds)
                    )
        finally:
            scheduler.stop(30)
    report("scale", figures, save=not args.quick)


if __name__ == "__main__":
    main()
