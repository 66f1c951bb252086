"""Cross-replica wake-ups: how soon a job deployed on one replica is leased on another, and what
the waiting costs the database.

Two replicas (A, B) on one PostgreSQL database, all started with the same ``--peer-wakeups``
mode. N simulated workers (real websocket sessions, each its own identity, as in scale.py) park
long-poll fetches (``wait_seconds`` 30) on replica B. Each round deploys a job of one slice
through replica A's compute API and times the first lease on B from the deploy's start; rounds
start at random phases of the poll. Modes: ``notify`` (LISTEN/NOTIFY, plus the 1 s safety
poll), ``poll:0.1``, ``poll:1``; the peer in the same run is ``local``, the sessions parked on
replica A itself (a wake-up within one process: the floor).

While idle (no queued slice, N fetches parked) the database's statement rate is measured over
a window: statements per second (pg_stat_statements) and committed transactions per second
(pg_stat_database ``xact_commit``); each wake-up of a parked fetch is one lease transaction.

    python benchmarks/wakeups.py [--quick] [--parked N] [--rounds R] [--idle S]
        [--modes notify,poll:0.1,poll:1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import ECHO, Backend, BackendUnavailable, Schedulers, median, ms, report  # noqa: E402
from scale import CAPABILITIES, Logins  # noqa: E402

from dcp_keys.identity import Identity, create_keystore  # noqa: E402
from dcp_protocol import Fetch, Work  # noqa: E402
from dcp_worker.connection import SessionError  # noqa: E402
from scheduler.client import ComputeClient  # noqa: E402

#: Seconds a fetch is parked (the scheduler's longest, MAX_FETCH_WAIT).
PARK = 30.0
#: The longest a round waits for its lease before counting it lost.
ROUND_TIMEOUT = 10.0


class Leases:
    """The first lease of each job, as the parked sessions see them."""

    def __init__(self) -> None:
        self.first: dict[str, float] = {}
        self.arrived = asyncio.Event()

    def leased(self, job: str) -> None:
        if job not in self.first:
            self.first[job] = time.perf_counter()
            self.arrived.set()


async def parked_worker(url: str, leases: Leases, logins: Logins) -> None:
    """Log in, then park fetches one after the other; note each lease (never submitted: the
    lease timeout is long, so nothing comes back to the queue)."""
    identity = Identity.from_private_key(os.urandom(32))
    session = await logins.open(url, identity)
    known: tuple[str, ...] = ()
    try:
        while True:
            reply = await session.request(
                partial(
                    Fetch,
                    max_slices=1,
                    capabilities=CAPABILITIES,
                    known_jobs=known,
                    wait_seconds=PARK,
                )
            )
            if isinstance(reply, Work):
                known = tuple({*known, *(job.job for job in reply.jobs)})
                for lease in reply.slices:
                    leases.leased(lease.job)
    except SessionError:
        pass
    finally:
        await session.close()


async def measure(
    schedulers: Schedulers,
    on: str,
    client: ComputeClient,
    work: Path,
    parked: int,
    rounds: int,
    idle: float,
) -> dict[str, object]:
    """The rounds and the idle window with ``parked`` fetches on replica ``on`` (A or B)."""
    leases, logins = Leases(), Logins(parked)
    url = schedulers.replicas[0 if on == "A" else 1].url
    tasks = [asyncio.create_task(parked_worker(url, leases, logins)) for _ in range(parked)]
    try:
        await asyncio.wait_for(logins.done.wait(), 300)
        await asyncio.sleep(1.0)  # every session's first fetch parked
        before, started = schedulers.statements(), time.monotonic()
        await asyncio.sleep(idle)
        after, elapsed = schedulers.statements(), time.monotonic() - started
        latencies, deploys, lost = [], [], 0
        for i in range(rounds):
            # A random phase of the poll (of either replica's expiry pass, too).
            await asyncio.sleep(random.uniform(0.2, 1.3))
            job_toml = work / f"job-{on}-{i}-{time.monotonic_ns()}.toml"
            job_toml.write_text(f'module = "{ECHO}"\n[inputs]\nvalues = ["{i}"]\n')
            leases.arrived.clear()
            sent = time.perf_counter()
            job = await asyncio.to_thread(client.deploy, job_toml)
            deploys.append(time.perf_counter() - sent)
            deadline = sent + ROUND_TIMEOUT
            while job not in leases.first and time.perf_counter() < deadline:
                leases.arrived.clear()
                if job in leases.first:
                    break
                try:
                    await asyncio.wait_for(leases.arrived.wait(), deadline - time.perf_counter())
                except TimeoutError:
                    break
            if job in leases.first:
                latencies.append(leases.first[job] - sent)
            else:
                lost += 1
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "deploy_to_lease_ms": ms(median(latencies)) if latencies else None,
        "deploy_to_lease_max_ms": ms(max(latencies)) if latencies else None,
        "rounds_ms": [ms(x) for x in latencies],
        # The deploy request alone (upload, job and slices written, reply): a lease on B may
        # come before A's reply does.
        "deploy_ms": ms(median(deploys)) if deploys else None,
        "lost": lost,
        "idle_statements_per_s": round((after["statements"] - before["statements"]) / elapsed, 1),
        "idle_xact_commit_per_s": round(
            (after["xact_commit"] - before["xact_commit"]) / elapsed, 1
        ),
    }


def run_mode(mode: str, work: Path, parked: int, rounds: int, idle: float) -> dict[str, object]:
    """``mode``: a ``--peer-wakeups`` value, or "local" (notify, sessions parked on A)."""
    peer = "notify" if mode == "local" else mode
    backend = Backend("postgres", 2, ("--peer-wakeups", peer, "--lease-timeout", "600"))
    work.mkdir(parents=True)
    owner = create_keystore(work / "owner.json", b"bench", iterations=1024)
    with backend.start(work) as schedulers, ComputeClient(schedulers.url, owner) as client:
        on = "A" if mode == "local" else "B"
        return asyncio.run(measure(schedulers, on, client, work, parked, rounds, idle))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke mode: tiny, not saved")
    parser.add_argument("--parked", type=int, default=200, help="fetches parked on replica B")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--idle", type=float, default=8.0, help="seconds of the idle window")
    parser.add_argument("--modes", default="local,notify,poll:0.1,poll:1")
    args = parser.parse_args()
    if args.quick:
        args.parked, args.rounds, args.idle, args.modes = 5, 2, 0.5, "notify,poll:0.1"
    figures: dict[str, object] = {"parked": args.parked, "rounds": args.rounds, "idle_s": args.idle}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            try:
                figures[mode] = run_mode(
                    mode, Path(tmp) / mode.replace(":", "_"), args.parked, args.rounds, args.idle
                )
            except BackendUnavailable as exc:
                print(f"skipped: {exc}", file=sys.stderr)
                figures["skipped"] = str(exc)
                break
            print(f"{mode}: {figures[mode]}", file=sys.stderr)
    report("wakeups", figures, save=not args.quick)


if __name__ == "__main__":
    main()
