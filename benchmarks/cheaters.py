"""Cheating workers under redundancy: the wrong results each policy accepts, and what it costs.

A local scheduler (SQLite) serves W simulated workers, each a real websocket session on
loopback with its own identity (challenge signed at login), as in scale.py. The job is the echo
module, which no simulated worker runs: slice i's datum is ``b"%08d" % i`` and its right answer
is ``sha256(datum)``. An honest worker returns that; a cheater, with probability ``--sabotage``
per result (1.0: on every one), returns a wrong answer instead: an *independent* cheater 32
random bytes, a *colluding* one ``sha256(b"collude" + datum)``, the same wrong answer as every
other colluder. The cheaters are the first round(fraction x W) identities. Each worker fetches
one slice at a time, signs its answer and submits it (with plausible metrics: the seconds it
held the lease, the datum's and the answer's sizes), until the job is finished. A worker holds
each slice a random time (``--hold``, uniform in [0, 2 x MEAN]) so that the workers fetch in a
random order; with ``--hold 0`` they fetch in step, the cheaters (the first to log in) one
after the other, so replicas handed to consecutive fetchers go to cheaters together.

Policies, the job document's ``redundancy``: ``none`` (no key: one result per slice),
``k2`` (quorum 2, not adaptive: every slice twice at least), ``adaptive`` (quorum 2, adaptive:
a worker of good reputation may be trusted alone), ``adaptive+spot`` (the same, and a tenth of
the trusted results checked by a replica anyway); at most 6 replicas a slice. A result that
awaits agreement is acknowledged ``accepted`` and credited 0; one whose slice reached its quorum
meanwhile is refused ``stale_lease``: both are work done.

Each cell (policy x cheater fraction x kind x sabotage) has a fresh scheduler, so reputations do
not leak between cells, and runs two jobs on the same sessions: a warm-up job (``--warmup``
slices, where reputations form; not measured) and the measured job (``--slices``). At its end
the owner reads every slice's result back and counts: slices accepted, accepted ones that are
wrong, failed slices, and the overhead, work done (results submitted by all workers) over
slices accepted. The target (issue text): with 5% independent cheaters, at most 1e-4 of the
slices wrong at a mean redundancy of at most 1.3 once reputations have formed (plain 2-way
voting costs 2.0; BOINC's adaptive replication aims at 5-10% overhead). The job offers 1 credit
a slice: the credits paid to cheaters and to honest workers are counted, and the books are
checked (``dcp-scheduler bank ledger --check``) after each cell. Under redundancy the owner's
votes (``GET /jobs/{id}/votes``) split the wrong accepted slices into those that stood alone
(a trusted cheater's result, unreplicated) and those a quorum of agreeing cheaters carried.

``--occasional R`` (default 0.1; 0 skips it) adds cells for the adaptive policies where the
cheaters cheat on a fraction R of their results only: they build a reputation, then cheat,
which is what spot checks are for. Writes ``benchmarks/results/cheaters.png`` (or ``--png``)
and prints a table, then one JSON line last. A scheduler without redundancy refuses the key:
the run says so and stops (exit status 2).

    python benchmarks/cheaters.py [--quick] [--workers 100] [--slices 10000] [--warmup 2000]
        [--fractions 0.05,0.2] [--kinds independent,colluding]
        [--policies none,k2,adaptive,adaptive+spot] [--sabotage 1.0] [--occasional 0.1]
        [--hold 0.02] [--seed 1] [--png PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import ECHO, RESULTS, SQLITE, report, signed_result  # noqa: E402
from scale import CAPABILITIES, Logins  # noqa: E402

from dcp_keys.identity import Identity  # noqa: E402
from dcp_protocol import Ack, Error, Fetch, Metrics, SliceLease, Work  # noqa: E402
from dcp_worker.connection import Session, SessionError  # noqa: E402
from scheduler.client import ComputeClient, ComputeError  # noqa: E402
from scheduler.jobdoc import job_document  # noqa: E402

#: The job document's ``redundancy`` of each policy; None: the key is left out.
POLICIES: dict[str, dict[str, Any] | None] = {
    "none": None,
    "k2": {"quorum": 2, "max_replicas": 6, "adaptive": False, "spot_check_rate": 0.0},
    "adaptive": {"quorum": 2, "max_replicas": 6, "adaptive": True, "spot_check_rate": 0.0},
    "adaptive+spot": {"quorum": 2, "max_replicas": 6, "adaptive": True, "spot_check_rate": 0.1},
}
ADAPTIVE = ("adaptive", "adaptive+spot")
KINDS = ("independent", "colluding")
#: Credits a slice; the owner is minted enough for every replica of both jobs.
OFFER = 1.0
#: The scheduler refused the ``redundancy`` key: it has none yet.
EXIT_NO_REDUNDANCY = 2
#: Long poll of a fetch that finds nothing (seconds): replicas come back as results disagree.
FETCH_WAIT = 1.0
#: How often the owner's status is read while a job runs (seconds).
STATUS_POLL = 0.5
#: A job with no result submitted for this long is stuck: cancelled, and the cell says so.
STALL_SECONDS = 60.0


class NoRedundancy(RuntimeError):
    """The scheduler refused the job document's ``redundancy`` key (its message)."""


