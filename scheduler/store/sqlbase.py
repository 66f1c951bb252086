"""The store's logic in SQL, once for both backends (scheduler/store/sqlite.py, the embedded
default, and scheduler/store/postgres.py, for several replicas on one database).

Every public method is one transaction. Slice state changes go through the table in
:mod:`dcp_protocol.states`; every movement of credits is a ledger row (scheduler/store/ledger.py)
written in the transaction of the change it pays for.

Statements are written once, with ``?`` placeholders; a backend runs them on a connection that
has ``execute`` and ``executemany`` (sqlite3's own, or scheduler/store/postgres.py's adapter).
Where the two engines differ the backend says so in a class attribute:

- :attr:`SQLStore.LOCK` follows a read whose row the transaction then changes (``FOR UPDATE``
  on PostgreSQL, whose transactions run side by side under READ COMMITTED; nothing on SQLite,
  whose ``BEGIN IMMEDIATE`` already lets one writer in at a time). Without it, two replicas
  accepting the same slice would both read it leased and both pay.
- :attr:`SQLStore.SKIP_LOCKED` follows the reads that claim work (leasing, expiry): a replica
  passes over rows another one is claiming instead of queueing behind it.
- :attr:`SQLStore.GREATEST` is the two-argument maximum (``max`` / ``greatest``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, TypeVar

from ..quorum import Redundancy
from . import (
    CallRunner,
    LedgerEntry,
    PeerNotifier,
    ReplicaRecord,
    Store,
    StoreError,
    UnknownJob,
)
from . import ledger as _ledger
from . import votes as _votes
from .dbapi import Connection

_T = TypeVar("_T")

#: A job's price reads one row per worker of the job (:meth:`SQLStore._price`). It is set on
#: every acceptance while the job had at most PRICE_EXACT_WORKERS workers when last priced, then
#: at most once per PRICE_INTERVAL seconds of the callers' clock: with 1,000 workers, pricing on
#: every acceptance took 54% of a saturated scheduler's time (benchmarks/scale.py).
PRICE_EXACT_WORKERS = 32
PRICE_INTERVAL = 1.0
#: Workers whose claimed CPU and GPU time a job's price needs before it counts them.
PRICE_MIN_WORKERS = 2
_WORKER_COUNTERS = ("accepted", "rejected", "failed", "refused")
#: A job's first queued slices that ``worker`` may lease, with their datums (params: job,
#: worker, how many; lock with ``OF s``). Through the queue: SQLite's state index, PostgreSQL's
#: partial index ``slices_queue`` (schema 6), which the planner takes whatever its statistics
#: say of the job's progress. The datums in the same statement: asked apart (schema 9 keeps
#: them in a table of their own), they cost PostgreSQL's lease a fourth round trip. A subquery
#: per row, not a join: joined, PostgreSQL merged the queue with the datums' key in order,
#: and read every finished slice's datum entry first (15,000 of 20,000 finished).
QUEUED_OF_JOB = (
    "SELECT s.idx, s.attempts,"
    " (SELECT d.datum FROM slice_data d WHERE d.job=s.job AND d.idx=s.idx)"
    " FROM slices s INDEXED BY slices_by_state"
    " WHERE s.state='queued' AND s.job=? AND (s.rejected_by IS NULL OR s.rejected_by != ?)"
    " ORDER BY s.idx LIMIT ?"
)
#: The slices of one job that an acceptance batch settles, with their state, token, holder and
#: the job's offer (params: job, then the indices, ``{marks}`` standing for them; locked with
#: ``OF s``, in this order).
SLICES_TO_SETTLE = (
    "SELECT s.idx, s.state, s.token, s.worker, j.offer_micro FROM slices s"
    " JOIN jobs j ON j.id = s.job WHERE s.job=? AND s.idx IN ({marks}) ORDER BY s.idx"
)
#: The active jobs with a queued slice: one probe of the queue per active job (the first
#: queued slice, in order). Written with ``EXISTS``, PostgreSQL's planner made a semi-join
#: that read every queued slice of every job (28 ms a fetch at 200,000 slices, which stalled
#: the logins of 1,000 workers); with ``LIMIT 1`` but no order, a scan of the table from the
#: start, through every finished slice.
ACTIVE_JOBS = (
    "SELECT {columns} FROM jobs j WHERE state='active' AND (SELECT s.idx FROM slices s"
    " INDEXED BY slices_by_state WHERE s.state='queued' AND s.job=j.id ORDER BY s.idx"
    " LIMIT 1) IS NOT NULL ORDER BY seq"
)
#: A replicated job's queued replicas that ``worker`` (paid to ``payee``, from ``network``) may
#: lease: none of a slice whose other replica this identity or payment address holds or
#: computed, or this network where the job asks for distinct networks (params: job, worker,
#: worker, payee, payee, network or NULL, how many). Rows past the first replica of each slice
#: are read and skipped in Python (one lease never takes two replicas of one slice).
QUEUED_REPLICAS_OF_JOB = (
    "SELECT s.idx, s.attempts, s.replica_of FROM slices s INDEXED BY slices_by_state"
    " WHERE s.state='queued' AND s.job=? AND (s.rejected_by IS NULL OR s.rejected_by != ?)"
    " AND NOT EXISTS (SELECT 1 FROM slices r INDEXED BY slices_by_input WHERE r.job=s.job"
    " AND r.replica_of IS NOT NULL AND r.replica_of=s.replica_of"
    " AND r.idx != s.idx AND (lower(r.worker)=? OR r.payee=? OR lower(r.payment_address)=?"
    " OR r.network=?))"
    " ORDER BY s.idx LIMIT ?"
)
#: The most values one ``IN (...)`` list binds (SQLite before 3.32 allowed 999 in all).
_IN_CHUNK = 500


def _per_slice(
    db: Connection, keys: Iterable[tuple[str, int]], query: str
) -> Iterator[tuple[str, tuple[Any, ...]]]:
    """The rows ``query`` gives for the slices ``keys`` names, each with its job: one statement
    per job (in the order the jobs first appear) and per _IN_CHUNK indices, the indices
    ascending. ``query`` takes the job and the indices, ``{marks}`` standing for the IN list."""
    wanted: dict[str, set[int]] = {}
    for job_id, idx in keys:
        wanted.setdefault(job_id, set()).add(idx)
    for job_id, indices in wanted.items():
        ordered = sorted(indices)
        for start in range(0, len(ordered), _IN_CHUNK):
            chunk = ordered[start : start + _IN_CHUNK]
            marks = ", ".join("?" * len(chunk))
            for row in db.execute(query.format(marks=marks), (job_id, *chunk)):
                yield job_id, tuple(row)


#: A replicated job's first replicas are queued in blocks of this many slices, each block
#: holding every slice's first replica, then every slice's second, and so on: the replicas of
#: one slice are this far apart in the queue. Side by side, workers that fetch at the same
#: moment (colluders can) got the replicas of one slice together: with 5% colluders fetching
#: in step, 2-way voting accepted 2.7% of the slices wrong (benchmarks/cheaters.py), ten
#: times the 0.25% of random pairing. A block is small enough that a slice's quorum still
#: forms within a few hundred leases.
REPLICA_SPREAD = 256


def replica_position(input_: int, replica: int, total: int, per_input: int) -> int:
    """Where replica ``replica`` of slice ``input_`` (of ``total``, each with ``per_input``
    replicas) goes in the job's queue, counted from the first replica's index."""
    block, offset = divmod(input_, REPLICA_SPREAD)
    length = min(REPLICA_SPREAD, total - block * REPLICA_SPREAD)
    return block * REPLICA_SPREAD * per_input + replica * length + offset


class SQLBase:
    """:class:`scheduler.store.Store` over SQL, the ground floor: a backend gives the
    connection and the transactions (:meth:`_tx`, :attr:`_db`) and its dialect's words. The
    rooms above (jobs, leases, results, parties: :class:`scheduler.store.sql.SQLStore`) share
    what is here: the bank's reads and mints, a job's redundancy policy and its inputs, and the
    small steps several rooms take (a slice made final, a refund, a refusal)."""

    LOCK = ""
    SKIP_LOCKED = ""
    GREATEST = "max"
    #: What a backend's connection raises for a duplicate key.
    UNIQUE_VIOLATION: tuple[type[Exception], ...] = ()
    _JOB_COLUMNS = (
        "id, owner, name, state, runtime, module_sha256, argv, limits, offer_micro, created,"
        " finished, total, max_attempts, group_key, requirements, verifier IS NOT NULL,"
        " escrow_micro, cost_n, cost_cpu, cost_gpu, cost_in, cost_out, config, redundancy,"
        " compare IS NOT NULL"
    )
    _TOKEN_COLUMNS = "id, job, created, expires, revoked"
    _WORKER_COLUMNS = (
        "w.address, first_seen, last_seen, accepted, rejected, failed, refused, earned_micro,"
        " valid, invalid, consecutive_valid, b.reason FROM workers w"
        " LEFT JOIN blocklist b ON b.address = w.address"
    )

    def __init__(self, rng: random.Random | None = None) -> None:
        #: job -> (when it was last priced, how many workers it had then)
        self._priced: dict[str, tuple[float, int]] = {}
        #: job -> its redundancy and offer (neither changes once deployed); None: none.
        self._policies: dict[str, tuple[Redundancy | None, int]] = {}
        #: The adaptive trust's draws (scheduler/quorum.py); tests give a seeded one.
        self.rng = rng or random.Random()

    @property
    def _db(self) -> Connection:
        """The connection for reads outside a transaction."""
        raise NotImplementedError

    def _tx(self) -> AbstractContextManager[Connection]:
        """One transaction: committed when the block ends, rolled back when it raises
        (a database error as :class:`StoreError`)."""
        raise NotImplementedError

    def _exclusively(self, what: str) -> AbstractContextManager[bool]:
        """Whether this store may do ``what`` now (lease expiry, garbage collection: what
        several replicas must not do at once), held for the block. One process: always."""
        return nullcontext(True)

    def _insert_many(
        self, db: Connection, table: str, columns: tuple[str, ...], rows: Iterable[tuple[Any, ...]]
    ) -> None:
        """Insert ``rows`` (values of ``columns``) into ``table``, in the transaction of ``db``:
        a deploy's slices and datums. An INSERT per row (SQLite's are in-process); PostgreSQL
        copies them (COPY)."""
        marks = ", ".join("?" * len(columns))
        db.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows)

    def _lock(self, of: str = "") -> str:
        """The words that lock the rows a read returns (of table alias ``of``) until the
        transaction ends, where the engine runs writers side by side."""
        if not self.LOCK:
            return ""
        return f"{self.LOCK} OF {of}" if of else self.LOCK

    def close(self) -> None:
        raise NotImplementedError

    poolable = False

    def _again(self, call: Callable[[], _T]) -> _T:
        """``call``, one transaction; a backend whose server may roll one back to break a
        deadlock runs it again (PostgresStore)."""
        return call()

    def sibling(self) -> Store:
        raise NotImplementedError(f"{type(self).__name__} runs its calls on one connection")

    def notifier(
        self,
        channels: tuple[str, ...],
        wake: Callable[[str | None], None],
        pool: CallRunner | None = None,
    ) -> PeerNotifier | None:
        return None

    def mint(self, address: str, amount_micro: int, now: float) -> int:
        if amount_micro <= 0:
            raise StoreError("mint a positive amount")
        with self._tx() as db:
            _ledger.move(db, "mint", "mint", address, amount_micro, now)
            return _ledger.balance(db, address)

    def balance(self, address: str) -> int:
        return _ledger.balance(self._db, address)

    def ledger(self, account: str | None = None, limit: int = 1000) -> list[LedgerEntry]:
        return _ledger.entries(self._db, account, limit)

    def totals(self) -> dict[str, int]:
        """Minted, held in accounts, held in escrow, paid, refunded: minted = accounts + escrow."""
        return _ledger.totals(self._db)

    def _policy(self, db: Connection, job_id: str) -> tuple[Redundancy | None, int]:
        """The job's redundancy (None: one result per slice) and offer, cached."""
        found = self._policies.get(job_id)
        if found is None:
            row = db.execute(
                "SELECT redundancy, offer_micro FROM jobs WHERE id=?", (job_id,)
            ).fetchone()
            if row is None:
                return None, 0
            found = self._policies[job_id] = (_votes.parse_redundancy(row[0]), int(row[1]))
        return found

    def _inputs_of(
        self, db: Connection, keys: Iterable[tuple[str, int]]
    ) -> dict[tuple[str, int], int]:
        """The slice each replica of ``keys`` is a replica of (replicated jobs only), read
        without a lock: the caller then locks the inputs before their replicas."""
        replicated = [(j, i) for j, i in keys if self._policy(db, j)[0] is not None]
        if not replicated:
            return {}
        return {
            (job_id, idx): int(of)
            for job_id, (idx, of) in _per_slice(
                db,
                replicated,
                "SELECT idx, replica_of FROM slices WHERE job=? AND idx IN ({marks})"
                " AND replica_of IS NOT NULL",
            )
        }

    @staticmethod
    def _job_by_payload(db: Connection, payload_sha256: str) -> str | None:
        row = db.execute("SELECT id FROM jobs WHERE payload_sha256=?", (payload_sha256,)).fetchone()
        return None if row is None else str(row[0])

    def _slice_final(self, db: Connection, job_id: str, now: float) -> None:
        """One slice of the job reached a final state: finish the job when none is left.
        One statement: the right-hand sides all read the row as it was."""
        db.execute(
            "UPDATE jobs SET remaining = remaining - 1,"
            " finished = CASE WHEN remaining <= 1 AND state='active' THEN ? ELSE finished END,"
            " state = CASE WHEN remaining <= 1 AND state='active' THEN 'finished' ELSE state END"
            " WHERE id=?",
            (now, job_id),
        )

    def _refund(self, db: Connection, job_id: str, now: float) -> None:
        owner, escrow = db.execute(
            "SELECT owner, escrow_micro FROM jobs WHERE id=?", (job_id,)
        ).fetchone()
        _ledger.move(db, "refund", f"escrow:{job_id}", owner, escrow, now, job_id)

    def _refusal(
        self, db: Connection, job_id: str, worker: str, code: str, message: str, now: float
    ) -> None:
        db.execute(
            "INSERT INTO refusals AS r VALUES (?, ?, ?, 1, ?, ?) ON CONFLICT(job, worker, code)"
            " DO UPDATE SET count = r.count + 1, message = excluded.message, last = excluded.last",
            (job_id, worker.lower(), code, message[:500], now),
        )

    def job_state(self, job_id: str) -> str:
        row = self._db.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise UnknownJob(f"no job {job_id}")
        return str(row[0])

    def _count(
        self, db: Connection, worker: str, counter: str, now: float, earned: int = 0, n: int = 1
    ) -> None:
        assert counter in _WORKER_COUNTERS
        db.execute(
            f"INSERT INTO workers AS w (address, first_seen, last_seen, {counter}, earned_micro)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT(address) DO UPDATE SET"
            f" {counter} = w.{counter} + excluded.{counter},"
            " earned_micro = w.earned_micro + excluded.earned_micro,"
            f" last_seen = {self.GREATEST}(w.last_seen, excluded.last_seen)",
            (worker.lower(), now, now, n, earned),
        )

    @staticmethod
    def _replica(r: Sequence[Any]) -> ReplicaRecord:
        return ReplicaRecord(
            job=r[0],
            input=r[1],
            slice=r[2],
            state=r[3],
            worker=r[4],
            payment_address=r[5],
            result=None if r[6] is None else bytes(r[6]),
            vote=r[7],
            accepted_at=r[8],
            error_code=r[9],
        )
