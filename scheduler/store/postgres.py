"""The PostgreSQL store: several scheduler replicas on one database.

The statements are scheduler/store/sql.py's, run through psycopg 3 on one connection per
replica (in autocommit, each public method one explicit transaction at READ COMMITTED). What
makes replicas safe side by side:

- rows a transaction reads and then changes are locked (``FOR UPDATE``): two replicas taking
  the same result both read the slice, the second after the first committed, and it finds the
  slice done (``duplicate``), never paid twice;
- work is claimed with ``FOR UPDATE SKIP LOCKED``: replicas leasing at once take different
  slices instead of queueing behind each other's locks;
- lease expiry and garbage collection run in one replica at a time (a session advisory lock,
  :meth:`PostgresStore._exclusively`), and what they change is locked row by row as well;
- the connection's ``statement_timeout``, ``lock_timeout`` and
  ``idle_in_transaction_session_timeout`` bound how long a call can stall a replica's event
  loop or keep vacuum from cleaning.

A broken connection (a restarted server, a terminated backend) fails the call in progress with
:class:`StoreError` ("database unavailable", as SQLite's locked database does) and is replaced
by the next call; a transaction that failed before any of it reached the server is retried once
on a new connection.

Parked fetches and long-polled reads are woken across replicas by LISTEN/NOTIFY
(:class:`Notifier`): a replica that made work available or results final notifies the others,
at most once per :data:`NOTIFY_INTERVAL` per channel, as NOTIFY takes a database-wide lock at
commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import secrets
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar, cast

import psycopg
import psycopg.conninfo
import psycopg.errors

from . import CallRunner, DatabaseError, Lease, NewJob, ResultRow, Settled, StoreError
from .dbapi import Connection
from .migrations import META, SET_VERSION, Migration, SchemaError, pending
from .sql import SQLStore

__all__ = ["NOTIFY_INTERVAL", "Notifier", "PostgresStore", "display_url"]

log = logging.getLogger(__name__)

#: Advisory lock keys (one 64-bit space per database): "dcp" and a number.
_LOCKS = {"migrate": 0x646370_01, "expiry": 0x646370_02, "gc": 0x646370_03}
#: At most one NOTIFY per channel and replica in this many seconds.
NOTIFY_INTERVAL = 0.02
#: A deploy of at least this many slices brings the slice tables' statistics up to date
#: (:meth:`PostgresStore.create_job`).
ANALYZE_AT = 1000


_T = TypeVar("_T")

#: What ends a transaction of ours and nothing more: the server rolled it back to break a
#: deadlock. Running it again is safe. (A wait past ``lock_timeout`` is not run again: the
#: lock is held elsewhere, and ``--db-busy-timeout`` promises the refusal after that long.)
_ROLLED_BACK = (psycopg.errors.DeadlockDetected,)
#: Runs of one call that the server rolled back so, before its error is the caller's.
ATTEMPTS = 3


def _rolled_back(exc: BaseException) -> bool:
    return isinstance(exc, _ROLLED_BACK) or isinstance(exc.__cause__, _ROLLED_BACK)


def display_url(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unparsable URL)"
    user = f"{info['user']}@" if info.get("user") else ""
    host = str(info.get("host", ""))
    port = f":{info['port']}" if info.get("port") else ""
    where = f"{host}{port}" if not host.startswith("/") else f"[{host}]{port}"
    return f"postgresql://{user}{where}/{info.get('dbname', '')}"


@functools.lru_cache(maxsize=512)
def _dialect(sql: str) -> str:
    """sql.py's statements for psycopg: ``%s`` placeholders, no SQLite index hints."""
    return re.sub(r" INDEXED BY \w+", "", sql).replace("?", "%s")