def right_answer(datum: bytes) -> bytes:
    return hashlib.sha256(datum).digest()


def colluded_answer(datum: bytes) -> bytes:
    """The wrong answer every colluder gives."""
    return hashlib.sha256(b"collude" + datum).digest()


@dataclass(frozen=True)
class Behaviour:
    """What a simulated worker answers: ``kind`` honest, independent or colluding; a cheater
    cheats on each result with probability ``sabotage``."""

    kind: str
    sabotage: float = 0.0

    def answer(self, datum: bytes, rng: random.Random) -> bytes:
        if self.kind == "honest" or rng.random() >= self.sabotage:
            return right_answer(datum)
        if self.kind == "independent":
            return os.urandom(32)
        return colluded_answer(datum)


@dataclass
class Tally:
    """What the workers did for one job: results submitted (work done), how many of them were
    wrong, the replies they got (ack status or error code), and when the last was submitted."""

    submitted: int = 0
    wrong_submitted: int = 0
    replies: collections.Counter[str] = field(default_factory=collections.Counter)
    lost_sessions: int = 0
    last: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Cell:
    policy: str
    fraction: float
    kind: str
    sabotage: float

    @property
    def name(self) -> str:
        return f"{self.policy}/{self.fraction:g}/{self.kind}/s{self.sabotage:g}"


class SimulatedWorker:
    """One identity and its session: fetch one slice, answer it as its behaviour says, sign and
    submit, until the job is finished."""

    def __init__(self, behaviour: Behaviour, rng: random.Random, hold: float) -> None:
        self.identity = Identity.from_private_key(os.urandom(32))
        self.behaviour = behaviour
        self.rng = rng
        #: Mean seconds a slice is held before its answer goes back (uniform in [0, 2 x hold]).
        self.hold = hold
        self.session: Session | None = None
        self.known: tuple[str, ...] = ()

    @property
    def cheater(self) -> bool:
        return self.behaviour.kind != "honest"

    async def log_in(self, url: str, logins: Logins) -> None:
        self.session = await logins.open(url, self.identity)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def run_job(self, finished: asyncio.Event, tally: Tally) -> None:
        """Work until ``finished`` is set (or the session is lost, counted in ``tally``)."""
        assert self.session is not None
        try:
            while not finished.is_set():
                reply = await self.session.request(
                    partial(
                        Fetch,
                        max_slices=1,
                        capabilities=CAPABILITIES,
                        known_jobs=self.known,
                        wait_seconds=FETCH_WAIT,
                    )
                )
                if not isinstance(reply, Work) or not reply.slices:
                    # Nothing for this worker now (e.g. only replicas of slices it answered):
                    # a short wait, not a spin, in case the scheduler answered at once.
                    try:
                        await asyncio.wait_for(finished.wait(), 0.05)
                    except TimeoutError:
                        pass
                    continue
                self.known = tuple({*self.known, *(job.job for job in reply.jobs)})
                for lease in reply.slices:
                    await self.submit(lease, tally)
        except SessionError:
            tally.lost_sessions += 1

    async def submit(self, lease: SliceLease, tally: Tally) -> None:
        assert self.session is not None
        datum = lease.datum
        held = time.monotonic()
        if self.hold:
            await asyncio.sleep(self.rng.uniform(0, 2 * self.hold))
        answer = self.behaviour.answer(datum, self.rng)
        # The scheduler refuses metrics that contradict the lease (metrics_implausible).
        metrics = Metrics(
            wall_seconds=time.monotonic() - held, bytes_in=len(datum), bytes_out=len(answer)
        )
        ack = await self.session.request(signed_result(self.identity, lease, answer, metrics))
        # Every slice computed and submitted is work done, whatever the reply: a stale_lease
        # (its slice reached its quorum meanwhile) was computed all the same.
        tally.submitted += 1
        tally.wrong_submitted += answer != right_answer(datum)
        tally.last = time.monotonic()
        if isinstance(ack, Ack):
            tally.replies[ack.status] += 1
        elif isinstance(ack, Error):
            tally.replies[ack.code] += 1
        else:
            tally.replies[ack.type] += 1


