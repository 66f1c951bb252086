"""Fault injection with real processes: kill the worker, its evaluators and the scheduler at
random while jobs run, and count what was lost or paid twice.

    python tests/faults/soak.py [--minutes M] [--faults F] [--seed S] [--backend postgres]
        [--hold-minutes M]

Each round deploys a paid echo job to a scheduler (SQLite) served to one worker, injects faults
until the job completes, then checks every slice against the store and the ledger. Faults:
SIGKILL the worker (restarted on the same outbox), SIGKILL an evaluator, SIGKILL the scheduler
(restarted on the same database and port), SIGINT the worker (graceful; its exit time is
measured; restarted), SIGSTOP the worker past its lease timeout (its leases expire; SIGCONT),
cut its connection (results in flight are lost), lock the scheduler's database for up to 2 s
(result submissions, fetches and heartbeats are refused as ``internal`` meanwhile).

With ``--backend postgres`` (tests/postgres.py's server) each round runs two replicas on one
database, each behind its own cutting proxy, and the worker is given both. Faults there:
SIGKILL a replica (restarted), cut one replica's connections, kill every backend of the
database (pg_terminate_backend), restart PostgreSQL and take every connection slot of the
database's role away for up to 2 s (both when the server is the soak's own), open
a transaction that stays idle for the rest of the round (vacuum cannot clean meanwhile), and
the worker faults above. The summary adds the dead tuples of the queue's tables at the end of
each round (the largest), and after a VACUUM once the idle transactions ended.

``--hold-minutes M`` (PostgreSQL) adds one round on one database whose transaction stays idle
for M minutes while job after job runs through it, with the faults that spare that transaction
(everything above but restarting PostgreSQL): the dead slice versions that vacuum cannot remove
meanwhile are sampled after each job (pgstattuple's exact count where the extension is there),
and counted again after a VACUUM once the transaction ended ("hold" in the summary).
Ends with one JSON line: rounds, faults, slices deployed / completed, lost, paid twice, results
wrong, the worst graceful exit time, and whether the books balance.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from dcp_keys.identity import create_keystore  # noqa: E402
from scheduler.client import ComputeClient  # noqa: E402
from scheduler.local import LocalScheduler  # noqa: E402
from scheduler.store.backends import open_store  # noqa: E402
from tests import postgres  # noqa: E402
from tests.conftest import wait_for  # noqa: E402

BIN = Path(sys.executable).parent
ECHO = ROOT / "examples" / "echo" / "echo.wasm"
OFFER = 0.001
LEASE_TIMEOUT = 3.0


class CuttingProxy:
    """A TCP proxy in front of the scheduler whose connections can be cut at any moment (a
    network drop: whatever was in flight, a result submission included, is lost)."""

    def __init__(self, target_port: int) -> None:
        import asyncio
        import threading

        self.target_port = target_port
        self._loop = asyncio.new_event_loop()
        self._writers: set[object] = set()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

        async def start() -> None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()

        asyncio.run_coroutine_threadsafe(start(), self._loop)
        ready.wait(10)

    async def _handle(self, reader, writer) -> None:  # type: ignore[no-untyped-def]
        import asyncio
        import contextlib

        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.update({writer, up_writer})

        async def pipe(src, dst) -> None:  # type: ignore[no-untyped-def]
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(Exception):
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers.difference_update({writer, up_writer})

    def cut(self) -> None:
        def close_all() -> None:
            for writer in list(self._writers):
                writer.transport.abort()  # type: ignore[attr-defined]
            self._writers.clear()

        self._loop.call_soon_threadsafe(close_all)

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._server.close)
        self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Round:
    def __init__(
        self,
        work: Path,
        rng: random.Random,
        pg: postgres.Server | None = None,
        hold: bool = False,
    ) -> None:
        """``hold``: the round of ``--hold-minutes``, whose idle transaction (:meth:`hold`) is
        opened as the server's admin and held throughout: the faults that would end it (a
        restart of PostgreSQL, another idle transaction) are left out, and killing the
        database's backends spares it."""
        self.work = work
        self.rng = rng
        self.pg = pg
        self.holding = hold
        #: The database as its admin sees it (the idle transaction of a hold round).
        self.admin_db = ""
        #: The database's own login role (on the soak's own server), whose connection slots
        #: the exhaust_connections fault takes away; None: the admin's URL is used.
        self.role: str | None = None
        if pg is not None and pg.cluster is not None:
            self.role = f"soak_{secrets.token_hex(4)}"
            pg.admin(f"CREATE ROLE {self.role} LOGIN")
            name = f"soak_{secrets.token_hex(6)}"
            pg.admin(f"CREATE DATABASE {name} OWNER {self.role} STRATEGY FILE_COPY")
            self.db = pg.cluster.url(name).replace(f"{pg.cluster.user}@", f"{self.role}@")
            self.admin_db = pg.cluster.url(name)
        elif pg is not None:
            self.db = self.admin_db = pg.create_database("soak")
        else:
            self.db = str(work / "s.db")
        replicas = 2 if pg is not None else 1
        self.ports = [_free_port() for _ in range(replicas)]
        self.port = self.ports[0]
        self.schedulers = [self._start_scheduler(i) for i in range(replicas)]
        self.proxies = [CuttingProxy(port) for port in self.ports]
        self.proxy = self.proxies[0]
        #: Transactions opened by the idle_transaction fault, held to the round's end.
        self.idle: list[object] = []
        #: When each of them was opened, and how long the longest was held (s).
        self.idle_since: list[float] = []
        self.idle_held_max = 0.0
        (work / "pw").write_text("soak\n")
        self.owner = create_keystore(work / "owner.json", b"soak", iterations=1024)
        create_keystore(work / "worker.json", b"soak", iterations=1024)
        subprocess.run(
            [
                str(BIN / "dcp-scheduler"),
                "bank",
                "mint",
                "--db",
                self.db,
                self.owner.address,
                "1000",
            ],
            check=True,
            capture_output=True,
        )
        self.worker = self._start_worker()
        self.graceful_exits: list[float] = []
        self.faults: dict[str, int] = {}

    def _start_scheduler(self, i: int) -> LocalScheduler:
        port = self.ports[i]
        wait_for(lambda: _port_free(port), 10)  # the killed one's, when it restarts
        log = self.work / f"scheduler-{i}.log" if self.pg is not None else None
        return LocalScheduler(
            self.db,
            "--lease-timeout",
            str(LEASE_TIMEOUT),
            "--heartbeat-interval",
            "0.5",
            "--db-busy-timeout",
            "0.1",
            listen=f"127.0.0.1:{port}",
            log=log,
        )

    def _start_worker(self) -> subprocess.Popen[bytes]:
        self.starts = getattr(self, "starts", 0) + 1
        with open(self.work / f"worker-{self.starts}.log", "wb") as log:
            return self._popen_worker(log)

    def _popen_worker(self, log: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                str(BIN / "dcp-worker"),
                *(
                    arg
                    for proxy in self.proxies
                    for arg in ("--scheduler", f"http://127.0.0.1:{proxy.port}")
                ),
                "--identity",
                str(self.work / "worker.json"),
                "--passphrase-file",
                str(self.work / "pw"),
                "--sandboxes",
                "2",
                "--state-dir",
                str(self.work / "state"),
                "--grace-seconds",
                "30",
                "-o",
                "console",
                "-v",
            ],
            stdout=log,  # type: ignore[arg-type]
            stderr=log,  # type: ignore[arg-type]
        )

    def inject(self) -> None:
        kinds = [
            "kill_worker",
            "kill_evaluator",
            "kill_scheduler",
            "stop_worker",
            "sigint_worker",
            "cut_connection",
            "cut_connection",
            "kill_evaluator",
        ]
        if self.pg is None:
            kinds.append("lock_database")
        elif self.holding:
            kinds += ["kill_backends", "kill_backends"]
        else:
            kinds += ["kill_backends", "kill_backends", "idle_transaction"]
            if self.pg.cluster is not None:
                kinds.append("restart_postgres")
            if self.role is not None:
                kinds.append("exhaust_connections")
        kind = self.rng.choice(kinds)
        self.faults[kind] = self.faults.get(kind, 0) + 1
        if kind == "kill_worker":
            self.worker.kill()
            self.worker.wait()
            self.worker = self._start_worker()
        elif kind == "kill_evaluator":
            out = subprocess.run(
                ["pgrep", "-P", str(self.worker.pid)], capture_output=True, text=True
            ).stdout.split()
            if out:
                os.kill(int(self.rng.choice(out)), signal.SIGKILL)
        elif kind == "kill_scheduler":  # one replica, when there are several
            i = self.rng.randrange(len(self.schedulers))
            self.schedulers[i].proc.kill()
            self.schedulers[i].proc.wait()
            self.schedulers[i].stop()
            self.schedulers[i] = self._start_scheduler(i)
        elif kind == "kill_backends":  # every session of the database, the replicas' too
            assert self.pg is not None
            self.pg.admin(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s"
                " AND pid <> pg_backend_pid() AND NOT pid = ANY(%s)",
                (self.db.split("?")[0].rsplit("/", 1)[1], self.held_pids),
            )
        elif kind == "restart_postgres":
            assert self.pg is not None and self.pg.cluster is not None
            self.pg.cluster.restart()
        elif kind == "exhaust_connections":  # no connection slot left for the replicas
            assert self.pg is not None and self.role is not None
            self.pg.admin(f"ALTER ROLE {self.role} CONNECTION LIMIT 0")
            try:
                self.pg.admin(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE usename = %s AND pid <> pg_backend_pid()",
                    (self.role,),
                )
                time.sleep(self.rng.uniform(0.3, 2.0))  # the fault: how long none is free
            finally:
                self.pg.admin(f"ALTER ROLE {self.role} CONNECTION LIMIT -1")
        elif kind == "idle_transaction":  # held to the end of the round: vacuum must wait
            self.hold(self.db)
        elif kind == "lock_database":  # submissions (and every write) fail for a while
            lock = sqlite3.connect(self.db, timeout=10, isolation_level=None)
            try:
                lock.execute("BEGIN EXCLUSIVE")
                time.sleep(self.rng.uniform(0.3, 2.0))  # the fault: how long writes fail
                lock.execute("ROLLBACK")
            finally:
                lock.close()
        elif kind == "cut_connection":  # a network drop, results in flight included
            self.rng.choice(self.proxies).cut()
        elif kind == "stop_worker":  # a partition, until the leases it held have expired
            self.worker.send_signal(signal.SIGSTOP)
            held = self._leased()
            wait_for(lambda: not held & self._leased(), LEASE_TIMEOUT * 10)
            self.worker.send_signal(signal.SIGCONT)
        else:
            started = time.monotonic()
            self.worker.send_signal(signal.SIGINT)
            try:
                self.worker.wait(40)
            except subprocess.TimeoutExpired:
                self.worker.kill()
                self.worker.wait()
            self.graceful_exits.append(time.monotonic() - started)
            if self.graceful_exits[-1] > 30:  # show why, before the log is gone
                log = self.work / f"worker-{self.starts}.log"
                tail = log.read_text(errors="replace").splitlines()[-15:]
                print(
                    f"--- slow graceful exit ({self.graceful_exits[-1]:.1f} s), {log.name}:\n"
                    + "\n".join(tail),
                    file=sys.stderr,
                )
            self.worker = self._start_worker()

    def _leased(self) -> set[tuple[str, int, int]]:
        """(job, slice, attempt) of every slice leased now."""
        store = open_store(self.db)
        try:
            return {
                (s.job, s.slice, s.attempts)
                for job in store.active_jobs()
                for s in store.slices(job.id, limit=10**6)
                if s.state == "leased"
            }
        finally:
            store.close()

    def close(self) -> None:
        if self.worker.poll() is None:
            self.worker.send_signal(signal.SIGINT)
            try:
                self.worker.wait(40)
            except subprocess.TimeoutExpired:
                self.worker.kill()
                self.worker.wait()
        for proxy in self.proxies:
            proxy.close()
        for scheduler in self.schedulers:
            scheduler.stop()

    def dead_tuples(self) -> dict[str, int]:
        """n_dead_tup of the queue's tables now (the statistics lag by up to a second)."""
        import psycopg

        with psycopg.connect(self.db, autocommit=True) as conn:
            conn.execute("SELECT pg_stat_clear_snapshot()")
            rows = conn.execute(
                "SELECT relname, n_dead_tup FROM pg_stat_user_tables"
                " WHERE relname IN ('slices', 'jobs', 'ledger', 'job_costs', 'workers')"
            ).fetchall()
        return {name: int(n) for name, n in rows}

    def dead_versions(self) -> int | None:
        """The dead row versions in ``slices`` now, counted by pgstattuple (exact, unlike the
        statistics' n_dead_tup, which lag); None where the extension is not installed."""
        import psycopg

        try:
            with psycopg.connect(self.admin_db, autocommit=True) as conn:
                conn.execute("CREATE EXTENSION IF NOT EXISTS pgstattuple")
                (n,) = conn.execute("SELECT dead_tuple_count FROM pgstattuple('slices')").fetchone()  # type: ignore[misc]
        except psycopg.Error:
            return None
        return int(n)

    def hold(self, url: str) -> None:
        """Open a transaction on ``url`` that stays idle (with a snapshot: vacuum can remove
        no row version dead since) until :meth:`release_idle`."""
        import psycopg

        holder = psycopg.connect(url)
        holder.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        holder.execute("SELECT count(*) FROM slices").fetchone()
        self.idle.append(holder)
        self.idle_since.append(time.monotonic())

    @property
    def held_pids(self) -> list[int]:
        """The server pids of the hold round's idle transactions (kill_backends spares them)."""
        if not self.holding:
            return []
        return [int(h.info.backend_pid) for h in self.idle]  # type: ignore[attr-defined]

    def release_idle(self) -> None:
        now = time.monotonic()
        self.idle_held_max = max([self.idle_held_max, *(now - t for t in self.idle_since)])
        self.idle_since.clear()
        for holder in self.idle:
            with contextlib.suppress(Exception):
                holder.close()  # type: ignore[attr-defined]
        self.idle.clear()

    def vacuum(self) -> None:
        import psycopg

        with psycopg.connect(self.db, autocommit=True) as conn:
            conn.execute("VACUUM")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _settled(client: ComputeClient, job: str) -> bool:
    try:
        return client.status(job)["state"] != "active"
    except Exception:  # the scheduler may be restarting
        return False


