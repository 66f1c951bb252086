"""Shared helpers of the benchmarks: the schedulers under test (SQLite, or PostgreSQL with one
or more replicas), the pipeline, medians, the final JSON line, result files."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
ECHO = ROOT / "examples" / "echo" / "echo.wasm"
BIN = Path(sys.executable).parent

sys.path.insert(0, str(ROOT))

from dcp_keys.identity import Identity, create_keystore  # noqa: E402
from dcp_protocol import Metrics, Result, SliceLease, signing  # noqa: E402
from scheduler.client import ComputeClient  # noqa: E402
from scheduler.local import LocalScheduler  # noqa: E402
from tests.postgres import Server, throwaway  # noqa: E402

#: The benchmark cluster's settings over tests/postgres.py's: statement counts on, and the
#: durability of the SQLite store it is compared with (WAL, synchronous=NORMAL: a commit does
#: not wait for its flush, the files are still synced at checkpoints).
BENCH_SETTINGS = {
    "shared_preload_libraries": "'pg_stat_statements'",
    "pg_stat_statements.track": "all",
    "fsync": "on",
    "full_page_writes": "on",
    "synchronous_commit": "off",
}


if os.environ.get("DCP_BENCH_PROFILE"):
    # The processes started from here import profiling/sitecustomize.py, which profiles the
    # schedulers among them.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(
            None, [str(Path(__file__).resolve().parent / "profiling"), os.environ.get("PYTHONPATH")]
        )
    )


class BackendUnavailable(RuntimeError):
    """No PostgreSQL server for the benchmark: the message says why."""


_server: Server | None = None


def postgres_server() -> Server:
    """This process's PostgreSQL: the server ``DCP_TEST_POSTGRES`` names, or a throwaway
    cluster of tests/postgres.py with :data:`BENCH_SETTINGS`, stopped at exit.

    Raises:
        BackendUnavailable: no server could be started (no binaries, no postgres user).
    """
    global _server
    if _server is not None:
        return _server
    url = os.environ.get("DCP_TEST_POSTGRES")
    if url:
        _server = Server(url)
        return _server
    try:
        _server = throwaway(BENCH_SETTINGS, prefix="dcp-bench-pg-")
    except RuntimeError as exc:
        raise BackendUnavailable(str(exc)) from None
    with contextlib.suppress(Exception):  # statement counts are a bonus, not a requirement
        _server.admin("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    return _server


@dataclass(frozen=True)
class Backend:
    """The schedulers under test: one on SQLite, or ``replicas`` on one PostgreSQL database.

    :meth:`start` is the scheduler factory of :func:`pipeline` and the other benchmarks."""

    kind: str  # "sqlite" or "postgres"
    replicas: int = 1
    #: ``serve`` options every replica gets (e.g. ``--peer-wakeups poll:1``).
    extra: tuple[str, ...] = field(default=())

    @property
    def name(self) -> str:
        return "sqlite" if self.kind == "sqlite" else f"postgres_{self.replicas}r"

    @contextmanager
    def start(self, work: Path, *extra: str) -> Iterator[Schedulers]:
        """Start the scheduler(s) under ``work``; stop them (SIGINT) after.

        Raises:
            BackendUnavailable: PostgreSQL was asked for and there is none.
        """
        work.mkdir(parents=True, exist_ok=True)
        db = str(work / "s.db")
        if self.kind == "postgres":
            db = postgres_server().create_database("bench")
        started: list[LocalScheduler] = []
        try:
            # One after the other: the first creates the schema, the others find it.
            for _ in range(self.replicas):
                started.append(LocalScheduler(db, *self.extra, *extra, state_dir=work))
            yield Schedulers(self, db, started)
        finally:
            for sched in started:
                sched.stop(30)


@dataclass
class Schedulers:
    """Running replicas of one backend (one for SQLite) and the database they share."""

    backend: Backend
    db: str
    replicas: list[LocalScheduler]

    @property
    def url(self) -> str:
        return self.replicas[0].url

    @property
    def dbname(self) -> str:
        return self.db.split("?", 1)[0].rsplit("/", 1)[1]

    def statements(self) -> dict[str, int]:
        """PostgreSQL's counts for this database so far, empty on SQLite: ``statements``, the
        statements run (pg_stat_statements, counted at once; 0 without it), leaving out
        BEGIN, COMMIT and SAVEPOINT once psycopg has prepared them; ``xact_commit``,
        transactions committed (pg_stat_database: a busy backend reports it within about a
        second, an idle one within 10 s, so only deltas over long windows are exact);
        ``wal_bytes``, the server's WAL position (all databases)."""
        if self.backend.kind != "postgres" or _server is None:
            return {}
        ((commits, wal),) = _server.admin(
            "SELECT xact_commit, pg_current_wal_lsn() - '0/0'::pg_lsn FROM pg_stat_database"
            " WHERE datname = %s",
            (self.dbname,),
        )
        calls = 0
        with contextlib.suppress(Exception):  # no pg_stat_statements (someone else's server)
            ((calls,),) = _server.admin(
                "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements s"
                " JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = %s",
                (self.dbname,),
            )
        return {
            "statements": int(str(calls)),
            "xact_commit": int(str(commits)),
            "wal_bytes": int(float(str(wal))),
        }

    def top_statements(self, limit: int = 25) -> list[tuple[int, float, str]]:
        """pg_stat_statements' busiest statements on this database: calls, total ms, text."""
        if self.backend.kind != "postgres" or _server is None:
            return []
        dbname = self.dbname
        rows = _server.admin(
            "SELECT calls, total_exec_time, query FROM pg_stat_statements s"
            " JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = %s"
            " ORDER BY calls DESC LIMIT %s",
            (dbname, limit),
        )
        return [(int(str(c)), float(str(t)), str(q)) for c, t, q in rows]