def job_body(data: list[bytes], redundancy: dict[str, Any] | None, name: str) -> bytes:
    """The job document's bytes: the echo module over ``data``, and ``redundancy`` if any."""
    document = job_document(
        name=name,
        runtime="wasm",
        module=ECHO.read_bytes(),
        argv=[],
        offer=OFFER,
        limits={},
        max_attempts=2,
        group="",
        requirements={},
        config={},
        data=data,
    )
    if redundancy is not None:
        document["redundancy"] = redundancy
    return json.dumps(document, separators=(",", ":")).encode()


async def deploy(client: ComputeClient, body: bytes) -> str:
    """Deploy; a refusal of the ``redundancy`` key is :class:`NoRedundancy`.

    Raises:
        NoRedundancy: the scheduler does not know the key.
        ComputeError: any other refusal.
    """
    try:
        return await asyncio.to_thread(client.deploy_document, body)
    except ComputeError as exc:
        if exc.code == "invalid_job" and "redundancy" in exc.reason:
            raise NoRedundancy(exc.reason) from None
        raise


async def watch(client: ComputeClient, job: str, finished: asyncio.Event, tally: Tally) -> bool:
    """Set ``finished`` once the owner's status says the job is no longer active; cancel it if
    no result came for :data:`STALL_SECONDS`. True if it stalled."""
    while True:
        status = await asyncio.to_thread(client.status, job)
        if status["state"] != "active":
            finished.set()
            return False
        if time.monotonic() - tally.last > STALL_SECONDS:
            await asyncio.to_thread(client.cancel, job)
            finished.set()
            return True
        await asyncio.sleep(STATUS_POLL)


async def balances(client: ComputeClient, addresses: list[str]) -> list[int]:
    """Each address's balance in micro-credits."""

    def read() -> list[int]:
        return [int(client.account(a)["balance_micro"]) for a in addresses]

    return await asyncio.to_thread(read)


async def quorums(client: ComputeClient, job: str, wrong: set[int]) -> dict[str, int]:
    """From the owner's votes of a replicated job: the slices accepted on one result (a
    trusted worker's, standing alone), and of the wrong ones accepted, those that stood alone
    and those a quorum of agreeing cheaters carried."""

    def read() -> dict[str, int]:
        counts = {"accepted_alone": 0, "wrong_alone": 0, "wrong_by_quorum": 0}
        for s in client.votes(job):
            if s["state"] != "done":
                continue
            alone = s["votes"].get("agreed", 0) < 2
            counts["accepted_alone"] += alone
            if s["slice"] in wrong:
                counts["wrong_alone" if alone else "wrong_by_quorum"] += 1
        return counts

    return await asyncio.to_thread(read)