class _Connection:
    """sqlite3.Connection's shape (execute, executemany) over a psycopg connection; a
    database error is a StoreError, but a duplicate key stays itself (UNIQUE_VIOLATION)."""

    def __init__(self, raw: psycopg.Connection[Any]) -> None:
        self.raw = raw
        #: The transaction under way has sent its COMMIT (from then on it may have happened).
        self.committing = False

    def execute(self, sql: str, params: Any = ()) -> Any:
        try:
            return self.raw.execute(_dialect(sql), params or None)
        except psycopg.errors.UniqueViolation:
            raise
        except psycopg.Error as exc:
            raise DatabaseError(f"database unavailable: {exc}".strip()) from exc

    def executemany(self, sql: str, params: Iterable[Any]) -> None:
        rows = list(params)
        if not rows:
            return
        try:
            with self.raw.cursor() as cur:
                cur.executemany(_dialect(sql), rows)
        except psycopg.Error as exc:
            raise DatabaseError(f"database unavailable: {exc}".strip()) from exc


class PostgresStore(SQLStore):
    """:class:`scheduler.store.Store` on a PostgreSQL database, shared by replicas."""

    LOCK = " FOR UPDATE"
    SKIP_LOCKED = " SKIP LOCKED"
    GREATEST = "greatest"
    UNIQUE_VIOLATION = (psycopg.errors.UniqueViolation,)

    def __init__(
        self,
        url: str,
        upgrade: bool = False,
        connect_timeout: float = 5.0,
        statement_timeout: float = 10.0,
        lock_timeout: float = 5.0,
        idle_in_transaction_timeout: float = 60.0,
        *,
        migrate: bool = True,
    ) -> None:
        """``statement_timeout``, ``lock_timeout``: the longest one statement runs, or
        waits for a row another transaction holds, before the call fails (StoreError);
        ``idle_in_transaction_timeout``: the server ends a session of ours whose transaction
        was left open longer (none should be). ``upgrade``: as SQLiteStore's. ``migrate``
        false: the schema is not looked at, nor a connection opened until the first call
        (:meth:`sibling`)."""
        super().__init__()
        self._settings = (
            connect_timeout,
            statement_timeout,
            lock_timeout,
            idle_in_transaction_timeout,
        )
        self.url = url
        self.where = display_url(url)
        options = " ".join(
            (
                # 0 means "no limit" to PostgreSQL: the shortest wait is 1 ms, as SQLite's 0.
                f"-c statement_timeout={max(1, int(statement_timeout * 1000))}",
                f"-c lock_timeout={max(1, int(lock_timeout * 1000))}",
                f"-c idle_in_transaction_session_timeout={int(idle_in_transaction_timeout * 1000)}",
            )
        )
        self._connect_timeout = max(1, round(connect_timeout))
        self._options = options
        self._conn: _Connection | None = None
        self.applied: tuple[Migration, ...] = ()
        if not migrate:
            return
        try:
            self.applied = self._migrate(upgrade)
        except SchemaError as exc:
            self.close()
            raise StoreError(str(exc)) from None

    poolable = True

    def sibling(self) -> PostgresStore:
        """A store on the same database and with the same limits, on a connection of its
        own (opened by its first call)."""
        return PostgresStore(self.url, False, *self._settings, migrate=False)

    # ------------------------------------------------------------------ connection

    def _connection(self) -> _Connection:
        conn = self._conn
        if conn is not None and not conn.raw.closed and not conn.raw.broken:
            return conn
        self._conn = None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.raw.close()
        try:
            raw = psycopg.connect(
                self.url,
                autocommit=True,
                connect_timeout=self._connect_timeout,
                options=self._options,
                application_name="dcp-scheduler",
            )
        except psycopg.Error as exc:
            text = str(exc).strip()
            reason = text.splitlines()[-1] if text else type(exc).__name__
            raise DatabaseError(
                f"database unavailable: cannot connect to {self.where}: {reason}"
            ) from None
        self._conn = _Connection(raw)
        return self._conn

    @property
    def _db(self) -> _Connection:
        return self._connection()

    @contextmanager
    def _tx(self) -> Iterator[_Connection]:
        db = self._begin()
        try:
            yield db
            db.committing = True
            db.execute("COMMIT")
        except psycopg.errors.UniqueViolation as exc:
            self._rollback(db)
            raise DatabaseError(f"conflict: {exc}".strip()) from exc
        except BaseException:
            self._rollback(db)
            raise

    def _begin(self) -> _Connection:
        """BEGIN on the connection, or on a new one if that one was found broken: nothing
        of the transaction had reached the server, so it is safe to try once more."""
        db = self._connection()
        try:
            db.execute("BEGIN")
        except StoreError:
            if not db.raw.broken and not db.raw.closed:
                raise
            db = self._connection()
            db.execute("BEGIN")
        return db

    @staticmethod
    def _rollback(db: _Connection) -> None:
        if db.raw.broken or db.raw.closed:
            return
        with contextlib.suppress(StoreError, psycopg.Error):
            db.execute("ROLLBACK")

    @contextmanager
    def _exclusively(self, what: str) -> Iterator[bool]:
        """A session advisory lock: released at the block's end, or by the server when the
        connection dies (so a killed replica never keeps it)."""
        db = self._connection()
        (mine,) = db.execute("SELECT pg_try_advisory_lock(?)", (_LOCKS[what],)).fetchone()
        try:
            yield bool(mine)
        finally:
            if mine:
                with contextlib.suppress(StoreError):
                    db.execute("SELECT pg_advisory_unlock(?)", (_LOCKS[what],))

    def _migrate(self, upgrade: bool) -> tuple[Migration, ...]:
        with self._tx() as db:
            # Replicas starting together: one migrates, the others then find it done.
            db.execute("SELECT pg_advisory_xact_lock(?)", (_LOCKS["migrate"],))
            # Looked up before CREATE TABLE IF NOT EXISTS, which needs CREATE on the schema
            # even when the table is there: the serving role needs row privileges only.
            ((meta,),) = db.execute("SELECT to_regclass('meta') IS NOT NULL").fetchall()
            row = None
            if meta:
                row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            todo = pending(None if row is None else int(row[0]), self.where, upgrade)
            if todo:
                db.execute(META)
            for migration in todo:
                db.execute(migration.postgres)
                db.execute(SET_VERSION, (str(migration.version),))
        return todo

    def schema_version(self) -> int:
        (version,) = self._db.execute(
            "SELECT value FROM meta WHERE key='schema_version'"
        ).fetchone()
        return int(version)

    def create_job(self, job: NewJob, now: float) -> str:
        """SQLStore's; then, for a job of at least ANALYZE_AT slices, the slice tables'
        statistics taken again (``ANALYZE``). Until they count the new job's rows, the planner
        takes it for a few rows (a new value of ``job`` is rare by the statistics), and reads a
        batch's slices (the acceptance's locked read, a heartbeat, the results) by scanning
        all of the job's rows through the key's first column, not by probing the key: 2.4 ms
        an acceptance batch of 64 at 4,000 slices, growing with the job; 0.4 ms with them.
        Autovacuum would take them too, but only after its next round (a minute by default),
        and a whole job can run in that minute. Only the tables' owner may ANALYZE: for a
        serving role with row privileges alone (docs/operations.md) the server skips it with
        a warning, and autovacuum's round is what there is."""
        job_id = super().create_job(job, now)
        if len(job.data) >= ANALYZE_AT:
            try:
                with self._tx() as db:
                    db.execute("ANALYZE slices, slice_data")
            except StoreError as exc:  # the job is deployed: its statistics are a bonus
                log.warning("job %s: could not update the statistics: %s", job_id, exc)
        return job_id

    def _insert_many(
        self, db: Connection, table: str, columns: tuple[str, ...], rows: Iterable[tuple[Any, ...]]
    ) -> None:
        """COPY, not an INSERT a row: the server parses and plans nothing per row (a deploy
        was 4 of the 6.6 statements a slice cost end to end, and PostgreSQL's own CPU time is
        what its throughput lacks beside SQLite's on this machine: docs/performance.md)."""
        assert isinstance(db, _Connection)
        try:
            with db.raw.cursor() as cur:
                with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)
        except psycopg.errors.UniqueViolation:
            raise
        except psycopg.Error as exc:
            raise DatabaseError(f"database unavailable: {exc}".strip()) from exc

    def accept_results(
        self, worker: str, rows: list[ResultRow], now: float
    ) -> list[Settled | StoreError]:
        """SQLStore's, in libpq's pipeline mode: a write is sent without waiting for its
        reply, so a batch costs one round trip for its fenced read (one statement per job,
        which locks its slices) and one for the commit, not one per statement (11 per
        accepted result). A database error in any write fails the whole batch (nothing of it
        happened), never one item alone."""
        return self._pipelined(lambda: super(PostgresStore, self).accept_results(worker, rows, now))

    def lease(
        self,
        worker: str,
        max_slices: int,
        now: float,
        timeout: float,
        jobs: list[str] | None = None,
        max_held: int | None = None,
        payee: str | None = None,
        network: str | None = None,
    ) -> list[Lease]:
        """SQLStore's, in pipeline mode: BEGIN goes with the first reads (the leases held and
        the jobs, asked together), and the UPDATE with the COMMIT, so a lease costs 3 round
        trips (those reads, the queue, the writes), not 6 (5,000 workers on two replicas
        queued at the p99 for the round trips; docs/performance.md)."""
        return self._pipelined(
            lambda: super(PostgresStore, self).lease(
                worker, max_slices, now, timeout, jobs, max_held, payee, network
            )
        )

    def _again(self, call: Callable[[], _T]) -> _T:
        """``call`` (one transaction), run again where the server rolled it back
        (:func:`_rolled_back`): the rooms run their transactions that decide votes (a slice's
        failure, a rejection, an expired replica's decision) through it. A deadlock the
        job's row taken first does not prevent (one replica's threads, or two replicas, on
        other rows) is broken by the server rolling one back, and that one runs again."""
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return call()
            except StoreError as exc:
                if attempt == ATTEMPTS or not _rolled_back(exc):
                    raise
                log.info("a transaction was rolled back (%s); running it again", exc)
        raise AssertionError("unreachable")

    def _pipelined(self, call: Callable[[], _T]) -> _T:
        """``call`` (one transaction of SQLStore's) in libpq's pipeline mode: statements go
        without waiting for their replies until a read needs its rows. Run again where the
        server rolled it back (:func:`_rolled_back`), up to ATTEMPTS times."""
        for attempt in range(1, ATTEMPTS + 1):
            db = self._connection()
            db.committing = False
            done: list[_T] = []
            try:
                with db.raw.pipeline():
                    done.append(call())
            except BaseException as exc:
                if self._conn is not db:
                    # The transaction found this connection dead at its BEGIN and ran on a new
                    # one (_begin), outside this pipeline, which died with the old connection.
                    if done:
                        return done[0]
                    raise
                # The pipeline's ROLLBACK may not have run (an aborted pipeline ignores it): end
                # the transaction here, out of pipeline mode, so the connection can go on.
                self._rollback(db)
                if (
                    attempt == 1
                    and isinstance(exc, psycopg.Error | StoreError)
                    and not db.committing
                    and (db.raw.broken or db.raw.closed)
                ):
                    # A dead connection (a terminated backend, a restarted server) found by
                    # the first read, before the COMMIT went: nothing of it can have happened,
                    # so once more on a new one (as _begin does out of pipeline mode).
                    continue
                if attempt < ATTEMPTS and _rolled_back(exc):
                    log.info("a transaction was rolled back (%s); running it again", exc)
                    continue
                if isinstance(exc, psycopg.Error):  # read when the pipeline ended: the commit's
                    raise DatabaseError(f"database unavailable: {exc}".strip()) from exc
                raise
            return done[0]
        raise AssertionError("unreachable")

    def extend_leases(self, deadline: float, now: float) -> int:
        """At a replica's start: only the leases already past their deadline, i.e. those
        held while no replica ran (a running one expires them within a second). Extending
        every lease, as a lone scheduler does, would let each replica's restart postpone
        the expiry of leases that dead workers hold through the others."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE slices SET deadline=? WHERE state='leased' AND deadline < ?",
                (deadline, min(now, deadline)),
            )
        return int(cur.rowcount)

    def publish(self, channel: str, sender: str) -> None:
        """NOTIFY the other replicas on ``channel``, as ``sender``."""
        self._db.execute("SELECT pg_notify(?, ?)", (channel, sender))

    def notifier(
        self,
        channels: tuple[str, ...],
        wake: Callable[[str | None], None],
        pool: CallRunner | None = None,
    ) -> Notifier:
        return Notifier(self, channels, wake, pool)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.raw.close()


class Notifier:
    """Wakes this replica's waiters when another replica notifies, and notifies them.

    ``wake(channel)`` is called for each notification on ``channels`` from another
    replica, and with None after each (re)connection of the listening session (what was
    notified while it was down is lost: every waiter re-reads the store). ``publish``
    coalesces: at most one NOTIFY per channel per NOTIFY_INTERVAL, the last one at the end of
    the interval."""

    def __init__(
        self,
        store: PostgresStore,
        channels: tuple[str, ...],
        wake: Callable[[str | None], None],
        pool: CallRunner | None = None,
    ) -> None:
        """``pool``: where the NOTIFYs run (a thread's connection, off the event loop); else
        on ``store``'s connection, on the caller's thread."""
        self.store = store
        self.pool = pool if pool is not None and pool.threaded else None
        #: NOTIFYs under way on the pool (kept until done, as a task must be).
        self._sending: set[asyncio.Future[None]] = set()
        self.channels = channels
        self.wake = wake
        self.sender = secrets.token_hex(8)
        self._last: dict[str, float] = {}
        self._deferred: set[str] = set()
        #: Notifications received from other replicas, and NOTIFYs sent (for the metrics).
        self.received = 0
        self.sent = 0

    def publish(self, channel: str) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if channel in self._deferred:
            return
        due = self._last.get(channel, -1.0) + NOTIFY_INTERVAL
        if now < due:
            self._deferred.add(channel)
            loop.call_at(due, self._flush, channel)
            return
        self._send(channel, now)

    def _flush(self, channel: str) -> None:
        self._deferred.discard(channel)
        self._send(channel, asyncio.get_running_loop().time())

    def _send(self, channel: str, now: float) -> None:
        self._last[channel] = now
        if self.pool is None:
            try:
                self.store.publish(channel, self.sender)
                self.sent += 1
            except StoreError as exc:  # the other replicas' safety poll still wakes them
                log.warning("cannot notify the other replicas: %s", exc)
            return
        sender = self.sender
        sending = asyncio.ensure_future(
            self.pool.run(lambda s: cast(PostgresStore, s).publish(channel, sender))
        )
        self._sending.add(sending)
        sending.add_done_callback(self._sent)

    def _sent(self, sending: asyncio.Future[None]) -> None:
        self._sending.discard(sending)
        if sending.cancelled():
            return
        exc = sending.exception()
        if exc is None:
            self.sent += 1
        elif isinstance(exc, StoreError):  # the other replicas' safety poll still wakes them
            log.warning("cannot notify the other replicas: %s", exc)
        else:
            log.error("notifying the other replicas failed", exc_info=exc)

    async def listen(self, retry_delay: float = 1.0) -> None:
        """LISTEN until cancelled, reconnecting after a lost connection."""
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self.store.url, autocommit=True)
                async with conn:
                    for channel in self.channels:
                        await conn.execute(f"LISTEN {channel}")
                    self.wake(None)
                    async for note in conn.notifies():
                        if note.payload != self.sender:
                            self.received += 1
                            self.wake(note.channel)
            except psycopg.Error as exc:
                log.warning(
                    "listening for other replicas on %s: %s; again in %g s",
                    self.store.where,
                    str(exc).strip() or type(exc).__name__,
                    retry_delay,
                )
            await asyncio.sleep(retry_delay)