def run_round(
    work: Path,
    rng: random.Random,
    slices: int,
    faults: int,
    deadline: float,
    pg: postgres.Server | None = None,
) -> dict[str, object]:
    r = Round(work, rng, pg)
    values = [f"{work.name}-{i}" for i in range(slices)]
    job_toml = work / "job.toml"
    job_toml.write_text(
        f'module = "{ECHO}"\noffer = {OFFER}\nmax_attempts = 10\n'
        f"[inputs]\nvalues = {json.dumps(values)}\n"
    )
    injected = 0
    try:
        urls = [f"http://127.0.0.1:{port}" for port in r.ports]
        with ComputeClient(urls, r.owner, timeout=30) as client:
            job = client.deploy(job_toml)
            while injected < faults and time.monotonic() < deadline:
                time.sleep(rng.uniform(0.05, 0.6))  # the fault schedule: random spacing
                r.inject()
                injected += 1
            with contextlib.suppress(AssertionError):  # still active: the counts say why
                wait_for(lambda: _settled(client, job), 180)
    finally:
        r.close()
    dead: dict[str, int] = {}
    dead_after_vacuum: dict[str, int] = {}
    if pg is not None:
        dead = r.dead_tuples()
        r.release_idle()
        r.vacuum()
        dead_after_vacuum = r.dead_tuples()
    return {
        **_tally(r.db, {job: values}),
        "faults": injected,
        "fault_kinds": r.faults,
        "graceful_exits": r.graceful_exits,
        "dead_tuples": dead,
        "dead_tuples_after_vacuum": dead_after_vacuum,
        "idle_transaction_held_s": round(r.idle_held_max, 1),
    }