async def run_job(
    client: ComputeClient,
    workers: list[SimulatedWorker],
    data: list[bytes],
    redundancy: dict[str, Any] | None,
    name: str,
) -> dict[str, Any]:
    """Deploy a job over ``data``, let every worker work it to its end, read its results back
    and count them; its figures.

    Raises:
        NoRedundancy: the scheduler does not know the ``redundancy`` key.
    """
    addresses = [client.identity.address] if client.identity is not None else []
    addresses += [w.identity.address for w in workers]
    before = await balances(client, addresses)
    job = await deploy(client, job_body(data, redundancy, name))
    finished, tally = asyncio.Event(), Tally()
    started = time.monotonic()
    async with asyncio.TaskGroup() as group:
        for worker in workers:
            group.create_task(worker.run_job(finished, tally))
        stalled = group.create_task(watch(client, job, finished, tally))
    elapsed = time.monotonic() - started
    results = await asyncio.to_thread(lambda: list(client.results(job)))
    after = await balances(client, addresses)
    accepted = wrong = colluded = failed = 0
    for r in results:
        if r.state == "done":
            accepted += 1
            if r.result != right_answer(data[r.slice]):
                wrong += 1
                colluded += r.result == colluded_answer(data[r.slice])
        elif r.state == "failed":
            failed += 1
    wrong_slices = {
        r.slice for r in results if r.state == "done" and r.result != right_answer(data[r.slice])
    }
    votes = await quorums(client, job, wrong_slices) if redundancy is not None else {}
    earned = [a - b for a, b in zip(after[1:], before[1:], strict=True)]
    paid_cheaters = sum(e for e, w in zip(earned, workers, strict=True) if w.cheater)
    return {
        "slices": len(data),
        "accepted": accepted,
        "wrong_accepted": wrong,
        "wrong_fraction": wrong / accepted if accepted else None,
        "colluded_accepted": colluded,
        **votes,
        "failed": failed,
        "unfinished": len(data) - accepted - failed,
        "work_done": tally.submitted,
        "wrong_submitted": tally.wrong_submitted,
        "overhead": round(tally.submitted / accepted, 4) if accepted else None,
        "replies": dict(sorted(tally.replies.items())),
        "lost_sessions": tally.lost_sessions,
        "stalled": stalled.result(),
        "seconds": round(elapsed, 2),
        "owner_spent": round((before[0] - after[0]) / 1e6, 6),
        "paid_honest": round((sum(earned) - paid_cheaters) / 1e6, 6),
        "paid_cheaters": round(paid_cheaters / 1e6, 6),
    }


async def run_jobs(
    url: str, client: ComputeClient, cell: Cell, args: argparse.Namespace
) -> dict[str, Any]:
    """The warm-up job, then the measured one, on the same W sessions."""
    cheaters = round(cell.fraction * args.workers)
    workers = [
        SimulatedWorker(
            Behaviour(cell.kind if i < cheaters else "honest", cell.sabotage),
            random.Random(f"{args.seed}/{cell.name}/{i}"),
            args.hold,
        )
        for i in range(args.workers)
    ]
    logins = Logins(len(workers))
    try:
        await asyncio.gather(*(w.log_in(url, logins) for w in workers))
        redundancy = POLICIES[cell.policy]
        warmup = await run_job(
            client, workers, [b"w%07d" % i for i in range(args.warmup)], redundancy, "warm-up"
        )
        measured = await run_job(
            client, workers, [b"%08d" % i for i in range(args.slices)], redundancy, "measured"
        )
    finally:
        await asyncio.gather(*(w.close() for w in workers))
    return {"cheaters": cheaters, "warmup": warmup, **measured}


def mint(db: str, address: str, amount: float) -> None:
    subprocess.run(
        [sys.executable, "-m", "scheduler", "bank", "mint", address, f"{amount:g}", "--db", db],
        check=True,
        capture_output=True,
    )


def books(db: str) -> dict[str, Any]:
    """``dcp-scheduler bank ledger --check`` on the stopped scheduler's database: whether the
    books balance, and its totals (credits)."""
    out = subprocess.run(
        [sys.executable, "-m", "scheduler", "bank", "ledger", "--check", "--db", db],
        capture_output=True,
        text=True,
    )
    lines = out.stdout.strip().splitlines()
    totals = dict(item.split("=", 1) for item in lines[-1].split()) if lines else {}
    return {"balance": out.returncode == 0, **{k: float(v) for k, v in totals.items()}}


