"""Two replicas on one PostgreSQL database, as two stores side by side: they lease disjoint
slices, accept a result once, pay once, expire and collect garbage one at a time, and survive
their backends being killed. And the schema's migrations, on both backends."""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from dcp_protocol import Metrics
from scheduler import PostgresStore, Store, StoreError, open_store
from scheduler.store import ResultRow, Settled
from scheduler.store.migrations import LATEST, MIGRATIONS, SET_VERSION, statements
from scheduler.store.postgres import display_url
from tests.conftest import postgres_server, wait_until
from tests.test_bank import check_books
from tests.test_store import PAY, W1, W2, new_job

OWNER = W1


@pytest.fixture
def replicas(pg_db: str) -> Iterator[tuple[PostgresStore, PostgresStore]]:
    a, b = PostgresStore(pg_db), PostgresStore(pg_db)
    yield a, b
    a.close()
    b.close()


def together(*calls: Callable[[], Any]) -> list[Any]:
    """Run ``calls`` in threads released at once; their results (or exceptions) in order."""
    start = threading.Barrier(len(calls))
    out: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        start.wait()
        try:
            out[i] = calls[i]()
        except Exception as exc:  # returned, for the test to look at
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def funded(store: Store, n: int, offer: int = 10, tag: str = "a") -> str:
    store.mint(OWNER, offer * n, 0.0)
    return store.create_job(new_job(n, tag=tag, offer=offer), 0.0)


def row(job: str, idx: int, token: str) -> ResultRow:
    return ResultRow(job, idx, token, b"r", PAY, "00" * 65, Metrics())