SQLITE = Backend("sqlite")


def backends(choice: str, replicas: str) -> list[Backend]:
    """``--backend sqlite|postgres|both`` and ``--replicas 1,2`` (for PostgreSQL) as the
    backends to run, SQLite first (the peer the others are divided by)."""
    out = [SQLITE] if choice in ("sqlite", "both") else []
    if choice in ("postgres", "both"):
        out += [Backend("postgres", int(n)) for n in replicas.split(",")]
    return out


def add_backend_options(parser: Any, backend: str = "sqlite", replicas: str = "1") -> None:
    """The ``--backend`` and ``--replicas`` options of the benchmarks that run on both."""
    parser.add_argument("--backend", choices=("sqlite", "postgres", "both"), default=backend)
    parser.add_argument(
        "--replicas",
        default=replicas,
        help="PostgreSQL replicas on one database, a comma-separated list (e.g. 1,2)",
    )


@dataclass
class Pipeline:
    """Local scheduler replicas, one worker per replica as real processes, and a job owner's
    client (talking to the first replica)."""

    work: Path
    schedulers: Schedulers
    workers: list[subprocess.Popen[bytes]]
    client: ComputeClient
    deployed: int = 0

    @property
    def scheduler(self) -> LocalScheduler:
        """The first replica (the only one on SQLite)."""
        return self.schedulers.replicas[0]

    @property
    def worker(self) -> subprocess.Popen[bytes]:
        """The first worker (the only one with one replica)."""
        return self.workers[0]

    def echo(self, values: list[str]) -> float:
        """Deploy an echo job over ``values``, read every result back, check them; seconds
        from the deploy to the last result."""
        self.deployed += 1
        # The values go in a data file (one per line), as a user with much data would give
        # them: a 32 MB TOML list cost the client 4 s of parsing before anything was deployed.
        data = self.work / f"job{self.deployed}.txt"
        data.write_text("".join(f"{v}\n" for v in values))
        job_toml = self.work / f"job{self.deployed}.toml"
        job_toml.write_text(f'module = "{ECHO}"\n[inputs]\nfile = "{data}"\n')
        started = time.perf_counter()
        job = self.client.deploy(job_toml)
        results = list(self.client.results(job, wait=True, timeout=600))
        elapsed = time.perf_counter() - started
        assert [r.result for r in results] == [v.encode() for v in values]
        return elapsed