def run_cell(work: Path, cell: Cell, args: argparse.Namespace) -> dict[str, Any]:
    """One cell on a fresh scheduler (a new SQLite file).

    Raises:
        NoRedundancy: the scheduler does not know the ``redundancy`` key.
    """
    owner = Identity.from_private_key(os.urandom(32))
    with SQLITE.start(work, "--lease-timeout", "60") as schedulers:
        mint(schedulers.db, owner.address, OFFER * (args.slices + args.warmup) * 8)
        with ComputeClient(schedulers.url, owner) as client:
            figures = asyncio.run(run_jobs(schedulers.url, client, cell, args))
    return {
        "policy": cell.policy,
        "fraction": cell.fraction,
        "kind": cell.kind,
        "sabotage": cell.sabotage,
        **figures,
        "books": books(schedulers.db),
    }


def wrong_shown(row: dict[str, Any]) -> str:
    """Wrong accepted slices, as a count and a fraction; none: below one in the accepted."""
    if not row["accepted"]:
        return "-"
    if not row["wrong_accepted"]:
        return f"0 (< 1/{row['accepted']})"
    return f"{row['wrong_accepted']} ({row['wrong_fraction']:.1e})"


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'policy':<14}{'cheaters':>9} {'kind':<12}{'sabotage':>8}{'accepted':>10}"
        f"  {'wrong accepted':<20}{'alone/quorum':>13}{'failed':>7}{'overhead':>9}{'warm-up':>9}"
        f"{'paid cheaters':>15}{'books':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        overhead = f"{r['overhead']:.3f}" if r["overhead"] is not None else "-"
        warm = r["warmup"]["overhead"]
        split = f"{r['wrong_alone']}/{r['wrong_by_quorum']}" if "wrong_alone" in r else "-"
        lines.append(
            f"{r['policy']:<14}{r['fraction']:>8.0%} {r['kind']:<12}{r['sabotage']:>8g}"
            f"{r['accepted']:>10}  {wrong_shown(r):<20}{split:>13}{r['failed']:>7}{overhead:>9}"
            f"{(f'{warm:.3f}' if warm is not None else '-'):>9}"
            f"{r['paid_cheaters']:>15.0f}{('ok' if r['books']['balance'] else 'OFF'):>7}"
        )
    return "\n".join(lines)


