"""Faults of the database under a running job, on a PostgreSQL cluster of the test's own (it
is restarted and its roles changed): backends killed, the server restarted, the scheduler's
connections refused, a transaction held open by someone else. After each: every slice done,
each paid once, the books balanced."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from scheduler.client import ComputeClient
from scheduler.store import MICRO, Store, StoreError
from scheduler.store.backends import open_store

from .. import postgres
from ..conftest import QUICK, Keystore, SchedulerProcess, WorkerProcess, wait_for
from ..test_pipeline import ECHO, job_file

ROLE = "dcp"


@pytest.fixture(scope="module")
def server() -> Iterator[postgres.Server]:
    """A server of this module's own: it is restarted and its roles changed."""
    try:
        own = postgres.throwaway(prefix="dcp-pgf-")
    except RuntimeError as exc:
        if postgres.required():
            pytest.fail(f"DCP_REQUIRE_POSTGRES is set: {exc}")
        pytest.skip(str(exc))
    own.admin(f"CREATE ROLE {ROLE} LOGIN")
    yield own
    own.stop()


@pytest.fixture
def cluster(server: postgres.Server) -> postgres.Cluster:
    assert server.cluster is not None
    return server.cluster


@pytest.fixture
def database(
    server: postgres.Server, cluster: postgres.Cluster, request: pytest.FixtureRequest
) -> str:
    """A new database owned by the scheduler's role (not a superuser); its URL as that role."""
    name = "f_" + request.node.name.removeprefix("test_")[:40].replace("-", "_")
    server.admin(f"DROP DATABASE IF EXISTS {name}")
    server.admin(f"CREATE DATABASE {name} OWNER {ROLE}")
    return cluster.url(name).replace(f"{cluster.user}@", f"{ROLE}@")


class Job:
    """A paid echo job of ``n`` slices deployed to ``scheduler``, watched through its own
    store connection (which the faults hit too: a failed read is "not yet")."""

    def __init__(
        self,
        tmp_path: Path,
        db: str,
        scheduler: SchedulerProcess,
        owner: Keystore,
        n: int = 300,
    ) -> None:
        self.store: Store = open_store(db)
        self.store.mint(owner.identity.address, 10 * MICRO, time.time())
        self.values = [f"pg-{i}" for i in range(n)]
        with ComputeClient(scheduler.url, owner.identity) as client:
            self.id = client.deploy(job_file(tmp_path, "echo", ECHO, self.values, offer=0.001))

    def done(self) -> int:
        try:
            return self.store.job(self.id).counts.get("done", 0)
        except StoreError:
            return -1

    def wait_done(self, at_least: int, timeout: float = 90) -> None:
        wait_for(lambda: self.done() >= at_least, timeout)

    def check(self) -> None:
        """Every slice done with its own result, each paid once; the books balance."""
        self.wait_done(len(self.values))
        slices = self.store.slices(self.id, limit=len(self.values))
        assert [s.result for s in slices] == [v.encode() for v in self.values]
        paid = [e.slice for e in self.store.ledger(limit=10**6) if e.kind == "payment"]
        assert sorted(paid) == list(range(len(self.values))), "lost or paid twice"
        totals = self.store.totals()
        assert totals["minted"] == totals["accounts"] + totals["escrow"]
        self.store.close()


def start(db: str, tmp_path: Path) -> SchedulerProcess:
    return SchedulerProcess(db, *QUICK, log=tmp_path / "scheduler.log")


def test_killed_backends_and_a_restarted_server_lose_nothing(
    tmp_path: Path,
    server: postgres.Server,
    cluster: postgres.Cluster,
    database: str,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    scheduler = start(database, tmp_path)
    worker = workers(scheduler.url, make_keystore("worker"), 2)
    try:
        job = Job(tmp_path, database, scheduler, make_keystore("owner"))
        dbname = database.split("?")[0].rsplit("/", 1)[1]
        for at in (20, 60, 100):
            job.wait_done(at)
            assert server.terminate_backends(dbname)  # the scheduler's store and listener, ours
        job.wait_done(140)
        cluster.restart()  # every connection lost; the server back a moment later
        job.check()
    finally:
        assert worker.stop() == 0
        scheduler.stop()
    log = (tmp_path / "scheduler.log").read_text()
    assert "database unavailable" in log or "listening for other replicas" in log


def test_a_refused_connection_holds_work_until_the_database_takes_it_again(
    tmp_path: Path,
    server: postgres.Server,
    cluster: postgres.Cluster,
    database: str,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    """The scheduler's role out of connection slots (another client took them all, or an
    operator's limit): it cannot reconnect after losing its connection; workers are told
    "internal" and retry; nothing is lost, and work resumes once it connects again."""
    scheduler = start(database, tmp_path)
    worker = workers(scheduler.url, make_keystore("worker"), 2)
    try:
        job = Job(tmp_path, database, scheduler, make_keystore("owner"))
        job.store.close()  # its connection would count against the role's limit
        watch = open_store(database.replace(f"{ROLE}@", f"{cluster.user}@"))
        job.store = watch
        job.wait_done(30)
        server.admin(f"ALTER ROLE {ROLE} CONNECTION LIMIT 0")
        server.admin(
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{ROLE}'"
        )
        try:
            wait_for(lambda: "too many connections" in worker_or_log(tmp_path, worker), 30)
            stalled = job.done()
            # An owner is told too, in the API's own terms: unavailable for now, try again.
            answer = httpx.get(f"{scheduler.url}/api/v1/jobs", timeout=10)
            assert answer.status_code == 503 and answer.headers["Retry-After"] == "1"
            assert answer.json()["error"]["code"] == "internal"
            assert "too many connections" in answer.json()["error"]["message"]
        finally:
            server.admin(f"ALTER ROLE {ROLE} CONNECTION LIMIT -1")
        assert stalled < len(job.values), "the job ended before the fault"
        job.check()
    finally:
        assert worker.stop() == 0
        scheduler.stop()


def worker_or_log(tmp_path: Path, worker: WorkerProcess) -> str:
    return worker.output() + (tmp_path / "scheduler.log").read_text()


def test_work_flows_past_a_transaction_held_open_and_vacuum_cleans_after_it(
    tmp_path: Path,
    cluster: postgres.Cluster,
    database: str,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    """Someone's transaction left open (a report, a forgotten psql) holds back vacuum: the
    job goes on at full speed meanwhile, and the dead rows it leaves go once it ends."""
    scheduler = start(database, tmp_path)
    holder_url = database.replace(f"{ROLE}@", f"{cluster.user}@")
    holder = psycopg.connect(holder_url)  # not autocommit: the SELECT opens a transaction
    worker = workers(scheduler.url, make_keystore("worker"), 2)
    try:
        holder.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        holder.execute("SELECT count(*) FROM slices").fetchone()  # its snapshot: held
        job = Job(tmp_path, database, scheduler, make_keystore("owner"))
        job.check()  # the whole job while the transaction is open
        held = dead_slices_after_vacuum(holder_url)
        holder.rollback()
        after = dead_slices_after_vacuum(holder_url)
    finally:
        holder.close()
        assert worker.stop() == 0
        scheduler.stop()
    assert held > 300, held  # every lease and acceptance left a dead version behind
    assert after < held / 10, (held, after)


def dead_slices_after_vacuum(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM slices")
        conn.execute("SELECT pg_stat_clear_snapshot()")
        (dead,) = conn.execute(
            "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'slices'"
        ).fetchone()
        return int(dead)