def _start_worker(
    work: Path, name: str, urls: list[str], sandboxes: int, *worker_args: str
) -> subprocess.Popen[bytes]:
    create_keystore(work / f"{name}.json", b"bench", iterations=1024)
    return subprocess.Popen(
        [
            str(BIN / "dcp-worker"),
            *(arg for url in urls for arg in ("--scheduler", url)),
            "--identity",
            str(work / f"{name}.json"),
            "--passphrase-file",
            str(work / "pw"),
            "--sandboxes",
            str(sandboxes),
            "--state-dir",
            str(work / f"state-{name}"),
            "-o",
            "console",  # plain logs, even on a terminal
            *worker_args,
        ]
    )


@contextmanager
def pipeline(
    work: Path, sandboxes: int, *worker_args: str, backend: Backend = SQLITE
) -> Iterator[Pipeline]:
    """Start a :class:`Pipeline` under ``work``; stop every process with SIGINT after.

    With R replicas there are R workers, the ``sandboxes`` shared out among them (at least one
    each), worker i given every replica's URL starting with replica i: a worker holds one
    session, on the first URL that answers, so one worker given all the URLs would load the
    first replica only. Failover still has somewhere to go."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "pw").write_text("bench\n")
    owner = create_keystore(work / "owner.json", b"bench", iterations=1024)
    workers: list[subprocess.Popen[bytes]] = []
    with backend.start(work) as scheds:
        urls = [s.url for s in scheds.replicas]
        share = [sandboxes // len(urls) + (i < sandboxes % len(urls)) for i in range(len(urls))]
        try:
            for i in range(len(urls)):
                workers.append(
                    _start_worker(
                        work,
                        f"worker{i}",
                        urls[i:] + urls[:i],
                        max(1, share[i]),
                        *worker_args,
                    )
                )
            with ComputeClient(scheds.url, owner) as client:
                yield Pipeline(work, scheds, workers, client)
        finally:
            for worker in workers:
                worker.send_signal(signal.SIGINT)
            for worker in workers:
                worker.wait(60)


def dask_map_rates(
    fn: Callable[[Any], Any],
    inputs_of: Callable[[int], list[Any]],
    sandboxes: int,
    rounds: int,
) -> list[float]:
    """The peer: Dask distributed's LocalCluster with ``sandboxes`` single-threaded worker
    processes mapping ``fn`` over ``inputs_of(i)`` in round i (each result checked against
    ``fn`` here); items per second of rounds 1..R (round 0 warms up).

    Raises:
        ImportError: dask[distributed] is not installed.
    """
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
            items = inputs_of(i)
            started = time.perf_counter()
            out = client.gather(client.map(fn, items, pure=False))
            elapsed = time.perf_counter() - started
            assert out == [fn(x) for x in items]
            if i:
                rates.append(len(items) / elapsed)
    return rates


def median(values: list[float]) -> float:
    return statistics.median(values)


def per_slice(step: Callable[[], object], slices: int, reps: int) -> float:
    """Median seconds per slice of ``step``, which handles ``slices`` slices a call (one call
    first, untimed, to warm it)."""
    step()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        step()
        times.append((time.perf_counter() - started) / slices)
    return median(times)


def ms(seconds: float) -> float:
    """Seconds as milliseconds, for the JSON line."""
    return round(1000 * seconds, 3)


def us(seconds: float) -> float:
    """Seconds as microseconds, for the JSON line."""
    return round(1e6 * seconds, 1)


def machine() -> dict[str, Any]:
    import os

    return {
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }


def report(name: str, figures: dict[str, Any], save: bool) -> None:
    """Print the figures as the last line (JSON); keep a copy under results/ unless quick."""
    figures = {
        "benchmark": name,
        **figures,
        "machine": machine(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    line = json.dumps(figures, sort_keys=True)
    if save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{name}.json").write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    print(line)


def signed_result(
    identity: Identity, lease: SliceLease, result: bytes, metrics: Metrics
) -> partial[Result]:
    """The ``result`` frame a simulated worker sends for ``lease``, signed by ``identity`` and
    paid to its own address, as ``Session.request`` takes it (given its request id)."""
    payload = signing.result_payload(lease.job, lease.slice, lease.token, result, identity.address)
    return partial(
        Result,
        job=lease.job,
        slice=lease.slice,
        token=lease.token,
        result=result,
        payment_address=identity.address,
        signature=identity.sign(payload),
        metrics=metrics,
    )