def test_replicas_leasing_at_once_take_disjoint_slices(
    replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = replicas
    funded(a, 400)
    got: list[list[Any]] = [[], []]

    def drain(store: PostgresStore, into: list[Any], worker: str) -> None:
        while batch := store.lease(worker, 16, 0.0, 60.0):
            into.extend(batch)

    together(lambda: drain(a, got[0], W1), lambda: drain(b, got[1], W2))
    slices = [x.slice for x in got[0] + got[1]]
    assert sorted(slices) == list(range(400))  # every slice once, none twice
    assert got[0] and got[1]  # both replicas leased: neither waited for the other's locks


def test_one_result_sent_to_both_replicas_is_accepted_and_paid_once(
    replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = replicas
    job = funded(a, 50)
    leases = a.lease(W1, 50, 0.0, 60.0)
    for lease in leases:
        result = row(job, lease.slice, lease.token)
        outcomes = together(
            lambda r=result: a.accept_result(W1, r, 1.0),  # type: ignore[misc]
            lambda r=result: b.accept_result(W1, r, 1.0),  # type: ignore[misc]
        )
        assert sorted(o.status for o in outcomes) == ["accepted", "duplicate"], outcomes
    assert a.balance(PAY) == 50 * 10
    assert a.job(job).state == "finished"
    check_books(a)


def test_batches_in_opposite_orders_do_not_deadlock(
    replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = replicas
    one, two = funded(a, 20, tag="one"), funded(a, 20, tag="two")
    leases = a.lease(W1, 40, 0.0, 60.0)
    rows = [row(x.job, x.slice, x.token) for x in leases]
    forward = a.accept_results
    outcomes = together(
        lambda: forward(W1, rows, 1.0), lambda: b.accept_results(W1, rows[::-1], 1.0)
    )
    for batch in outcomes:
        assert not isinstance(batch, Exception), batch
    accepted = sum(o.status == "accepted" for batch in outcomes for o in batch)
    assert accepted == 40
    assert a.job(one).state == a.job(two).state == "finished"
    check_books(a)


def test_expiry_and_gc_run_in_one_replica_at_a_time(
    replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = replicas
    job = funded(a, 10)
    a.lease(W1, 10, 0.0, 1.0)
    with a._exclusively("expiry") as mine:  # replica a is expiring
        assert mine
        assert b.expire_leases(5.0) == 0
    assert b.expire_leases(5.0) == 10
    a.cancel_job(job, 6.0)
    removed = together(lambda: a.collect_garbage(100.0, 1.0), lambda: b.collect_garbage(100.0, 1.0))
    assert sorted(sum(removed, [])) == [job]  # removed by one, refunded once
    check_books(a)


def test_a_terminated_backend_costs_at_most_one_call(pg_db: str) -> None:
    server = postgres_server()
    store = PostgresStore(pg_db)
    funded(store, 3)
    dbname = pg_db.split("?")[0].rsplit("/", 1)[1]
    assert server.terminate_backends(dbname) >= 1
    # The next transaction finds the connection dead before any of it reached the server
    # and runs on a new one; a read may fail once, as "database unavailable".
    assert len(store.lease(W1, 3, 0.0, 60.0)) == 3
    # Leases and acceptances run in pipeline mode: wherever the death is found (at BEGIN,
    # at the first read), the call runs once on a new connection and says what it did.
    # Found at BEGIN, the answer of the call that succeeded was lost 1 time in 4.
    for round_ in range(8):
        more = funded(store, 2, tag=f"more-{round_}")
        server.terminate_backends(dbname)
        leases = store.lease(W1, 2, 0.0, 60.0, jobs=[more])
        assert len(leases) == 2, round_
        server.terminate_backends(dbname)
        rows = [row(more, x.slice, x.token) for x in leases]
        assert [o.status for o in store.accept_results(W1, rows, 1.0)] == ["accepted"] * 2  # type: ignore[union-attr]
    server.terminate_backends(dbname)
    try:
        store.job_state(store.list_jobs()[0].id)
    except StoreError as exc:
        assert "database unavailable" in str(exc)
    assert store.list_jobs()[0].counts == {"leased": 3}
    store.close()


def test_an_unreachable_server_is_a_store_error_naming_it_without_its_password() -> None:
    url = "postgresql://dcp:s3cret@127.0.0.1:1/nowhere?connect_timeout=1"
    with pytest.raises(StoreError) as caught:
        PostgresStore(url, connect_timeout=1)
    assert "cannot connect to postgresql://dcp@127.0.0.1:1/nowhere" in str(caught.value)
    assert "s3cret" not in str(caught.value)
    assert display_url(url) == "postgresql://dcp@127.0.0.1:1/nowhere"


def test_one_deploy_sent_to_both_replicas_is_one_job_escrowed_once(
    replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = replicas
    a.mint(OWNER, 1000, 0.0)
    for tag in ("x", "y", "z"):
        ids = together(
            lambda: a.create_job(new_job(10, tag=tag, offer=10), 0.0),  # noqa: B023
            lambda: b.create_job(new_job(10, tag=tag, offer=10), 0.0),  # noqa: B023
        )
        assert ids[0] == ids[1] and isinstance(ids[0], str), ids
    assert a.balance(OWNER) == 1000 - 3 * 100
    check_books(a)


def test_a_replica_starting_extends_only_the_leases_no_replica_expired(
    replicas: tuple[PostgresStore, PostgresStore],
) -> None:
    """A lone scheduler's restart gives every lease one more timeout; a replica's start must
    not postpone the expiry of leases the running replicas hold for dead workers."""
    a, _b = replicas
    funded(a, 2)
    a.lease(W1, 1, 0.0, 5.0)  # overdue at 20: held while no replica ran
    a.lease(W2, 1, 0.0, 30.0)  # still running at 20
    assert a.extend_leases(35.0, 20.0) == 1
    assert a.expire_leases(31.0) == 1  # W2's, at its own deadline
    assert a.expire_leases(36.0) == 1


# ---------------------------------------------------------------------- migrations


def at_version_4(db: str) -> None:
    """Make ``db`` a database of the first versioned schema, as a release before this one
    left it."""
    first = MIGRATIONS[0]
    meta = "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
    if db.startswith("postgresql"):
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute(meta)
            conn.execute(first.postgres)
            conn.execute(SET_VERSION.replace("?", "%s"), (str(first.version),))
    else:
        conn = sqlite3.connect(db)
        conn.execute(meta)
        for statement in statements(first.sqlite):
            conn.execute(statement)
        conn.execute(SET_VERSION, (str(first.version),))
        conn.commit()
        conn.close()


def test_an_empty_database_gets_every_migration(db: str) -> None:
    store = open_store(db)
    assert store.schema_version() == LATEST
    assert [m.version for m in store.applied] == [m.version for m in MIGRATIONS]
    store.close()
    again = open_store(db)
    assert again.applied == ()
    again.close()


def test_an_older_database_is_refused_until_upgraded(db: str) -> None:
    at_version_4(db)
    with pytest.raises(StoreError, match="dcp-scheduler db upgrade"):
        open_store(db)
    store = open_store(db, upgrade=True)
    assert [m.version for m in store.applied] == list(range(5, LATEST + 1))
    assert store.schema_version() == LATEST
    job = store.create_job(new_job(2), 0.0)  # and it works
    assert len(store.lease(W1, 2, 0.0, 1.0)) == 2
    assert store.expire_leases(2.0) == 2
    assert store.job(job).counts == {"queued": 2}
    store.close()


def test_a_newer_database_is_refused(db: str) -> None:
    store = open_store(db)
    store.close()
    if db.startswith("postgresql"):
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute("UPDATE meta SET value='999' WHERE key='schema_version'")
    else:
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE meta SET value='999' WHERE key='schema_version'")
    with pytest.raises(StoreError, match="newer than this scheduler"):
        open_store(db, upgrade=True)


# ---------------------------------------------------------------------- wake-ups


def test_replicas_wake_each_other_by_notify_and_coalesce_bursts(pg_db: str) -> None:
    asyncio.run(wake_each_other(pg_db))


async def wake_each_other(pg_db: str) -> None:
    a_store, b_store = PostgresStore(pg_db), PostgresStore(pg_db)
    heard_by_a: list[str | None] = []
    heard_by_b: list[str | None] = []
    a = a_store.notifier(("dcp_work", "dcp_results"), heard_by_a.append)
    b = b_store.notifier(("dcp_work", "dcp_results"), heard_by_b.append)
    listening = [asyncio.create_task(a.listen()), asyncio.create_task(b.listen())]
    try:
        await wait_until(lambda: heard_by_a == [None] and heard_by_b == [None], 10)
        for _ in range(50):  # a burst of acceptances: one NOTIFY now, one at the interval's end
            a.publish("dcp_results")
        a.publish("dcp_work")
        await wait_until(lambda: heard_by_b.count("dcp_results") == 2, 10)
        await wait_until(lambda: "dcp_work" in heard_by_b, 10)
        assert a.sent == 3 and b.received == 3
        # Notifications arrive in commit order: once a hears one b sent after all of a's,
        # a would have heard its own by then.
        b.publish("dcp_work")
        await wait_until(lambda: "dcp_work" in heard_by_a, 10)
        assert heard_by_a == [None, "dcp_work"]  # its own notifications are not news to it
    finally:
        for task in listening:
            task.cancel()
        await asyncio.gather(*listening, return_exceptions=True)
        a_store.close()
        b_store.close()


def test_a_write_failing_mid_batch_fails_the_whole_batch_and_changes_nothing(pg_db: str) -> None:
    """Acceptance runs in pipeline mode: the error of a write arrives after later items were
    sent. The batch then fails as one (StoreError), with nothing of it kept; sent again once
    the fault is gone, every result is accepted and paid once."""
    store = PostgresStore(pg_db)
    job = funded(store, 6)
    leases = store.lease(W1, 6, 0.0, 60.0)
    rows = [row(job, x.slice, x.token) for x in leases]
    with psycopg.connect(pg_db, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN IF NEW.slice = 3 THEN RAISE EXCEPTION 'disk on fire'; END IF;"
            " RETURN NEW; END $$"
        )
        conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON ledger FOR EACH ROW EXECUTE FUNCTION refuse()"
        )
        with pytest.raises(StoreError, match="disk on fire"):
            store.accept_results(W1, rows, 1.0)
        assert store.job(job).counts == {"leased": 6} and store.balance(PAY) == 0
        conn.execute("DROP TRIGGER refuse ON ledger")
    outcomes = store.accept_results(W1, rows, 2.0)
    assert [o.status for o in outcomes] == ["accepted"] * 6  # type: ignore[index]
    assert store.balance(PAY) == 60 and store.job(job).state == "finished"
    check_books(store)
    store.close()


def test_the_queue_is_read_through_its_index_whatever_the_statistics_say(pg_db: str) -> None:
    """The lease and the active-jobs probe, planned when the statistics still say every
    slice is queued (the last ANALYZE ran at deploy) and most are finished: each reads a few
    index entries, not the finished slices (schema 6's ``slices_queue``)."""
    from scheduler.store.sql import ACTIVE_JOBS, QUEUED_OF_JOB

    store = PostgresStore(pg_db)
    job = store.create_job(new_job(20_000), 0.0)
    store.close()
    with psycopg.connect(pg_db, autocommit=True) as conn:
        conn.execute("ALTER TABLE slices SET (autovacuum_enabled = false)")
        conn.execute("ANALYZE slices")
        conn.execute("UPDATE slices SET state='done' WHERE idx < 15000")
        conn.execute("VACUUM slices")  # the dead versions gone: what is read is what is live

        read = QUEUED_OF_JOB + " FOR UPDATE OF s SKIP LOCKED"
        assert rows_read(conn, read, (job, W1, 1)) < 10
        assert rows_read(conn, ACTIVE_JOBS.format(columns="id")) < 10


def rows_read(conn: psycopg.Connection[Any], sql: str, params: tuple[object, ...] = ()) -> int:
    """The rows ``sql`` reads, by its plan run (EXPLAIN ANALYZE): those returned by each node
    and those its filters removed."""
    from scheduler.store.postgres import _dialect

    conn.execute("BEGIN")
    try:
        (plan,) = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + _dialect(sql), params).fetchone()  # type: ignore[misc]
    finally:
        conn.execute("ROLLBACK")
    nodes, read = [plan[0]["Plan"]], 0
    while nodes:
        node = nodes.pop()
        read += node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0)
        nodes.extend(node.get("Plans", []))
    return int(read)


def test_a_large_job_deployed_after_the_statistics_is_settled_by_its_key(pg_db: str) -> None:
    """The statistics were taken before the job existed (autovacuum has not come round): an
    acceptance batch's locked read of 64 of its slices reads about those 64, not every slice
    of the job. The deploy took the statistics again (PostgresStore.create_job); without them,
    the planner took the new job for a few rows and scanned all of them by the key's first
    column (20,000 rows here; a million for a job of a million)."""
    from scheduler.store.postgres import ANALYZE_AT
    from scheduler.store.sql import SLICES_TO_SETTLE

    with psycopg.connect(pg_db, autocommit=True) as conn:
        PostgresStore(pg_db).close()  # the schema
        for table in ("slices", "slice_data"):
            conn.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
        store = PostgresStore(pg_db)
        store.create_job(new_job(10, tag="small"), 0.0)
        conn.execute("ANALYZE slices, slice_data")  # the statistics know the small job only
        # Large enough that a scan of the job's rows costs more than probing the key (on a
        # table of 2,000 rows, a sequential scan is the plan whatever the statistics say).
        n = 20_000
        assert n >= ANALYZE_AT
        job = store.create_job(new_job(n, tag="large"), 0.0)
        store.close()
        keys = tuple(range(1000, 1064))
        sql = SLICES_TO_SETTLE.format(marks=", ".join("?" * len(keys))) + " FOR UPDATE OF s"
        # Each of the plan's nodes counts the 64 rows it passes on; a scan reads 20,000.
        assert rows_read(conn, sql, (job, *keys)) < 10 * len(keys)


def test_a_role_without_create_serves_a_database_its_owner_migrated(pg_db: str) -> None:
    """docs/operations.md's two roles: the owner runs ``db upgrade``; the serving role, with
    row privileges only (no CREATE on the schema), opens the store and works; on an older
    schema it is refused with what to run, not with a permission error."""
    server = postgres_server()
    if server.cluster is None:
        pytest.skip("logging in as a new role needs this suite's own (trust) cluster")
    role = f"dcp_serve_{secrets.token_hex(4)}"
    PostgresStore(pg_db).close()  # migrated by its owner
    server.admin(f"CREATE ROLE {role} LOGIN")
    try:
        with psycopg.connect(pg_db, autocommit=True) as conn:
            for grant in (
                f"REVOKE CREATE ON SCHEMA public FROM PUBLIC, {role}",
                f"GRANT USAGE ON SCHEMA public TO {role}",
                f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}",
                f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {role}",
            ):
                conn.execute(grant)
        serving_url = pg_db.replace(f"//{server.cluster.user}@", f"//{role}@", 1)
        assert serving_url != pg_db
        store = PostgresStore(serving_url)
        assert store.applied == ()
        job = store.create_job(new_job(2), 0.0)
        assert len(store.lease(W1, 2, 0.0, 5.0)) == 2 and store.job(job).counts == {"leased": 2}
        # A deploy large enough to ANALYZE after it: a role that may not is skipped by the
        # server (a warning), and the job is deployed all the same.
        from scheduler.store.postgres import ANALYZE_AT

        large = store.create_job(new_job(ANALYZE_AT, tag="large"), 0.0)
        assert store.job(large).counts == {"queued": ANALYZE_AT}
        store.close()
        with psycopg.connect(pg_db, autocommit=True) as conn:
            conn.execute(f"UPDATE meta SET value='{LATEST - 1}' WHERE key='schema_version'")
        with pytest.raises(StoreError, match="dcp-scheduler db upgrade"):
            PostgresStore(serving_url)
    finally:
        with psycopg.connect(pg_db, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}")  # its privileges
        server.admin(f"DROP ROLE {role}")


@pytest.mark.parametrize("busy_timeout", [0.0, 0.05])
def test_the_busy_timeout_bounds_a_wait_for_a_row_lock(pg_db: str, busy_timeout: float) -> None:
    """``--db-busy-timeout`` is PostgreSQL's lock_timeout (0 too: the shortest wait, never
    "wait for ever"): a result for a slice that a psql session holds fails as a database
    error naming the lock, and goes through once the lock is gone."""
    store = open_store(pg_db, busy_timeout=busy_timeout)
    assert isinstance(store, PostgresStore)
    (setting,) = store._db.execute("SHOW lock_timeout").fetchone()
    assert setting == {0.0: "1ms", 0.05: "50ms"}[busy_timeout]
    job = store.create_job(new_job(1), 0.0)
    (lease,) = store.lease(W1, 1, 0.0, 60.0)
    row = ResultRow(job, 0, lease.token, b"r", PAY, "00" * 65, Metrics())
    with psycopg.connect(pg_db) as holder:
        holder.execute("SELECT 1 FROM slices WHERE job=%s FOR UPDATE", (job,))
        with pytest.raises(StoreError, match="lock timeout"):
            store.accept_results(W1, [row], 1.0)
    assert store.accept_results(W1, [row], 1.0) == [Settled("accepted", 0)]
    store.close()


def _as_schema_8(db: str) -> None:
    """Put ``db`` (at the latest schema) back as schema 8 left it: each slice's datum in its
    row, a replica's a copy of its input's, and no slice_data."""
    copy = (
        "UPDATE slices SET datum = (SELECT d.datum FROM slice_data d WHERE d.job = slices.job"
        " AND d.idx = coalesce(slices.replica_of, slices.idx))"
    )
    if db.startswith("postgresql"):
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute("ALTER TABLE slices ADD COLUMN datum BYTEA NOT NULL DEFAULT ''::bytea")
            conn.execute(copy)
            conn.execute("DROP TABLE slice_data")
            conn.execute("UPDATE meta SET value='8' WHERE key='schema_version'")
    else:
        with sqlite3.connect(db) as conn:
            conn.execute("ALTER TABLE slices ADD COLUMN datum BLOB NOT NULL DEFAULT x''")
            conn.execute(copy)
            conn.execute("DROP TABLE slice_data")
            conn.execute("UPDATE meta SET value='8' WHERE key='schema_version'")
        conn.close()


def test_schema_9_moves_the_datums_out_of_the_slice_rows_and_keeps_them(db: str) -> None:
    """Schema 9 (slice_data): a database of schema 8, with plain slices and replicated ones,
    upgrades and leases every slice with its own datum, a replica with its input's."""
    from tests.test_redundancy import replicated

    store = open_store(db)
    plain = store.create_job(new_job(3, tag="plain"), 0.0)
    store.mint(replicated().owner, 10**9, 0.0)
    voted = store.create_job(replicated(2, tag="voted"), 0.0)
    store.close()
    _as_schema_8(db)
    store = open_store(db, upgrade=True)
    try:
        assert [m.version for m in store.applied] == [9]
        got: dict[tuple[str, int], bytes] = {}
        for worker in (W1, W2):
            for lease in store.lease(worker, 100, 1.0, 60.0):
                got[(lease.job, lease.slice)] = lease.datum
        assert {k: v for k, v in got.items() if k[0] == plain} == {
            (plain, i): f"d{i}".encode() for i in range(3)
        }
        replicas = {k: v for k, v in got.items() if k[0] == voted}
        assert sorted(replicas.values()) == [b"d0", b"d0", b"d1", b"d1"]  # two replicas each
        for (job, idx), datum in replicas.items():
            assert store.datum(job, idx) == datum
    finally:
        store.close()
