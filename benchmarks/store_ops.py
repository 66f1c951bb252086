"""The store alone: a lease and an acceptance per slice, on PostgreSQL against SQLite, in the
same run.

One store in this process (no scheduler, no network but PostgreSQL's): a job of N slices is
deployed, leased B at a time and each batch's results accepted in one ``accept_results``, until
every slice is done; microseconds per slice of each call (wall and this process's CPU), for a
job that offers no credits and one that pays each result (a ledger row and the payee's credit).
R rounds, the backends interleaved; medians of the rounds, and PostgreSQL's ratios to SQLite.
What the end-to-end benchmark (throughput.py) cannot separate from the worker and the network:
the store's own cost per slice, which is what a replica can serve.

    python benchmarks/store_ops.py [--quick] [--slices N] [--batch B] [--rounds R]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import BackendUnavailable, median, postgres_server, report  # noqa: E402

from dcp_protocol import Limits, Metrics  # noqa: E402
from scheduler import PostgresStore, Store, open_store  # noqa: E402
from scheduler.store import NewJob, ResultRow  # noqa: E402

OWNER = "0x" + "11" * 20
PAYEE = "0x" + "22" * 20
MODULE = b"\x00asm\x01\x00\x00\x00"


def one_round(store: Store, slices: int, batch: int, offer: int) -> dict[str, float]:
    """Microseconds per slice of the deploy, the leases and the acceptances of one job of
    ``slices``."""
    store.mint(OWNER, offer * slices + 1, 0.0)
    t0, c0 = time.perf_counter(), time.process_time()
    job = store.create_job(
        NewJob(
            owner=OWNER,
            name="store_ops",
            runtime="wasm",
            module=MODULE,
            module_sha256="00" * 32,
            argv=(),
            limits=Limits(),
            offer_micro=offer,
            data=tuple(b"%d" % i for i in range(slices)),
            payload_sha256="00" * 32,
        ),
        0.0,
    )
    spent = {
        "deploy": time.perf_counter() - t0,
        "lease": 0.0,
        "accept": 0.0,
        "deploy_cpu": time.process_time() - c0,
        "lease_cpu": 0.0,
        "accept_cpu": 0.0,
    }
    done = 0
    while done < slices:
        t0, c0 = time.perf_counter(), time.process_time()
        leases = store.lease(PAYEE, batch, 1.0, 60.0, jobs=[job])
        t1, c1 = time.perf_counter(), time.process_time()
        rows = [
            ResultRow(lease.job, lease.slice, lease.token, b"r", PAYEE, "00" * 65, Metrics())
            for lease in leases
        ]
        outcomes = store.accept_results(PAYEE, rows, 2.0)
        t2, c2 = time.perf_counter(), time.process_time()
        refused = [o for o in outcomes if getattr(o, "status", None) != "accepted"]
        if not leases or refused:
            raise RuntimeError(f"the store refused its own results: {refused[:3]}")
        spent["lease"] += t1 - t0
        spent["accept"] += t2 - t1
        spent["lease_cpu"] += c1 - c0
        spent["accept_cpu"] += c2 - c1
        done += len(leases)
    return {f"{k}_us": 1e6 * v / slices for k, v in spent.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke mode: tiny, not saved")
    parser.add_argument("--slices", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=64, help="slices per lease and per batch")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.quick:
        args.slices, args.rounds = 200, 1
    try:
        server = postgres_server()
    except BackendUnavailable as exc:
        print(f"postgres: skipped: {exc}", file=sys.stderr)
        server = None
    rounds: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="dcp-store-ops-") as tmp:
        for r in range(args.rounds):
            for offer in (0, 10):
                sqlite = open_store(str(Path(tmp) / f"r{r}-{offer}.db"))
                try:
                    rounds.setdefault(f"sqlite_offer_{offer}", []).append(
                        one_round(sqlite, args.slices, args.batch, offer)
                    )
                finally:
                    sqlite.close()
                if server is None:
                    continue
                pg = PostgresStore(server.create_database("dcp_store_ops"))
                try:
                    rounds.setdefault(f"postgres_offer_{offer}", []).append(
                        one_round(pg, args.slices, args.batch, offer)
                    )
                finally:
                    pg.close()
    figures: dict[str, object] = {
        name: {k: round(median([r[k] for r in runs]), 1) for k in runs[0]}
        for name, runs in rounds.items()
    }
    for offer in (0, 10):
        pg = figures.get(f"postgres_offer_{offer}")
        lite = figures[f"sqlite_offer_{offer}"]
        if isinstance(pg, dict) and isinstance(lite, dict):
            # SQLite's time over PostgreSQL's (a lease and an acceptance, the deploy apart):
            # what PostgreSQL serves per SQLite's 1.0.
            pg["over_sqlite"] = round(
                (lite["lease_us"] + lite["accept_us"]) / (pg["lease_us"] + pg["accept_us"]), 3
            )
    figures.update(slices=args.slices, batch=args.batch, rounds=args.rounds)
    figures["skipped"] = [] if server is not None else ["postgres"]
    report("store_ops", figures, save=not args.quick)


if __name__ == "__main__":
    main()
