"""Scheduler scale: many concurrent workers on one scheduler process.

A local scheduler serves W simulated workers, each a real websocket session on loopback with its
own identity (challenge signed at login). ``--backend postgres --replicas 2``: two replicas on
one PostgreSQL database, the workers spread over them (worker i on replica i mod 2); the job is
deployed through the first. Each worker loops: fetch one slice,
compute it (echo: the result is the datum), sign the result and submit it; the job has enough
slices for the run. Measured per worker count: results accepted per second over the run, and the
latency of fetches that leased a slice (p50, p99). Runs 100 and 1,000 workers in the same run.

Two loads per worker count. ``compute 0``: each worker fetches again as soon as its result is
acknowledged, so the scheduler is saturated and the latency is mostly queueing (by Little's law,
workers / throughput); this gives the capacity. ``compute C``: each worker holds its slice C
seconds (uniform in [C/2, 3C/2], as a real slice takes time to compute) before submitting it;
this is the latency a volunteer sees when the scheduler is not the bottleneck. The simulated
workers run in one client process sharing the machine with the scheduler.

``--hostile H`` (issue 14): each load is measured twice on the same honest sessions, first alone,
then while H hostile clients run in a second process from another loopback address (127.0.0.2),
one fifth of each kind: websockets that never authenticate, half-sent HTTP requests (request line
or body), forged results (bad signatures and stale tokens) from authenticated sessions, floods of
fetches that can lease nothing and heartbeats of leases they do not hold, and malformed frames
before auth. Each flooding client sends at most ``--hostile-rate`` frames a second, waiting for
each reply. The figures compare the honest workers' p99 lease latency and results/s with and
without them; the scheduler runs with short deadlines (2 s) so the closes happen in the window.
``--control`` points the same hostile clients at a second scheduler on this machine: what the
honest workers lose to sharing the two cores with the attackers' process, not to the attack.

    python benchmarks/scale.py [--quick] [--workers 100,1000] [--compute 0,1] [--pace RATE]
        [--seconds S]
        [--backend sqlite|postgres|both] [--replicas 1,2]
        [--hostile 100] [--hostile-rate 20] [--hostile-kinds idle,half_http,forged,flood,malformed]
        [--control]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import websockets  # noqa: E402
from common import (  # noqa: E402
    ROOT,
    Backend,
    BackendUnavailable,
    add_backend_options,
    backends,
    report,
    signed_result,
)
from websockets.asyncio.client import ClientConnection, connect  # noqa: E402

import dcp_protocol as p  # noqa: E402
from dcp_keys.identity import Identity, create_keystore  # noqa: E402
from dcp_protocol import Ack, Fetch, Metrics, Work, signing  # noqa: E402
from dcp_worker.connection import Session, SessionError, open_session  # noqa: E402
from scheduler.client import ComputeClient  # noqa: E402
from scheduler.local import LocalScheduler  # noqa: E402

ECHO = ROOT / "examples" / "echo" / "echo.wasm"
CAPABILITIES = {"runtimes": {"wasm": {}}}
#: Honest logins at once: they come from one address here, which the scheduler limits (32).
LOGINS_AT_ONCE = 16
HOSTILE_ADDRESS = "127.0.0.2"
#: A flooding fetch names no runtime, so it leases nothing (capabilities {} would mean "don't
#: care" and lease, hoarding slices: another attack, see docs/performance.md).
NO_RUNTIME: dict[str, object] = {"runtimes": {}}
HOSTILE_KINDS = ("idle", "half_http", "forged", "flood", "malformed")
#: The scheduler's deadlines in the hostile mode (seconds), short enough to act in the window.
HOSTILE_DEADLINES = [
    "--auth-timeout",
    "2",
    "--http-header-timeout",
    "2",
    "--http-body-timeout",
    "2",
]


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
    logins: Logins,
) -> None:
    session = await logins.open(url, identity)
    known: tuple[str, ...] = ()
    try:
        await logins.done.wait()  # the login storm first, alone; then the steady run
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
                held = time.monotonic()
                if compute:
                    await asyncio.sleep(random.uniform(compute / 2, compute * 1.5))
                # What an honest worker reports: the scheduler refuses metrics that contradict
                # the lease (metrics_implausible), and a refused result is not a result.
                metrics = Metrics(
                    wall_seconds=time.monotonic() - held,
                    bytes_in=len(lease.datum),
                    bytes_out=len(lease.datum),
                )
                ack = await session.request(signed_result(identity, lease, lease.datum, metrics))
                if isinstance(ack, Ack) and ack.status == "accepted":
                    done[0] += 1
                else:
                    done[1] += 1  # a refusal: counted, never as a result
    except SessionError:
        pass
    finally:
        await session.close()


class Logins:
    """The honest login ramp: a few at once, and an event when all are through."""

    def __init__(self, n: int) -> None:
        self.at_once = asyncio.Semaphore(LOGINS_AT_ONCE)
        self.left = n
        self.done = asyncio.Event()

    def one_done(self) -> None:
        self.left -= 1
        if self.left <= 0:
            self.done.set()

    async def open(self, url: str, identity: Identity) -> Session:
        """A session of ``identity``, opened in its turn of the ramp."""
        async with self.at_once:
            try:
                return await open_session(url, identity, identity.address, timeout=60)
            finally:
                self.one_done()


async def run_workers(
    urls: list[str],
    n: int,
    compute: float,
    seconds: float,
    hostile: int = 0,
    rate: float = 20.0,
    job: str = "",
    kinds: tuple[str, ...] = HOSTILE_KINDS,
    target: str = "",
) -> dict[str, object]:
    identities = [Identity.from_private_key(os.urandom(32)) for _ in range(n)]
    latencies: list[float] = []
    done = [0, 0]  # results accepted, results refused
    logins = Logins(n)
    # Connect them all first (a login storm is its own test), then measure a steady run.
    deadline = time.monotonic() + 3600
    tasks = []
    for i, identity in enumerate(identities):
        url = urls[i % len(urls)]  # spread over the replicas
        tasks.append(
            asyncio.create_task(
                one_worker(url, identity, deadline, compute, latencies, done, logins)
            )
        )
        await asyncio.sleep(0)
    ramp = time.monotonic()
    await asyncio.wait_for(logins.done.wait(), 600)
    login_s = time.monotonic() - ramp
    await asyncio.sleep(0.5 + 2 * compute)

    async def window() -> dict[str, float]:
        latencies.clear()
        done[0] = done[1] = 0
        started = time.monotonic()
        await asyncio.sleep(seconds)
        elapsed = time.monotonic() - started
        count, refused, sample = done[0], done[1], list(latencies)
        return {
            "results_per_s": round(count / elapsed, 1),
            "lease_p50_ms": round(1000 * percentile(sample, 0.5), 2),
            "lease_p99_ms": round(1000 * percentile(sample, 0.99), 2),
            "leases": len(sample),
            "refused": refused,
        }

    figures: dict[str, object] = {**await window(), "logins_per_s": round(n / login_s, 1)}
    if hostile:
        alone = figures
        swarm = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--swarm",
            target or urls[0],
            "--job",
            job,
            "--hostile",
            str(hostile),
            "--hostile-rate",
            str(rate),
            "--hostile-kinds",
            ",".join(kinds),
            "--seconds",
            str(seconds + 4),
            stdout=asyncio.subprocess.PIPE,
        )
        assert swarm.stdout is not None
        await swarm.stdout.readline()  # "ready": every hostile client started
        await asyncio.sleep(1.0)
        attacked = await window()
        out, _ = await swarm.communicate()
        figures = {
            "honest_alone": alone,
            "with_hostile": attacked,
            "hostile": json.loads(out.decode().strip().splitlines()[-1]),
            "p99_ratio": round(attacked["lease_p99_ms"] / alone["lease_p99_ms"], 2),
            "results_ratio": round(attacked["results_per_s"] / alone["results_per_s"], 3),
        }
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return figures


# ---------------------------------------------------------------------------- hostile clients


class Swarm:
    """Counters of what the hostile clients sent and what the scheduler did to them."""

    def __init__(self, url: str, rate: float, until: float) -> None:
        self.ws_url = url.replace("http://", "ws://") + "/worker"
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.interval = 1.0 / rate
        self.until = until
        self.counts: dict[str, int] = {}
        self.job = ""

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    async def connect(self) -> tuple[ClientConnection, p.Hello] | None:
        """A websocket from the hostile address and its hello, or None (refused)."""
        try:
            ws = await connect(
                self.ws_url,
                compression=None,
                max_size=None,
                local_addr=(HOSTILE_ADDRESS, 0),
                close_timeout=1,
            )
        except websockets.InvalidStatus as exc:
            self.count(f"refused_{exc.response.status_code}")
            await asyncio.sleep(0.1)
            return None
        except OSError:
            self.count("connect_failed")
            await asyncio.sleep(0.1)
            return None
        self.count("ws_opened")
        try:
            hello = p.decode(await ws.recv(), p.SCHEDULER_MESSAGES)
        except websockets.ConnectionClosed as exc:
            self.closed(exc)
            return None
        assert isinstance(hello, p.Hello)
        return ws, hello

    def closed(self, exc: websockets.ConnectionClosed) -> None:
        code = exc.rcvd.code if exc.rcvd is not None else "none"
        self.count(f"ws_closed_{code}")

    async def login(self, ws: ClientConnection, identity: Identity, hello: p.Hello) -> None:
        sig = identity.sign(
            signing.session_payload(hello.challenge, hello.server, identity.address)
        )
        await ws.send(
            p.encode(
                p.Auth(
                    id=0, address=identity.address, signature=sig, payment_address=identity.address
                )
            ).decode()
        )
        await ws.recv()

    async def idle(self) -> None:
        while time.monotonic() < self.until:
            opened = await self.connect()
            if opened is None:
                continue
            try:
                await opened[0].recv()
            except websockets.ConnectionClosed as exc:
                self.closed(exc)

    async def half_http(self, n: int) -> None:
        partial = (
            b"GET /api/v1/sta"
            if n % 2
            else b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"
        )
        while time.monotonic() < self.until:
            try:
                reader, writer = await asyncio.open_connection(
                    self.host, self.port, local_addr=(HOSTILE_ADDRESS, 0)
                )
            except OSError:
                self.count("connect_failed")
                await asyncio.sleep(0.1)
                continue
            writer.write(partial)
            reply = await reader.read()  # to the close
            self.count("http_closed_" + (reply[9:12].decode() if reply else "silently"))
            writer.close()

    async def paced(self, ws: ClientConnection, frames: list[str], what: str) -> None:
        """Send ``frames`` in turn, one reply awaited each, at most one per interval."""
        i = 0
        while time.monotonic() < self.until:
            started = time.monotonic()
            await ws.send(frames[i % len(frames)])
            await ws.recv()
            self.count(what)
            i += 1
            await asyncio.sleep(max(0.0, started + self.interval - time.monotonic()))

    async def authenticated(self, kind: str) -> None:
        identity = Identity.from_private_key(os.urandom(32))
        other = Identity.from_private_key(os.urandom(32))
        while time.monotonic() < self.until:
            opened = await self.connect()
            if opened is None:
                continue
            ws, hello = opened
            try:
                await self.login(ws, identity, hello)
                if kind == "forged":
                    frames = []
                    for i in range(64):
                        token = os.urandom(16).hex()
                        signer = other if i % 2 else identity  # bad signature / stale token
                        payload = signing.result_payload(self.job, i, token, b"x", identity.address)
                        result = p.Result(
                            id=i + 1,
                            job=self.job,
                            slice=i,
                            token=token,
                            result=b"x",
                            payment_address=identity.address,
                            signature=signer.sign(payload),
                        )
                        frames.append(p.encode(result).decode())
                    await self.paced(ws, frames, "forged_results")
                else:
                    bogus = (p.LeaseRef(self.job or "nojob", 0, "00" * 16),)
                    frames = [
                        p.encode(p.Fetch(id=1, max_slices=64, capabilities=NO_RUNTIME)).decode(),
                        p.encode(p.Heartbeat(id=2, leases=bogus)).decode(),
                    ]
                    await self.paced(ws, frames, "flood_frames")
            except websockets.ConnectionClosed as exc:
                self.closed(exc)

    async def malformed(self) -> None:
        frames = ["{nope", "[" * 5000 + "]" * 5000, json.dumps({"v": 1, "type": "teleport"})]
        while time.monotonic() < self.until:
            opened = await self.connect()
            if opened is None:
                continue
            try:
                await self.paced(opened[0], frames, "malformed_frames")
            except websockets.ConnectionClosed as exc:
                self.closed(exc)


async def run_swarm(
    url: str, job: str, hostile: int, rate: float, seconds: float, kinds: tuple[str, ...]
) -> dict[str, float]:
    swarm = Swarm(url, rate, time.monotonic() + seconds)
    swarm.job = job  # the forged results name the real job: the costly path
    runs = []
    for i in range(hostile):
        kind = kinds[i % len(kinds)]
        if kind == "idle":
            runs.append(swarm.idle())
        elif kind == "half_http":
            runs.append(swarm.half_http(i))
        elif kind == "malformed":
            runs.append(swarm.malformed())
        else:
            runs.append(swarm.authenticated(kind))
    print("ready", flush=True)
    try:
        async with asyncio.timeout(seconds + 15):
            await asyncio.gather(*runs, return_exceptions=True)
    except TimeoutError:
        pass
    figures: dict[str, float] = dict(sorted(swarm.counts.items()))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    figures["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 2)  # the hostile process's own
    return figures


def run_backend(
    work: Path,
    backend: Backend,
    args: argparse.Namespace,
    counts: list[int],
    computes: list[float],
) -> dict[str, object]:
    """Every load (worker count x compute) on one backend's scheduler(s)."""
    figures: dict[str, object] = {}
    work.mkdir(parents=True)
    owner = create_keystore(work / "owner.json", b"bench", iterations=1024)
    extra = HOSTILE_DEADLINES if args.hostile else []
    kinds = tuple(args.hostile_kinds.split(","))
    with backend.start(work, "--lease-timeout", "60", *extra) as schedulers:
        decoy = LocalScheduler(work / "decoy.db", *extra) if args.control else None
        try:
            values = [f"v{i}" for i in range(200_000 if not args.quick else 40_000)]
            job_toml = work / "job.toml"
            job_toml.write_text(f'module = "{ECHO}"\n[inputs]\nvalues = {json.dumps(values)}\n')
            with ComputeClient(schedulers.url, owner) as client:
                job = client.deploy(job_toml)
            target = ""
            if decoy is not None:
                with ComputeClient(decoy.url, owner) as client:
                    job, target = client.deploy(job_toml), decoy.url
            urls = [s.url for s in schedulers.replicas]
            for n in counts:
                paced = [n / args.pace] if args.pace else []  # the same offered rate at any n
                for compute in [*computes, *paced]:
                    figures[f"workers_{n}_compute_{compute:g}s"] = asyncio.run(
                        run_workers(
                            urls,
                            n,
                            compute,
                            args.seconds,
                            args.hostile,
                            args.hostile_rate,
                            job,
                            kinds,
                            target,
                        )
                    )
        finally:
            if decoy is not None:
                decoy.stop(30)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke mode: tiny, not saved")
    parser.add_argument("--workers", default="100,1000")
    parser.add_argument(
        "--compute", default="0,1", help="seconds each worker holds a slice (0: saturate)"
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--pace",
        type=float,
        default=0.0,
        metavar="RATE",
        help="also a paced load per worker count: each slice held workers/RATE s (RATE/s offered)",
    )
    parser.add_argument("--hostile", type=int, default=0, help="hostile clients (issue 14)")
    parser.add_argument(
        "--hostile-rate", type=float, default=20.0, help="frames/s of each flooding client"
    )
    parser.add_argument(
        "--hostile-kinds",
        default=",".join(HOSTILE_KINDS),
        help="the hostile kinds, shared out in turn (default: all)",
    )
    parser.add_argument(
        "--control",
        action="store_true",
        help="the hostile clients attack a second scheduler on this machine instead: what the "
        "honest figures lose to sharing the machine alone",
    )
    add_backend_options(parser)
    parser.add_argument("--swarm", metavar="URL", help=argparse.SUPPRESS)  # the hostile process
    parser.add_argument("--job", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.swarm:
        counts_ = asyncio.run(
            run_swarm(
                args.swarm,
                args.job,
                args.hostile,
                args.hostile_rate,
                args.seconds,
                tuple(args.hostile_kinds.split(",")),
            )
        )
        print(json.dumps(counts_))
        return
    counts = [int(n) for n in args.workers.split(",")]
    computes = [float(c) for c in args.compute.split(",")]
    if args.quick:
        counts, computes, args.seconds = [20], [0.0, 0.2], 2.0
        if args.hostile:
            counts, computes = [20], [0.2]
    figures: dict[str, object] = {"seconds": args.seconds}
    kinds = tuple(args.hostile_kinds.split(","))
    if not set(kinds) <= set(HOSTILE_KINDS):
        parser.error(f"--hostile-kinds: choose among {','.join(HOSTILE_KINDS)}")
    if args.hostile:
        figures.update(hostile=args.hostile, hostile_rate=args.hostile_rate, kinds=list(kinds))
        figures["control"] = args.control
    chosen = backends(args.backend, args.replicas)
    with tempfile.TemporaryDirectory() as tmp:
        for backend in chosen:
            try:
                loads = run_backend(Path(tmp) / backend.name, backend, args, counts, computes)
            except BackendUnavailable as exc:
                print(f"{backend.name}: skipped: {exc}", file=sys.stderr)
                continue
            if len(chosen) == 1:  # the keys of a one-backend run are those they always were
                figures.update(backend=backend.name, **loads)
            else:
                figures[backend.name] = loads
    name = (
        "scale"
        if not args.hostile
        else "scale_hostile_control"
        if args.control
        else "scale_hostile"
    )
    if args.backend != "sqlite":  # a run on PostgreSQL keeps its own result file
        name += f"_{args.backend}"
    report(name, figures, save=not args.quick)


if __name__ == "__main__":
    main()
