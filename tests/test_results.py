"""Result acceptance under hostile traffic: the cheap checks come before any verifier, verifier
sandboxes are shared fairly between sessions, and result metrics must be plausible.

The scheduler runs in-process (its app on a loopback port 0), so that a test can read its
verifier pool's statistics; the clients are raw websockets as in test_scheduler_session.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
import websockets
from aiohttp import web

import dcp_protocol as p
from dcp_protocol import signing
from scheduler import Store, open_store
from scheduler.client import ComputeClient, ComputeError
from scheduler.plausibility import MetricsRules
from scheduler.server import Scheduler, SchedulerConfig
from scheduler.store import NewJob, ResultLease, ResultRow, Settled, StaleLease
from scheduler.store.sqlite import PRICE_EXACT_WORKERS, PRICE_INTERVAL, SQLiteStore

from .conftest import EXAMPLES, Keystore, wait_until
from .test_scheduler_session import _open, _recv

SLOWCHECK = Path(__file__).parent / "wasm" / "slowcheck.c"
#: Forged results one hostile session sends (within the refusal budget's burst).
FLOOD = 30
ECHO = (EXAMPLES / "echo" / "echo.wasm").read_bytes()
Client = websockets.asyncio.client.ClientConnection


@contextlib.asynccontextmanager
async def serving(store: Store, config: SchedulerConfig) -> AsyncIterator[tuple[Scheduler, str]]:
    """The scheduler's app on 127.0.0.1:0: (the scheduler, its base URL)."""
    scheduler = Scheduler(store, config)
    runner = web.AppRunner(scheduler.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield scheduler, f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def deploy(
    store: Store,
    data: list[bytes],
    verifier: bytes | None = None,
    argv: tuple[str, ...] = (),
    max_attempts: int = 2,
    owner: str = "0x" + "11" * 20,
    limits: p.Limits | None = None,
    offer_micro: int = 0,
) -> str:
    return store.create_job(
        NewJob(
            owner=owner,
            name="echo",
            runtime="wasm",
            module=ECHO,
            module_sha256=hashlib.sha256(ECHO).hexdigest(),
            argv=argv,
            limits=limits or p.Limits(),
            offer_micro=offer_micro,
            data=tuple(data),
            payload_sha256=secrets.token_hex(32),
            max_attempts=max_attempts,
            verifier=verifier,
        ),
        time.time(),
    )


def result_frame(
    keystore: Keystore,
    rid: int,
    job: str,
    slice_: int,
    token: str,
    data: bytes,
    metrics: p.Metrics | None = None,
    datum_bytes: int = 1,
) -> str:
    pay = keystore.identity.address
    sig = keystore.identity.sign(signing.result_payload(job, slice_, token, data, pay))
    if metrics is None:
        metrics = p.Metrics(bytes_in=datum_bytes, bytes_out=len(data))
    return p.encode(
        p.Result(
            id=rid,
            job=job,
            slice=slice_,
            token=token,
            result=data,
            payment_address=pay,
            signature=sig,
            metrics=metrics,
        )
    ).decode()


async def fetch(ws: Client, rid: int, max_slices: int, **extra: object) -> p.Work:
    await ws.send(p.encode(p.Fetch(id=rid, max_slices=max_slices, **extra)).decode())  # type: ignore[arg-type]
    work = await _recv(ws)
    assert isinstance(work, p.Work), work
    return work


async def verified_ack_delay(ws: Client, keystore: Keystore, job: str, rid: int) -> float:
    """Lease one slice of ``job`` and send its right result: seconds until it is accepted."""
    (lease,) = (await fetch(ws, rid, 1)).slices
    started = time.monotonic()
    await ws.send(result_frame(keystore, rid + 1, job, lease.slice, lease.token, lease.datum))
    reply = await asyncio.wait_for(ws.recv(), 120)
    delay = time.monotonic() - started
    assert p.decode(reply, p.SCHEDULER_MESSAGES) == p.Ack(re=rid + 1, status="accepted")
    return delay


def test_forged_results_run_no_verifier_and_delay_no_honest_result(
    tmp_path: Path, make_keystore: Callable[[str], Keystore], zig_build: Callable[[Path], bytes]
) -> None:
    """A fresh identity holding no lease floods 30 results under forged tokens for a job whose
    verifier takes 300 ms: every one is stale_lease without a verifier run, and an honest
    worker's verified result sent behind the flood waits for its own verifier run only. (30:
    within the refusal budget's burst of 32, past which the flood's own replies come at one a
    second, which made this test wait 28 s for nothing it checks.)"""
    store = SQLiteStore(tmp_path / "s.db")
    job = deploy(store, [b"a"] * 4, zig_build(SLOWCHECK), argv=("300",))
    honest, hostile = make_keystore("honest"), make_keystore("hostile")
    config = SchedulerConfig(verifier_sandboxes=1, verifier_wall_seconds=30)

    async def main() -> tuple[float, float, list[str], int]:
        async with serving(store, config) as (scheduler, url):
            ws = await _open(url.replace("http", "ws") + "/worker", honest)
            alone = await verified_ack_delay(ws, honest, job, 10)
            flood = await _open(url.replace("http", "ws") + "/worker", hostile)
            for i in range(FLOOD):
                await flood.send(
                    result_frame(hostile, 100 + i, job, i % 4, secrets.token_hex(16), b"a")
                )
            under_flood = await verified_ack_delay(ws, honest, job, 20)
            codes = []
            for _ in range(FLOOD):
                reply = await _recv(flood)
                assert isinstance(reply, p.Error)
                codes.append(reply.code)
            runs = scheduler.verifiers.statistics().runs
            await ws.close()
            await flood.close()
        return alone, under_flood, codes, runs

    alone, under_flood, codes, runs = asyncio.run(main())
    store.close()
    assert codes == ["stale_lease"] * FLOOD
    # Broken, each forged result costs a 300 ms verifier run first: 30 runs on one sandbox
    # ahead of the honest one (9 s); fixed, the honest result waits for its own run only.
    assert under_flood < 3 * alone + 1, (alone, under_flood)
    assert runs == 2  # the honest worker's two results; none for the forged ones


def test_one_sessions_verifications_do_not_delay_anothers(
    tmp_path: Path, make_keystore: Callable[[str], Keystore], zig_build: Callable[[Path], bytes]
) -> None:
    """A session holding 8 real leases sends 8 wrong results (300 ms of verifier each, one
    sandbox); an honest session's result sent behind them is verified next, not ninth."""
    store = SQLiteStore(tmp_path / "s.db")
    job = deploy(store, [b"a"] * 9, zig_build(SLOWCHECK), argv=("300",))
    honest, hostile = make_keystore("honest"), make_keystore("hostile")
    config = SchedulerConfig(
        verifier_sandboxes=1, verifications_per_session=1, verifier_wall_seconds=30
    )

    async def main() -> tuple[list[str], int]:
        async with serving(store, config) as (scheduler, url):
            flood = await _open(url.replace("http", "ws") + "/worker", hostile)
            ws = await _open(url.replace("http", "ws") + "/worker", honest)
            leases = (await fetch(flood, 2, 8)).slices
            (mine,) = (await fetch(ws, 2, 1)).slices
            for i, lease in enumerate(leases):
                await flood.send(result_frame(hostile, 10 + i, job, lease.slice, lease.token, b"b"))
            # A condition on a snapshot, polled (the pool has no event for it): all 8 are in.
            await wait_until(lambda: scheduler.verifiers.statistics().waiting >= 7)
            await ws.send(result_frame(honest, 3, job, mine.slice, mine.token, mine.datum))
            order: list[str] = []

            async def collect(name: str, conn: Client, n: int) -> None:
                for _ in range(n):
                    reply = await asyncio.wait_for(conn.recv(), 60)
                    order.append(f"{name}:{p.decode(reply, p.SCHEDULER_MESSAGES).type}")

            await asyncio.gather(collect("hostile", flood, 8), collect("honest", ws, 1))
            await ws.close()
            await flood.close()
            return order, scheduler.verifiers.statistics().runs

    order, runs = asyncio.run(main())
    store.close()
    assert order.count("hostile:error") == 8 and runs == 9
    # At most the hostile session's one running verification finishes first; broken (one
    # FIFO queue), all eight did.
    assert order.index("honest:ack") <= 1, order


def test_a_result_resent_while_it_is_verified_runs_the_verifier_once(
    tmp_path: Path, make_keystore: Callable[[str], Keystore], zig_build: Callable[[Path], bytes]
) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    job = deploy(store, [b"a"], zig_build(SLOWCHECK), argv=("300",))
    worker = make_keystore("worker")

    async def main() -> tuple[list[p.Message], int]:
        async with serving(store, SchedulerConfig(verifier_wall_seconds=30)) as (scheduler, url):
            ws = await _open(url.replace("http", "ws") + "/worker", worker)
            (lease,) = (await fetch(ws, 2, 1)).slices
            for rid in (3, 4, 5):
                await ws.send(result_frame(worker, rid, job, 0, lease.token, b"a"))
            replies = sorted([await _recv(ws) for _ in range(3)], key=lambda m: m.re)  # type: ignore[attr-defined]
            await ws.close()
            return replies, scheduler.verifiers.statistics().runs

    replies, runs = asyncio.run(main())
    store.close()
    assert replies == [
        p.Ack(re=3, status="accepted"),
        p.Ack(re=4, status="duplicate"),
        p.Ack(re=5, status="duplicate"),
    ]
    assert runs == 1


def test_metrics_must_be_finite_and_not_negative() -> None:
    for bad in ({"cpu_seconds": math.inf}, {"wall_seconds": math.nan}, {"bytes_in": -5}):
        with pytest.raises(p.InvalidMessage):
            p.Metrics(**bad)  # type: ignore[arg-type]
    frame = json.loads(
        p.encode(p.Result(1, "j", 0, "t", b"r", "0x" + "22" * 20, "ab" * 65)).decode()
    )
    frame["metrics"] = {"bytes_in": -5}
    with pytest.raises(p.InvalidMessage):
        p.decode(json.dumps(frame), p.SCHEDULER_MESSAGES)


def test_implausible_metrics_are_refused_and_counted_against_the_worker(
    db: str, make_keystore: Callable[[str], Keystore]
) -> None:
    """A result claiming 1e300 CPU seconds, more wall time than its lease is old, or byte
    counts that are not its datum's and its own is refused (metrics_implausible): not paid,
    the slice goes to another worker, the worker's record shows it; the job's cost is not
    moved, so honest workers with a minimum wage still run it."""
    store = open_store(db)
    owner = make_keystore("owner")
    job = deploy(store, [b"a"] * 5, max_attempts=3, owner=owner.identity.address)
    liar, honest = make_keystore("liar"), make_keystore("honest")
    lies = [
        p.Metrics(wall_seconds=1.0, cpu_seconds=1e300, bytes_in=1, bytes_out=1),
        p.Metrics(wall_seconds=3600.0, cpu_seconds=1.0, bytes_in=1, bytes_out=1),
        p.Metrics(bytes_in=0, bytes_out=1),
        p.Metrics(bytes_in=1, bytes_out=5000),
        p.Metrics(wall_seconds=0.01, gpu_seconds=100.0, bytes_in=1, bytes_out=1),
    ]

    async def main() -> tuple[list[p.Message], p.Work, dict[str, object]]:
        async with serving(store, SchedulerConfig()) as (_scheduler, url):
            ws = await _open(url.replace("http", "ws") + "/worker", liar)
            leases = (await fetch(ws, 2, 5)).slices
            replies = []
            for i, (lease, metrics) in enumerate(zip(leases, lies, strict=True)):
                await ws.send(
                    result_frame(liar, 10 + i, job, lease.slice, lease.token, b"a", metrics)
                )
                replies.append(await _recv(ws))
            # A resubmission under a rejected lease is stale: it is never paid later.
            await ws.send(result_frame(liar, 20, job, leases[0].slice, leases[0].token, b"a"))
            replies.append(await _recv(ws))
            assert (await fetch(ws, 3, 5)).slices == ()  # not leased again to the liar
            other = await _open(url.replace("http", "ws") + "/worker", honest)
            wage = p.Wage(cpu_hour=1.0)
            work = await fetch(other, 2, 5, min_wage=wage)
            for i, lease in enumerate(work.slices):
                metrics = p.Metrics(wall_seconds=0.0, cpu_seconds=0.0, bytes_in=1, bytes_out=1)
                await other.send(
                    result_frame(honest, 10 + i, job, lease.slice, lease.token, b"a", metrics)
                )
                assert isinstance(await _recv(other), p.Ack)
            loop = asyncio.get_running_loop()

            def read_status() -> dict[str, object]:  # as its owner (reads are signed)
                with ComputeClient(url, owner.identity) as client:
                    return client.status(job)

            status = await loop.run_in_executor(None, read_status)
            await ws.close()
            await other.close()
            return replies, work, status

    replies, work, status = asyncio.run(main())
    assert [(r.type, getattr(r, "code", "")) for r in replies] == [
        ("error", "metrics_implausible")
    ] * 5 + [("error", "stale_lease")]
    assert len(work.slices) == 5 and work.skipped == ()
    assert status["counts"] == {"done": 5}
    assert status["refusals"] == {"metrics_implausible": 5}
    (record,) = [w for w in store.workers() if w.address == liar.identity.address.lower()]
    assert (record.accepted, record.rejected, record.earned_micro) == (0, 5, 0)
    store.close()


def test_result_lease_fences_before_any_verifier(db: str) -> None:
    store = open_store(db)
    job = deploy(store, [b"abc"])
    worker = "0x" + "33" * 20
    (lease,) = store.lease(worker, 1, 100.0, 15.0)
    found = store.result_lease(job, 0, lease.token, worker)
    assert (found.state, found.leased_at, found.datum_bytes) == ("leased", 100.0, 3)
    with pytest.raises(StaleLease):
        store.result_lease(job, 0, "f" * 32, worker)
    with pytest.raises(StaleLease):
        store.result_lease(job, 0, lease.token, "0x" + "44" * 20)
    metrics = p.Metrics(bytes_in=3, bytes_out=1)
    store.accept_result(
        worker, ResultRow(job, 0, lease.token, b"r", worker, "00" * 65, metrics), 101.0
    )
    assert store.result_lease(job, 0, lease.token, worker).state == "done"
    store.close()


def test_a_jobs_cost_is_a_median_over_workers_not_a_mean(db: str) -> None:
    """Four honest workers measure 1 CPU second per slice, one claims 10^6 on each of its
    (more numerous) slices: the cost stays 1 s. A mean over slices made it 600,000 s."""
    store = open_store(db)
    job = deploy(store, [b"x"] * 10)
    honest = [f"0x{i:040x}" for i in range(1, 5)]
    liar = "0x" + "ee" * 20
    for worker, n, cpu in [*((w, 1, 1.0) for w in honest), (liar, 6, 1e6)]:
        rows = [
            ResultRow(
                job, lease.slice, lease.token, b"x", worker, "00" * 65, p.Metrics(1.0, cpu, 1, 1)
            )
            for lease in store.lease(worker, n, 1.0, 15.0)
        ]
        assert [o for o in store.accept_results(worker, rows, 2.0)] == [Settled("accepted", 0)] * n
    cost = store.job(job).cost
    assert cost is not None
    assert (cost.cpu_seconds, cost.bytes_in, cost.bytes_out) == (1.0, 1, 1)
    store.close()


def test_metrics_are_held_to_the_slices_own_limit_and_one_thread_for_wasm() -> None:
    """A slice limited to 10 s cannot have run 100 s whatever its lease's age; a wasm slice
    runs one thread, so 2 wall seconds hold at most 2 x 1.5 CPU seconds (+ slack); an OpenCL
    slice may hold the configured parallelism."""
    rules = MetricsRules(slack_seconds=1.0, parallelism=64.0)
    lease = ResultLease(job="j", slice=0, state="leased", leased_at=0.0, datum_bytes=1)
    limits = p.Limits(wall_seconds=10.0)

    def problem(wall: float, cpu: float, runtime: str = "wasm") -> str | None:
        metrics = p.Metrics(wall_seconds=wall, cpu_seconds=cpu, bytes_in=1, bytes_out=1)
        return rules.problem(metrics, lease, 1, 1000.0, runtime, limits)

    assert problem(100.0, 1.0) == "metrics.wall_seconds is 100; the slice's limit is 10 s"
    assert problem(10.5, 1.0) is None  # within the slack
    assert problem(2.0, 10.0) == "metrics.cpu_seconds is 10; at most 4 for a wall time of 2 s"
    assert problem(2.0, 4.0) is None
    assert problem(2.0, 10.0, "opencl") is None
    assert problem(2.0, 200.0, "opencl") is not None


def test_a_lone_first_workers_cpu_claim_does_not_price_the_job_out(db: str) -> None:
    """The first (or only) worker of a job claims the most CPU time the slice's limit makes
    plausible: a worker's word alone is not the job's price, so an honest worker with a
    minimum wage still takes the job; once a second worker reports, the lower claim counts."""
    store = open_store(db)
    job = deploy(store, [b"x"] * 4, limits=p.Limits(wall_seconds=10.0), offer_micro=0)
    liar, honest = "0x" + "ee" * 20, "0x" + "ab" * 20
    (lease,) = store.lease(liar, 1, 100.0, 15.0)
    claim = p.Metrics(wall_seconds=10.0, cpu_seconds=15.0, bytes_in=1, bytes_out=1)
    row = ResultRow(job, lease.slice, lease.token, b"x", liar, "00" * 65, claim)
    assert store.accept_results(liar, [row], 111.0) == [Settled("accepted", 0)]
    wage = p.Wage(cpu_hour=1.0)  # 15 CPU s a slice would cost 0.0042 at it
    cost = store.job(job).cost
    assert cost is not None and cost.cpu_seconds == 0.0 and cost.bytes_in == 1
    assert wage.cost(cost) < 0.001
    (lease,) = store.lease(honest, 1, 200.0, 15.0)
    measured = p.Metrics(wall_seconds=0.5, cpu_seconds=0.5, bytes_in=1, bytes_out=1)
    row = ResultRow(job, lease.slice, lease.token, b"x", honest, "00" * 65, measured)
    assert store.accept_results(honest, [row], 201.0) == [Settled("accepted", 0)]
    cost = store.job(job).cost
    assert cost is not None and cost.cpu_seconds == 0.5  # the lower of the two claims
    store.close()


def test_a_claimed_sliver_of_cpu_time_shows_no_infinite_wage(db: str) -> None:
    """Two workers claim 1e-305 CPU seconds a slice (finite, plausible): the job's wage per
    CPU hour is then not a number anybody can show, and the anonymous market listing stays
    strict JSON (it answered ``Infinity``, which strict clients refuse)."""
    store = open_store(db)
    store.mint("0x" + "11" * 20, 4_000_000, time.time())
    job = deploy(store, [b"x"] * 4, offer_micro=1_000_000)
    now = time.time()
    for worker in ("0x" + "ee" * 20, "0x" + "ef" * 20):
        (lease,) = store.lease(worker, 1, now, 15.0)
        tiny = p.Metrics(wall_seconds=0.0, cpu_seconds=1e-305, bytes_in=1, bytes_out=1)
        row = ResultRow(job, lease.slice, lease.token, b"x", worker, "00" * 65, tiny)
        assert store.accept_results(worker, [row], now + 0.5) == [Settled("accepted", 1_000_000)]

    def refuse(name: str) -> object:
        raise AssertionError(f"not JSON: {name}")

    async def main() -> str:
        async with serving(store, SchedulerConfig()) as (_scheduler, url):
            async with aiohttp.ClientSession() as session:
                async with session.get(url + "/api/v1/jobs") as response:
                    assert response.status == 200
                    return await response.text()

    listing = json.loads(asyncio.run(main()), parse_constant=refuse)
    (market,) = listing["jobs"]
    assert market["effective_wage"]["cpu_hour"] is None
    assert market["effective_wage"]["mb_in"] == pytest.approx(1e6)
    store.close()


def test_a_jobs_price_with_many_workers_is_set_at_most_once_per_interval(db: str) -> None:
    """Pricing reads one row per worker of the job: past PRICE_EXACT_WORKERS it is redone at
    most once per PRICE_INTERVAL of the callers' clock, not on each acceptance (with 1,000
    workers that re-read took over half of a saturated scheduler's time)."""
    store = open_store(db)
    many = PRICE_EXACT_WORKERS + 1
    job = deploy(store, [b"x"] * (3 * many + 1))

    def accept(first: int, n: int, cpu: float, now: float) -> None:
        for i in range(first, first + n):
            worker = f"0x{i:040x}"
            (lease,) = store.lease(worker, 1, now - 0.5, 15.0)
            row = ResultRow(
                job,
                lease.slice,
                lease.token,
                b"x",
                worker,
                "00" * 65,
                p.Metrics(1.0, cpu, 1, 1),
            )
            assert store.accept_results(worker, [row], now) == [Settled("accepted", 0)]

    def cpu() -> float:
        cost = store.job(job).cost
        assert cost is not None
        return cost.cpu_seconds

    accept(1, many, 1.0, now=10.0)  # priced on each: the last saw `many` workers
    assert cpu() == 1.0
    accept(many + 1, 2 * many, 9.0, now=10.0 + PRICE_INTERVAL / 2)
    assert cpu() == 1.0  # not re-read yet: two thirds of the workers now say 9
    accept(3 * many + 1, 1, 9.0, now=10.0 + PRICE_INTERVAL)
    assert cpu() == 9.0  # the interval passed: priced from every worker again
    store.close()


def test_a_slice_cursor_out_of_range_is_refused_by_name_not_answered_500(
    db: str, make_keystore: Callable[[str], Keystore]
) -> None:
    """``after=10**30`` overflowed the database's 64-bit integers: a 500 from the driver."""
    store = open_store(db)
    owner = make_keystore("owner")
    job = deploy(store, [b"x"] * 2, owner=owner.identity.address)

    async def main() -> list[tuple[int, str]]:
        async with serving(store, SchedulerConfig()) as (_scheduler, url):

            def ask() -> list[tuple[int, str]]:
                answers = []
                with ComputeClient(url, owner.identity) as client:
                    for read in (client.results, client.votes):
                        for after in (10**30, -(10**30), -2):
                            try:
                                list(read(job, after=after))
                            except ComputeError as exc:
                                answers.append((exc.status, exc.code))
                    assert list(client.results(job, after=2**62)) == []
                return answers

            return await asyncio.get_running_loop().run_in_executor(None, ask)

    assert asyncio.run(main()) == [(400, "invalid_message")] * 6
    store.close()