def _tally(db: str, jobs: dict[str, list[str]]) -> dict[str, object]:
    """What became of the slices of ``jobs`` (each with its input values), from the store and
    the ledger."""
    store = open_store(db)
    try:
        records = {job: store.slices(job, limit=len(values)) for job, values in jobs.items()}
        payments: dict[tuple[str, int], int] = {}
        for entry in store.ledger(limit=10**9):
            if entry.kind == "payment" and entry.job in jobs and entry.slice is not None:
                key = (entry.job, entry.slice)
                payments[key] = payments.get(key, 0) + 1
        totals = store.totals()
    finally:
        store.close()
    every = [(job, s) for job, found in records.items() for s in found]
    done = [(job, s) for job, s in every if s.state == "done"]
    states: dict[str, int] = {}
    for _job, record in every:
        states[record.state] = states.get(record.state, 0) + 1
    deployed = sum(len(values) for values in jobs.values())
    return {
        "states": states,
        "errors": sorted({f"{s.error_code}" for _job, s in every if s.state != "done"}),
        "deployed": deployed,
        "completed": len(done),
        "lost": deployed - len(done),
        "paid_twice": sum(1 for n in payments.values() if n > 1),
        "unpaid_done": sum(1 for job, s in done if payments.get((job, s.slice), 0) != 1),
        "wrong": sum(1 for job, s in done if s.result != jobs[job][s.slice].encode()),
        "books_balance": totals["minted"] == totals["accounts"] + totals["escrow"],
    }