def plot(path: Path, rows: list[dict[str, Any]], policies: list[str]) -> None:
    """Wrong accepted (log; a hollow triangle at 1/accepted where none was) and overhead, by
    scenario, one series per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios: list[tuple[float, str, float]] = []
    for r in rows:
        key = (r["fraction"], r["kind"], r["sabotage"])
        if key not in scenarios:
            scenarios.append(key)
    short = {"independent": "indep.", "colluding": "collud."}
    labels = [
        f"{f:.0%} {short[k]}" + (f"\nsabotage {s:g}" if s != 1 else "") for f, k, s in scenarios
    ]
    by = {(r["policy"], r["fraction"], r["kind"], r["sabotage"]): r for r in rows}
    width = 0.8 / len(policies)
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 4.8))
    for j, policy in enumerate(policies):
        color = f"C{j}"
        offset = (j - (len(policies) - 1) / 2) * width
        xs: list[float] = []
        wrong: list[float] = []
        zero_xs: list[float] = []
        zero_ys: list[float] = []
        over_xs: list[float] = []
        overs: list[float] = []
        for i, key in enumerate(scenarios):
            cell = by.get((policy, *key))
            if cell is None or not cell["accepted"]:
                continue
            if cell["wrong_accepted"]:
                xs.append(i + offset)
                wrong.append(cell["wrong_fraction"])
            else:
                zero_xs.append(i + offset)
                zero_ys.append(1 / cell["accepted"])
            over_xs.append(i + offset)
            overs.append(cell["overhead"])
        left.scatter(xs, wrong, color=color, marker="o", label=policy, zorder=3)
        left.scatter(zero_xs, zero_ys, facecolors="none", edgecolors=color, marker="v", zorder=3)
        right.bar(over_xs, overs, width, color=color, label=policy)
    left.scatter([], [], facecolors="none", edgecolors="grey", marker="v", label="none wrong")
    left.axhline(1e-4, color="grey", linestyle="--", linewidth=1, label="target 1e-4")
    left.set(yscale="log", ylabel="wrong accepted / accepted slices")
    left.set_title("Wrong results accepted (hollow: none, below 1/accepted)")
    right.axhline(1.3, color="grey", linestyle="--", linewidth=1, label="target 1.3")
    right.axhline(2.0, color="grey", linestyle=":", linewidth=1, label="2-way voting")
    right.set(ylabel="work done / slices accepted")
    tallest = max((r["overhead"] or 0 for r in rows), default=2.0)
    right.set_ylim(0, 1.3 * max(tallest, 2.0))  # room for the legend above the bars
    right.set_title("Redundancy overhead (measured job, after the warm-up)")
    for ax in (left, right):
        ax.set_xticks(range(len(scenarios)), labels, fontsize=7)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8, ncols=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cells(args: argparse.Namespace, policies: list[str]) -> list[Cell]:
    fractions = [float(f) for f in args.fractions.split(",")]
    kinds = args.kinds.split(",")
    out = [
        Cell(policy, fraction, kind, args.sabotage)
        for fraction in fractions
        for kind in kinds
        for policy in policies
    ]
    if args.occasional:
        out += [
            Cell(policy, fraction, kind, args.occasional)
            for fraction in fractions
            for kind in kinds
            for policy in policies
            if policy in ADAPTIVE
        ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke mode: small, not saved")
    parser.add_argument("--workers", type=int, default=100)
    parser.add_argument("--slices", type=int, default=10_000, help="slices of the measured job")
    parser.add_argument("--warmup", type=int, default=2_000, help="slices of the warm-up job")
    parser.add_argument("--fractions", default="0.05,0.2", help="cheaters among the workers")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument(
        "--sabotage", type=float, default=1.0, help="the share of its results a cheater fakes"
    )
    parser.add_argument(
        "--occasional",
        type=float,
        default=0.1,
        help="also the adaptive policies with cheaters faking this share of their results "
        "(0: not run)",
    )
    parser.add_argument(
        "--hold",
        type=float,
        default=0.02,
        metavar="MEAN",
        help="mean seconds a worker holds a slice (uniform in [0, 2 x MEAN]), so that the "
        "workers fetch in a random order; 0: in step, the cheaters one after the other",
    )
    parser.add_argument("--seed", type=int, default=1, help="seeds each worker's cheating")
    parser.add_argument("--png", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.workers, args.warmup, args.slices = 20, 300, 1_000
    policies = args.policies.split(",")
    if not set(policies) <= set(POLICIES):
        parser.error(f"--policies: choose among {','.join(POLICIES)}")
    if not set(args.kinds.split(",")) <= set(KINDS):
        parser.error(f"--kinds: choose among {','.join(KINDS)}")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, cell in enumerate(cells(args, policies)):
            try:
                row = run_cell(Path(tmp) / f"cell{n}", cell, args)
            except NoRedundancy as exc:
                if rows:
                    print(table(rows), file=sys.stderr)
                print(
                    f"{cell.name}: this scheduler has no redundancy yet (it refused the job "
                    f"document's 'redundancy' key: {exc}); stopping",
                    file=sys.stderr,
                )
                sys.exit(EXIT_NO_REDUNDANCY)
            rows.append(row)
            print(
                f"{cell.name}: accepted {row['accepted']}, wrong {wrong_shown(row)}, "
                f"failed {row['failed']}, overhead {row['overhead']}, {row['seconds']} s",
                file=sys.stderr,
            )
        print(table(rows), file=sys.stderr)
        png = args.png or (Path(tmp) / "cheaters.png" if args.quick else RESULTS / "cheaters.png")
        png.parent.mkdir(parents=True, exist_ok=True)
        plot(png, rows, policies)
        figures = {
            "workers": args.workers,
            "slices": args.slices,
            "warmup": args.warmup,
            "offer": OFFER,
            "hold": args.hold,
            "png": str(png),
            "png_bytes": png.stat().st_size,
            "cells": rows,
        }
    report("cheaters", figures, save=not args.quick)


if __name__ == "__main__":
    main()