def run_hold(
    work: Path,
    rng: random.Random,
    slices: int,
    faults: int,
    seconds: float,
    pg: postgres.Server,
) -> dict[str, object]:
    """One database, a transaction held idle on it for ``seconds`` while job after job of
    ``slices`` slices runs through two replicas (``faults`` faults each, none that ends the
    held transaction): the dead row versions vacuum cannot remove meanwhile, sampled after
    each job, and what a VACUUM leaves once the transaction ended."""
    r = Round(work, rng, pg, hold=True)
    jobs: dict[str, list[str]] = {}
    samples: list[tuple[float, int, int]] = []  # (s held, slices done, dead slice versions)
    injected = 0
    try:
        r.hold(r.admin_db)
        start = time.monotonic()
        urls = [f"http://127.0.0.1:{port}" for port in r.ports]
        with ComputeClient(urls, r.owner, timeout=30) as client:
            while time.monotonic() - start < seconds:
                values = [f"{work.name}-{len(jobs)}-{i}" for i in range(slices)]
                job_toml = work / "job.toml"
                job_toml.write_text(
                    f'module = "{ECHO}"\noffer = {OFFER}\nmax_attempts = 10\n'
                    f"[inputs]\nvalues = {json.dumps(values)}\n"
                )
                job = client.deploy(job_toml)
                jobs[job] = values
                for _ in range(faults):
                    if time.monotonic() - start >= seconds:
                        break
                    time.sleep(rng.uniform(0.05, 0.6))  # the fault schedule, as in run_round
                    r.inject()
                    injected += 1
                with contextlib.suppress(AssertionError):
                    wait_for(functools.partial(_settled, client, job), 180)
                versions = r.dead_versions()
                if versions is None:
                    versions = r.dead_tuples().get("slices", 0)
                samples.append((round(time.monotonic() - start, 1), slices * len(jobs), versions))
    finally:
        r.close()
    dead = r.dead_tuples()
    dead_versions = r.dead_versions()
    r.release_idle()
    r.vacuum()
    after = r.dead_tuples()
    after_versions = r.dead_versions()
    done = max(1, samples[-1][1]) if samples else 1
    return {
        **_tally(r.db, jobs),
        "faults": injected,
        "fault_kinds": r.faults,
        "graceful_exits": r.graceful_exits,
        "jobs": len(jobs),
        "idle_transaction_held_s": round(r.idle_held_max, 1),
        "dead_tuples": dead,
        "dead_tuples_after_vacuum": after,
        # pgstattuple's exact counts of slices (None without the extension).
        "dead_slice_versions": dead_versions,
        "dead_slice_versions_after_vacuum": after_versions,
        # Dead slice versions per slice run while vacuum was held back: what bounds the
        # queue's bloat is the hold's length times the rate, not the soak's length.
        "dead_slice_versions_per_slice": round(
            (dead_versions if dead_versions is not None else dead.get("slices", 0)) / done, 2
        ),
        "samples": samples,
    }


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="time bound")
    parser.add_argument("--faults", type=int, default=200, help="faults to inject in all")
    parser.add_argument("--per-round", type=int, default=25, help="faults per round")
    parser.add_argument("--slices", type=int, default=300, help="slices per round")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument(
        "--hold-minutes",
        type=float,
        default=0.0,
        help="PostgreSQL: after the rounds, one more whose transaction stays idle this long "
        "while job after job runs (issue 17's 'held idle for minutes'); its dead tuples are "
        "reported as 'hold'",
    )
    args = parser.parse_args(argv)
    if args.hold_minutes and args.backend != "postgres":
        parser.error("--hold-minutes needs --backend postgres")
    pg = None
    if args.backend == "postgres":
        pg = postgres.server()
        if pg is None:
            parser.error(postgres.UNAVAILABLE or "no PostgreSQL server")
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    deadline = time.monotonic() + args.minutes * 60
    summary: dict[str, object] = {
        "seed": seed,
        "rounds": 0,
        "faults": 0,
        "deployed": 0,
        "completed": 0,
        "lost": 0,
        "paid_twice": 0,
        "unpaid_done": 0,
        "wrong": 0,
        "books_balance": True,
        "fault_kinds": {},
        "backend": args.backend,
    }
    dead_max: dict[str, int] = {}
    dead_after: dict[str, int] = {}
    worst = idle_held = 0.0
    with tempfile.TemporaryDirectory(prefix="dcp-soak-") as tmp:
        while summary["faults"] < args.faults and time.monotonic() < deadline:  # type: ignore[operator]
            work = Path(tmp) / f"round{summary['rounds']}"
            work.mkdir()
            per = min(args.per_round, args.faults - summary["faults"])  # type: ignore[operator]
            result = run_round(work, rng, args.slices, per, deadline, pg)
            summary["rounds"] += 1  # type: ignore[operator]
            for key in (
                "faults",
                "deployed",
                "completed",
                "lost",
                "paid_twice",
                "unpaid_done",
                "wrong",
            ):
                summary[key] += result[key]  # type: ignore[operator]
            summary["books_balance"] = summary["books_balance"] and result["books_balance"]
            kinds = summary["fault_kinds"]
            for kind, n in result["fault_kinds"].items():  # type: ignore[attr-defined]
                kinds[kind] = kinds.get(kind, 0) + n  # type: ignore[index,attr-defined]
            worst = max([worst, *result["graceful_exits"]])  # type: ignore[list-item]
            idle_held = max(idle_held, float(result["idle_transaction_held_s"]))  # type: ignore[arg-type]
            for table, n in result["dead_tuples"].items():  # type: ignore[attr-defined]
                dead_max[table] = max(dead_max.get(table, 0), n)
            for table, n in result["dead_tuples_after_vacuum"].items():  # type: ignore[attr-defined]
                dead_after[table] = max(dead_after.get(table, 0), n)
            if result["lost"]:
                print(
                    f"round {summary['rounds']}: {result['states']} {result['errors']}",
                    file=sys.stderr,
                )
                for log in sorted(work.glob("worker-*.log"))[-2:]:
                    tail = log.read_text(errors="replace").splitlines()[-8:]
                    print(f"--- {log.name}\n" + "\n".join(tail), file=sys.stderr)
        if pg is not None and args.hold_minutes > 0:
            work = Path(tmp) / "hold"
            work.mkdir()
            held = run_hold(work, rng, args.slices, args.per_round, args.hold_minutes * 60, pg)
            summary["rounds"] += 1  # type: ignore[operator]
            for key in ("faults", "deployed", "completed", "lost", "paid_twice", "unpaid_done"):
                summary[key] += held[key]  # type: ignore[operator]
            summary["wrong"] += held["wrong"]  # type: ignore[operator]
            summary["books_balance"] = summary["books_balance"] and held["books_balance"]
            kinds = summary["fault_kinds"]
            for kind, n in held["fault_kinds"].items():  # type: ignore[attr-defined]
                kinds[kind] = kinds.get(kind, 0) + n  # type: ignore[index,attr-defined]
            worst = max([worst, *held["graceful_exits"]])  # type: ignore[list-item]
            idle_held = max(idle_held, float(held["idle_transaction_held_s"]))  # type: ignore[arg-type]
            summary["hold"] = {
                k: held[k]
                for k in (
                    "jobs",
                    "deployed",
                    "lost",
                    "idle_transaction_held_s",
                    "dead_tuples",
                    "dead_tuples_after_vacuum",
                    "dead_slice_versions",
                    "dead_slice_versions_after_vacuum",
                    "dead_slice_versions_per_slice",
                    "samples",
                )
            }
            if held["lost"]:
                print(f"hold round: {held['states']} {held['errors']}", file=sys.stderr)
    summary["worst_graceful_exit_s"] = round(worst, 2)
    if pg is not None:
        summary["dead_tuples_max"] = dead_max
        summary["dead_tuples_after_vacuum_max"] = dead_after
        # The longest a transaction stayed open, idle, while work flowed (vacuum held back).
        summary["idle_transaction_held_max_s"] = idle_held
    print(json.dumps(summary, sort_keys=True))
    return summary


if __name__ == "__main__":
    outcome = main()
    sys.exit(0 if outcome["lost"] == 0 and outcome["paid_twice"] == 0 else 1)
