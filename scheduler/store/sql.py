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

import json
import random
import secrets
import statistics
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict
from typing import Any

from dcp_protocol import (
    IllegalTransition,
    LeaseRef,
    Limits,
    Metrics,
    SliceEvent,
    SliceState,
    transition,
)
from dcp_protocol.states import FINAL_STATES

from ..quorum import Redundancy
from . import (
    DatabaseError,
    DuplicateGroup,
    GroupRecord,
    InsufficientFunds,
    JobRecord,
    Lease,
    LedgerEntry,
    NewJob,
    PayeeRecord,
    PeerNotifier,
    ReadTokenRecord,
    RefusalRecord,
    ReplicaRecord,
    ResultLease,
    ResultRow,
    SliceRecord,
    StaleLease,
    StoreError,
    UnknownJob,
    UnknownSlice,
    WorkerRecord,
)
from . import ledger as _ledger
from . import votes as _votes
from .dbapi import Connection

#: A job's price reads one row per worker of the job (:meth:`SQLStore._price`). It is set on
#: every acceptance while the job had at most PRICE_EXACT_WORKERS workers when last priced, then
#: at most once per PRICE_INTERVAL seconds of the callers' clock: with 1,000 workers, pricing on
#: every acceptance took 54% of a saturated scheduler's time (benchmarks/scale.py).
PRICE_EXACT_WORKERS = 32
PRICE_INTERVAL = 1.0
#: Workers whose claimed CPU and GPU time a job's price needs before it counts them.
PRICE_MIN_WORKERS = 2
_WORKER_COUNTERS = ("accepted", "rejected", "failed", "refused")
#: A job's first queued slices that ``worker`` may lease (params: job, worker, how many).
#: Through the queue: SQLite's state index, PostgreSQL's partial index ``slices_queue``
#: (schema 6), which the planner takes whatever its statistics say of the job's progress.
QUEUED_OF_JOB = (
    "SELECT idx, attempts, datum FROM slices INDEXED BY slices_by_state"
    " WHERE state='queued' AND job=? AND (rejected_by IS NULL OR rejected_by != ?)"
    " ORDER BY idx LIMIT ?"
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
    "SELECT s.idx, s.attempts, s.datum, s.replica_of FROM slices s INDEXED BY slices_by_state"
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


class SQLStore:
    """:class:`scheduler.store.Store` over SQL; a backend gives the connection and the
    transactions (:meth:`_tx`, :attr:`_db`) and its dialect's words."""

    LOCK = ""
    SKIP_LOCKED = ""
    GREATEST = "max"
    #: What a backend's connection raises for a duplicate key.
    UNIQUE_VIOLATION: tuple[type[Exception], ...] = ()

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

    def _lock(self, of: str = "") -> str:
        """The words that lock the rows a read returns (of table alias ``of``) until the
        transaction ends, where the engine runs writers side by side."""
        if not self.LOCK:
            return ""
        return f"{self.LOCK} OF {of}" if of else self.LOCK

    def close(self) -> None:
        raise NotImplementedError

    def notifier(
        self, channels: tuple[str, ...], wake: Callable[[str | None], None]
    ) -> PeerNotifier | None:
        return None

    # ------------------------------------------------------------------ bank

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

    # ------------------------------------------------------------------ jobs

    def create_job(self, job: NewJob, now: float) -> str:
        job_id = secrets.token_hex(16)
        policy = job.redundancy if job.redundancy and job.redundancy.replicated else None
        # Escrow for every payment the job may make: one per agreeing replica of each slice.
        escrow = job.offer_micro * len(job.data) * (policy.quorum if policy else 1)
        with self._tx() as db:
            existing = self._job_by_payload(db, job.payload_sha256)
            if existing:
                return existing  # a replayed deploy: the same job, not a second one
            balance = _ledger.balance(db, job.owner, self._lock())
            if balance < escrow:
                raise InsufficientFunds(job.owner, escrow, balance)
            inserted = db.execute(
                "INSERT INTO jobs (id, owner, name, state, runtime, module, module_sha256, argv,"
                " limits, offer_micro, group_key, requirements, config, verifier, payload_sha256,"
                " total, remaining, max_attempts, created, verifier_runtime, redundancy,"
                " compare, compare_runtime, next_idx)"
                " VALUES (?, ?, ?, 'active', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?,"
                " ?, ?, ?, ?) ON CONFLICT (payload_sha256) DO NOTHING",
                (
                    job_id,
                    job.owner,
                    job.name,
                    job.runtime,
                    job.module,
                    job.module_sha256,
                    json.dumps(list(job.argv)),
                    json.dumps(asdict(job.limits)),
                    job.offer_micro,
                    job.group,
                    json.dumps(job.requirements),
                    json.dumps(job.config),
                    job.verifier,
                    job.payload_sha256,
                    len(job.data),
                    len(job.data),
                    job.max_attempts,
                    now,
                    job.verifier_runtime,
                    None if policy is None else json.dumps(asdict(policy)),
                    job.compare if policy else None,
                    job.compare_runtime if policy and job.compare else None,
                    len(job.data),
                ),
            )
            if inserted.rowcount == 0:  # the same deploy, committed meanwhile by a replica
                return self._job_by_payload(db, job.payload_sha256) or job_id
            if policy is None:
                db.executemany(
                    "INSERT INTO slices (job, idx, state, datum) VALUES (?, ?, 'queued', ?)",
                    ((job_id, i, datum) for i, datum in enumerate(job.data)),
                )
            else:
                self._create_inputs(db, job_id, job, policy)
            _ledger.move(db, "escrow", job.owner, f"escrow:{job_id}", escrow, now, job_id)
            if not job.data:
                db.execute("UPDATE jobs SET state='finished', finished=? WHERE id=?", (now, job_id))
        return job_id

    def _create_inputs(self, db: Connection, job_id: str, job: NewJob, policy: Redundancy) -> None:
        """A replicated job's slices, ``voting``, each with its first replicas (the adaptive
        policy's one, or the quorum), queued REPLICA_SPREAD slices apart (below)."""
        first = policy.first_replicas()
        db.executemany(
            "INSERT INTO slices (job, idx, state, datum, needed, expected)"
            " VALUES (?, ?, 'voting', ?, ?, ?)",
            ((job_id, i, datum, first, job.known.get(i)) for i, datum in enumerate(job.data)),
        )
        total = len(job.data)
        db.executemany(
            "INSERT INTO slices (job, idx, state, datum, replica_of) VALUES (?, ?, 'queued', ?, ?)",
            (
                (job_id, total + replica_position(i, r, total, first), datum, i)
                for i, datum in enumerate(job.data)
                for r in range(first)
            ),
        )
        db.execute("UPDATE jobs SET next_idx=? WHERE id=?", (total + total * first, job_id))

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

    def _decide(self, db: Connection, job_id: str, inputs: Iterable[int], now: float) -> None:
        """Decide the replicated slices ``inputs`` of ``job_id`` (and those a caught liar's
        forfeited votes reopen), then refund the escrow left if the job is finished."""
        policy, offer = self._policy(db, job_id)
        if policy is None:
            return
        todo = sorted(set(inputs))
        done: set[int] = set()
        while todo:
            input_ = todo.pop(0)
            if input_ in done:
                continue
            done.add(input_)
            again = _votes.decide(
                db,
                job_id,
                input_,
                policy,
                offer,
                now,
                self.rng.random,
                self._lock(),
                self._slice_final,
            )
            todo = sorted({*todo, *(again - done)})
        row = db.execute("SELECT state, escrow_micro FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is not None and row[0] == "finished" and row[1] > 0:
            self._refund(db, job_id, now)  # what no replica needed goes back at once

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

    _JOB_COLUMNS = (
        "id, owner, name, state, runtime, module_sha256, argv, limits, offer_micro, created,"
        " finished, total, max_attempts, group_key, requirements, verifier IS NOT NULL,"
        " escrow_micro, cost_n, cost_cpu, cost_gpu, cost_in, cost_out, config, redundancy,"
        " compare IS NOT NULL"
    )

    def _job_record(self, row: tuple[Any, ...], counts: dict[str, int]) -> JobRecord:
        cost = None
        if row[17]:
            cost = Metrics(
                cpu_seconds=row[18], gpu_seconds=row[19], bytes_in=row[20], bytes_out=row[21]
            )
        return JobRecord(
            id=row[0],
            owner=row[1],
            name=row[2],
            state=row[3],
            runtime=row[4],
            module_sha256=row[5],
            argv=tuple(json.loads(row[6])),
            limits=Limits(**json.loads(row[7])),
            offer_micro=row[8],
            created=row[9],
            finished=row[10],
            total=row[11],
            max_attempts=row[12],
            group=row[13],
            requirements=json.loads(row[14]),
            config=json.loads(row[22]),
            has_verifier=bool(row[15]),
            escrow_micro=row[16],
            cost=cost,
            counts=counts,
            redundancy=_votes.parse_redundancy(row[23]),
            has_compare=bool(row[24]),
        )

    def _counts(self, job_id: str) -> dict[str, int]:
        rows = self._db.execute(
            "SELECT state, count(*) FROM slices WHERE job=? AND replica_of IS NULL GROUP BY state",
            (job_id,),
        )
        return {state: n for state, n in rows}

    def job(self, job_id: str, counts: bool = True) -> JobRecord:
        row = self._db.execute(
            f"SELECT {self._JOB_COLUMNS} FROM jobs WHERE id=?", (job_id,)
        ).fetchone()
        if row is None:
            raise UnknownJob(f"no job {job_id}")
        return self._job_record(row, self._counts(job_id) if counts else {})

    def job_state(self, job_id: str) -> str:
        row = self._db.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise UnknownJob(f"no job {job_id}")
        return str(row[0])

    def _blob(self, column: str, job_id: str) -> bytes | None:
        row = self._db.execute(f"SELECT {column} FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise UnknownJob(f"no job {job_id}")
        return None if row[0] is None else bytes(row[0])

    def job_module(self, job_id: str) -> bytes:
        module = self._blob("module", job_id)
        assert module is not None
        return module

    def job_verifier(self, job_id: str) -> tuple[bytes, str] | None:
        row = self._db.execute(
            "SELECT verifier, verifier_runtime FROM jobs WHERE id=?", (job_id,)
        ).fetchone()
        if row is None:
            raise UnknownJob(f"no job {job_id}")
        return None if row[0] is None else (bytes(row[0]), str(row[1]))

    def job_compare(self, job_id: str) -> tuple[bytes, str] | None:
        row = self._db.execute(
            "SELECT compare, compare_runtime FROM jobs WHERE id=?", (job_id,)
        ).fetchone()
        if row is None:
            raise UnknownJob(f"no job {job_id}")
        return None if row[0] is None else (bytes(row[0]), str(row[1]))

    def datum(self, job_id: str, slice_: int) -> bytes:
        row = self._db.execute(
            "SELECT datum FROM slices WHERE job=? AND idx=?", (job_id, slice_)
        ).fetchone()
        if row is None:
            raise UnknownSlice(f"no slice {job_id}/{slice_}")
        return bytes(row[0])

    def list_jobs(self) -> list[JobRecord]:
        rows = self._db.execute(f"SELECT {self._JOB_COLUMNS} FROM jobs ORDER BY seq").fetchall()
        return [self._job_record(row, self._counts(row[0])) for row in rows]

    def active_jobs(self) -> list[JobRecord]:
        """Active jobs with queued slices, oldest first (no slice counts: this is hot)."""
        rows = self._db.execute(ACTIVE_JOBS.format(columns=self._JOB_COLUMNS)).fetchall()
        return [self._job_record(row, {}) for row in rows]

    def has_queued(self) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM slices INDEXED BY slices_by_state WHERE state='queued' LIMIT 1"
        ).fetchone()
        return row is not None

    def slices(
        self, job_id: str, after: int = -1, limit: int = 1000, final_prefix: bool = False
    ) -> list[SliceRecord]:
        self.job_state(job_id)
        cursor = self._db.execute(
            "SELECT job, idx, state, attempts, worker, deadline, error_code, error, result,"
            " payment_address, accepted_at, metrics, progress, needed FROM slices WHERE job=?"
            " AND idx>? AND replica_of IS NULL ORDER BY idx LIMIT ?",
            (job_id, after, limit),
        )
        out = []
        for r in cursor:
            if final_prefix and SliceState(r[2]) not in FINAL_STATES:
                break  # rows are read lazily: stopping here reads no further
            out.append(
                SliceRecord(
                    job=r[0],
                    slice=r[1],
                    state=r[2],
                    attempts=r[3],
                    worker=r[4],
                    deadline=r[5],
                    error_code=r[6],
                    error=r[7],
                    result=None if r[8] is None else bytes(r[8]),
                    payment_address=r[9],
                    accepted_at=r[10],
                    metrics=None if r[11] is None else Metrics(**json.loads(r[11])),
                    progress=r[12],
                    needed=r[13],
                )
            )
        cursor.close()
        return out

    # ------------------------------------------------------------------ leases

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
        """Lease up to ``max_slices`` queued slices, oldest job first; only from ``jobs`` when
        given; never a slice whose last result from this worker was rejected; never so many
        that ``worker`` would hold more than ``max_held`` leases at once; never a replica of a
        slice this identity or ``payee`` (or ``network``, where the job asks) has another replica
        of."""
        if jobs is not None and not jobs:
            return []
        deadline = now + timeout
        leases: list[Lease] = []
        where, params = "", []
        if jobs is not None:
            where = f" AND id IN ({','.join('?' * len(jobs))})"
            params = list(jobs)
        new_state = transition(SliceState.QUEUED, SliceEvent.LEASE).value
        updates = []
        with self._tx() as db:
            if max_held is not None:
                (held,) = db.execute(
                    "SELECT count(*) FROM slices INDEXED BY slices_by_worker"
                    " WHERE worker=? AND state='leased'",
                    (worker,),
                ).fetchone()
                max_slices = min(max_slices, max_held - held)
            order = db.execute(
                "SELECT id, offer_micro, redundancy IS NOT NULL FROM jobs"
                f" WHERE state='active'{where} ORDER BY seq",
                params,
            ).fetchall()
            who, pays = worker.lower(), (payee or worker).lower()
            for job_id, offer, replicated in order:
                want = max_slices - len(leases)
                if want <= 0:
                    break
                # Job by job through the state index: a query over all jobs at once walked
                # every slice of the job (done ones included) and grew with its progress.
                rows: Iterable[tuple[int, int, bytes]]
                if replicated:
                    rows = self._queued_replicas(db, job_id, who, pays, network, want)
                else:
                    rows = db.execute(
                        f"{QUEUED_OF_JOB}{self._lock()}{self.SKIP_LOCKED}",
                        (job_id, who, want),
                    )
                for idx, attempts, datum in rows:
                    token = secrets.token_hex(16)
                    updates.append(
                        (new_state, token, worker, deadline, now, pays, network, job_id, idx)
                    )
                    leases.append(
                        Lease(job_id, idx, token, attempts + 1, deadline, bytes(datum), offer)
                    )
            db.executemany(
                "UPDATE slices SET state=?, token=?, worker=?, deadline=?, leased_at=?, payee=?,"
                " network=?, attempts=attempts+1, progress=NULL WHERE job=? AND idx=?",
                updates,
            )
        return leases

    def _queued_replicas(
        self, db: Connection, job_id: str, who: str, pays: str, network: str | None, want: int
    ) -> list[tuple[int, int, bytes]]:
        """Up to ``want`` queued replicas of distinct slices that ``who`` (paid to ``pays``,
        from ``network``) may compute, locked."""
        policy = self._policy(db, job_id)[0]
        assert policy is not None
        apart = network if policy.distinct_networks and network else None
        rows = db.execute(
            f"{QUEUED_REPLICAS_OF_JOB}{self._lock('s')}{self.SKIP_LOCKED}",
            (job_id, who, who, pays, pays, apart, want * policy.quorum),
        ).fetchall()
        taken: set[int] = set()
        out = []
        for idx, attempts, datum, of in rows:
            if of in taken:
                continue
            taken.add(of)
            out.append((idx, attempts, datum))
            if len(out) == want:
                break
        return out

    def heartbeat(
        self, worker: str, refs: list[LeaseRef], now: float, timeout: float
    ) -> list[LeaseRef]:
        lost = []
        with self._tx() as db:
            for ref in refs:
                cur = db.execute(
                    "UPDATE slices SET deadline=?, progress=coalesce(?, progress) WHERE job=?"
                    " AND idx=? AND token=? AND worker=? AND state='leased'",
                    (now + timeout, ref.progress, ref.job, ref.slice, ref.token, worker),
                )
                if cur.rowcount == 0:
                    lost.append(LeaseRef(ref.job, ref.slice, ref.token))
        return lost

    def _current(
        self, db: Connection, job_id: str, idx: int
    ) -> tuple[SliceState, str | None, str | None, int, int, int, str]:
        row = db.execute(
            "SELECT s.state, s.token, s.worker, s.attempts, j.max_attempts, j.offer_micro,"
            " j.owner FROM slices s JOIN jobs j ON j.id = s.job WHERE s.job=? AND s.idx=?"
            + self._lock("s"),
            (job_id, idx),
        ).fetchone()
        if row is None:
            raise UnknownSlice(f"no slice {job_id}/{idx}")
        return SliceState(row[0]), row[1], row[2], row[3], row[4], row[5], row[6]

    def _fenced(
        self, db: Connection, job_id: str, idx: int, token: str, worker: str
    ) -> tuple[SliceState, int, int, int]:
        """The slice's state, attempts, max attempts and offer, if ``token`` is its current
        lease and ``worker`` holds it (fencing)."""
        state, current, holder, attempts, max_attempts, offer, _ = self._current(db, job_id, idx)
        if current != token or (holder or "").lower() != worker.lower():
            raise StaleLease(f"slice {job_id}/{idx}: lease {token[:8]}... is not the current lease")
        return state, attempts, max_attempts, offer

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

    def result_lease(self, job_id: str, slice_: int, token: str, worker: str) -> ResultLease:
        """The lease a result names, fenced as acceptance fences it; no transaction (it only
        reads, and acceptance fences again: a token names one lease, never another)."""
        (found,) = self.result_leases(worker, [LeaseRef(job_id, slice_, token)])
        if isinstance(found, StoreError):
            raise found
        return found

    def result_leases(
        self, worker: str, refs: Sequence[LeaseRef]
    ) -> list[ResultLease | StoreError]:
        """:meth:`result_lease` for many results at once, in their order: one statement per
        job named (a batch names one job as a rule), a refusal in place of each lease that
        cannot take a result."""
        rows = {
            (job_id, idx): tuple(rest)
            for job_id, (idx, *rest) in _per_slice(
                self._db,
                [(r.job, r.slice) for r in refs],
                "SELECT idx, state, token, worker, leased_at, length(datum) FROM slices"
                " WHERE job=? AND idx IN ({marks})",
            )
        }
        return [self._lease_of(rows.get((r.job, r.slice)), r, worker) for r in refs]

    @staticmethod
    def _lease_of(
        row: tuple[Any, ...] | None, ref: LeaseRef, worker: str
    ) -> ResultLease | StoreError:
        job_id, slice_, token = ref.job, ref.slice, ref.token
        if row is None:
            return UnknownSlice(f"no slice {job_id}/{slice_}")
        state, current, holder, leased_at, datum_bytes = row
        if current != token or (holder or "").lower() != worker.lower():
            return StaleLease(
                f"slice {job_id}/{slice_}: lease {token[:8]}... is not the current lease"
            )
        state = SliceState(state)
        if state is not SliceState.DONE:
            try:
                transition(state, SliceEvent.ACCEPT)
            except IllegalTransition:
                return StaleLease(f"slice {job_id}/{slice_} is {state.value}")
        return ResultLease(job_id, slice_, state.value, leased_at, int(datum_bytes))

    def accept_result(self, worker: str, row: ResultRow, now: float) -> tuple[str, int]:
        """Accept a result once and pay its slice's offer to its payment address.

        Returns:
            ("accepted", micro-credits paid) or ("duplicate", 0) for a resubmission.
        """
        (outcome,) = self.accept_results(worker, [row], now)
        if isinstance(outcome, StoreError):
            raise outcome
        return outcome

    def accept_results(
        self, worker: str, rows: list[ResultRow], now: float
    ) -> list[tuple[str, int] | StoreError]:
        """:meth:`accept_result` for many results in one transaction (one commit for a
        batch). Each item's outcome is its own: a stale or unknown one is its StoreError and
        changes nothing, the others are accepted."""
        outcomes: list[tuple[str, int] | StoreError] = [StoreError("not accepted")] * len(rows)
        # Slices (and their jobs) locked in one order by every transaction, so that two
        # replicas' batches never wait on each other in a cycle.
        order = sorted(range(len(rows)), key=lambda i: (rows[i].job, rows[i].slice))
        #: Per job: results accepted, credits paid, and the cost sums of this batch.
        sums: dict[str, list[float]] = {}
        #: Per replicated job: the slices whose replicas voted in this batch.
        voted: dict[str, set[int]] = {}
        with self._tx() as db:
            keys = [(rows[i].job, rows[i].slice) for i in order]
            inputs = self._inputs_of(db, keys)
            # A replicated slice's row before its replicas' (scheduler/store/votes.py): inputs
            # have lower indices than every replica, so one sorted order takes both.
            locked = self._lock_slices(
                db, sorted({*keys, *((j, i) for (j, _), i in inputs.items())})
            )
            for i in order:
                row = rows[i]
                try:
                    # A refusal (stale, unknown) is raised before the item writes anything,
                    # so the batch goes on without it; a database error ends the batch.
                    outcome = self._accept(db, worker, row, now, locked)
                except DatabaseError:
                    raise
                except StoreError as exc:
                    outcomes[i] = exc
                else:
                    outcomes[i] = outcome
                    if outcome[0] == "accepted":
                        m = row.metrics
                        vote = (row.job, row.slice) in inputs
                        add = (1, outcome[1], m.cpu_seconds, m.gpu_seconds, m.bytes_in, m.bytes_out)
                        acc = sums.setdefault(row.job, [0, 0, 0.0, 0.0, 0, 0, 0])
                        for k, v in enumerate(add):
                            acc[k] += v
                        if vote:  # decided below: no slice of the job is final by it alone
                            voted.setdefault(row.job, set()).add(inputs[(row.job, row.slice)])
                        else:
                            acc[6] += 1
            # The rows every batch shares last, once each and in order: the job's row (one
            # per job, the per-job serialization point) is then locked for the commit only.
            for job_id in sorted(sums):
                n, paid, cpu, gpu, b_in, b_out, final = sums[job_id]
                db.execute(
                    "INSERT INTO job_costs AS c VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(job,"
                    " worker) DO UPDATE SET n = c.n + excluded.n, cpu = c.cpu + excluded.cpu,"
                    " gpu = c.gpu + excluded.gpu, bytes_in = c.bytes_in + excluded.bytes_in,"
                    " bytes_out = c.bytes_out + excluded.bytes_out",
                    (job_id, worker.lower(), int(n), cpu, gpu, int(b_in), int(b_out)),
                )
                db.execute(
                    "UPDATE jobs SET cost_n = cost_n + ?, escrow_micro = escrow_micro - ?,"
                    " remaining = remaining - ?,"
                    " finished = CASE WHEN remaining <= ? AND state='active' THEN ?"
                    " ELSE finished END,"
                    " state = CASE WHEN remaining <= ? AND state='active' THEN 'finished'"
                    " ELSE state END WHERE id=?",
                    (int(n), int(paid), int(final), int(final), now, int(final), job_id),
                )
            if sums:
                self._count(
                    db,
                    worker,
                    "accepted",
                    now,
                    earned=int(sum(v[1] for v in sums.values())),
                    n=int(sum(v[0] for v in sums.values())),
                )
            for job_id in sums:  # once per job and batch at most: it reads the job's workers
                if self._price_due(job_id, now):
                    self._price(db, job_id, now)
            for job_id in sorted(voted):
                self._decide(db, job_id, voted[job_id], now)
        return outcomes

    def _price_due(self, job_id: str, now: float) -> bool:
        last = self._priced.get(job_id)
        if last is None or last[1] <= PRICE_EXACT_WORKERS:
            return True
        when, _workers = last
        return not when <= now < when + PRICE_INTERVAL  # (a clock stepped back: price now)

    def _price(self, db: Connection, job_id: str, now: float) -> None:
        """Set the job's cost per slice from its workers' sums: for each field the lower
        median of the per-worker means. One worker (or fewer than half of them) claiming
        1e300 CPU seconds cannot price the job out; with two workers the lower one counts,
        as a job mispriced low is declined by workers that measure it, one priced high is
        never run at all. CPU and GPU time count only once PRICE_MIN_WORKERS workers have
        reported (a lone first worker's claim would otherwise be the price); bytes, which
        acceptance checks exactly, count from the first. With many workers the price may lag
        by up to PRICE_INTERVAL."""
        rows = db.execute(
            "SELECT n, cpu, gpu, bytes_in, bytes_out FROM job_costs WHERE job=?", (job_id,)
        ).fetchall()
        self._priced[job_id] = (now, len(rows))
        if not rows:
            return
        # Bytes are checked exactly at acceptance; CPU and GPU time are a worker's word, so
        # one worker's alone sets nothing: with two, the lower counts.
        claims = len(rows) >= PRICE_MIN_WORKERS
        cpu = statistics.median_low(c / n for n, c, _g, _i, _o in rows) if claims else 0.0
        gpu = statistics.median_low(g / n for n, _c, g, _i, _o in rows) if claims else 0.0
        bytes_in = statistics.median_low(i // n for n, _c, _g, i, _o in rows)
        bytes_out = statistics.median_low(o // n for n, _c, _g, _i, o in rows)
        db.execute(
            "UPDATE jobs SET cost_cpu=?, cost_gpu=?, cost_in=?, cost_out=? WHERE id=?",
            (cpu, gpu, bytes_in, bytes_out, job_id),
        )

    def _lock_slices(
        self, db: Connection, keys: list[tuple[str, int]]
    ) -> dict[tuple[str, int], tuple[SliceState, str | None, str | None, int]]:
        """The slices ``keys`` names (sorted), locked until the transaction ends, in that
        order (one statement per job: the locks are taken in the rows' order), with their
        state, token, holder and their job's offer; a slice that does not exist is absent."""
        return {
            (job_id, idx): (SliceState(state), token, holder, offer)
            for job_id, (idx, state, token, holder, offer) in _per_slice(
                db,
                keys,
                "SELECT s.idx, s.state, s.token, s.worker, j.offer_micro FROM slices s"
                " JOIN jobs j ON j.id = s.job WHERE s.job=? AND s.idx IN ({marks})"
                f" ORDER BY s.idx{self._lock('s')}",
            )
        }

    def _accept(
        self,
        db: Connection,
        worker: str,
        row: ResultRow,
        now: float,
        locked: dict[tuple[str, int], tuple[SliceState, str | None, str | None, int]],
    ) -> tuple[str, int]:
        """Accept one result of a batch whose slices ``locked`` holds (kept current: an
        accepted slice is marked done there, so the same result twice is a duplicate)."""
        job_id, slice_, metrics = row.job, row.slice, row.metrics
        key = (job_id, slice_)
        if key not in locked:
            raise UnknownSlice(f"no slice {job_id}/{slice_}")
        state, current, holder, offer = locked[key]
        if (current is None or current != row.token) and state is SliceState.VOTING:
            raise StaleLease(f"slice {job_id}/{slice_} is decided by its replicas' votes")
        if current != row.token or (holder or "").lower() != worker.lower():
            raise StaleLease(
                f"slice {job_id}/{slice_}: lease {row.token[:8]}... is not the current lease"
            )
        if state is SliceState.DONE:
            return "duplicate", 0  # resubmission of the accepted result: harmless
        try:
            new = transition(state, SliceEvent.ACCEPT)
        except IllegalTransition:
            raise StaleLease(f"slice {job_id}/{slice_} is {state.value}") from None
        locked[key] = (new, current, holder, offer)
        replica = self._policy(db, job_id)[0] is not None
        db.execute(
            "UPDATE slices SET state=?, result=?, signature=?, payment_address=?, metrics=?,"
            " accepted_at=?, deadline=NULL, error_code=NULL, error=NULL, vote_key=?"
            " WHERE job=? AND idx=?",
            (
                new.value,
                row.result,
                row.signature,
                row.payment_address,
                json.dumps(asdict(metrics)),
                now,
                (row.vote_key or _votes.vote_key(row.result)) if replica else None,
                job_id,
                slice_,
            ),
        )
        if replica:
            return "accepted", 0  # a vote: paid once its slice's replicas agree
        # The job's row, its cost sums and the worker's counters: once per batch
        # (accept_results); the escrow is debited there too.
        _ledger.move(
            db,
            "payment",
            f"escrow:{job_id}",
            row.payment_address,
            offer,
            now,
            job_id,
            slice_,
            escrow_debited=True,
        )
        return "accepted", offer

    def _release(
        self,
        db: Connection,
        job_id: str,
        idx: int,
        state: SliceState,
        attempts: int,
        max_attempts: int,
        event: SliceEvent,
        code: str,
        message: str,
        now: float,
    ) -> SliceState:
        if event is not SliceEvent.RETURN and attempts >= max_attempts:
            event = SliceEvent.EXHAUST
        new = transition(state, event)
        db.execute(
            "UPDATE slices SET state=?, deadline=NULL, error_code=?, error=?,"
            " attempts = attempts - ? WHERE job=? AND idx=?",
            (
                new.value,
                code or None,
                message or None,
                1 if event is SliceEvent.RETURN else 0,
                job_id,
                idx,
            ),
        )
        if new is SliceState.FAILED:
            if self._policy(db, job_id)[0] is None:
                self._slice_final(db, job_id, now)
            # else: a replica used its attempts; its slice is decided by the caller
            # (:meth:`_replica_done`), which may make another replica
        return new

    def _refusal(
        self, db: Connection, job_id: str, worker: str, code: str, message: str, now: float
    ) -> None:
        db.execute(
            "INSERT INTO refusals AS r VALUES (?, ?, ?, 1, ?, ?) ON CONFLICT(job, worker, code)"
            " DO UPDATE SET count = r.count + 1, message = excluded.message, last = excluded.last",
            (job_id, worker.lower(), code, message[:500], now),
        )

    def _lock_input(self, db: Connection, job_id: str, idx: int) -> int | None:
        """Before a single replica's row is locked: lock its slice's (the order every
        transaction takes them in); the slice, or None for a slice of an unreplicated job."""
        of = self._inputs_of(db, [(job_id, idx)]).get((job_id, idx))
        if of is not None:
            db.execute("SELECT 1 FROM slices WHERE job=? AND idx=?" + self._lock(), (job_id, of))
        return of

    def reject_result(
        self,
        job_id: str,
        slice_: int,
        token: str,
        worker: str,
        code: str,
        message: str,
        now: float,
    ) -> str:
        """The result failed verification (or its metrics are implausible): not paid, the
        slice goes back to the queue (or fails once its attempts are used), the worker's record
        shows it, and the lease's token ends."""
        with self._tx() as db:
            of = self._lock_input(db, job_id, slice_)
            state, attempts, max_attempts, _offer = self._fenced(db, job_id, slice_, token, worker)
            if state is not SliceState.LEASED and state is not SliceState.QUEUED:
                raise StaleLease(f"slice {job_id}/{slice_} is {state.value}")
            new: SliceState = state
            if state is SliceState.LEASED:  # if it expired meanwhile, nothing to release
                new = self._release(
                    db,
                    job_id,
                    slice_,
                    state,
                    attempts,
                    max_attempts,
                    SliceEvent.FAIL,
                    code,
                    message[:2000],
                    now,
                )
            # The token dies with the rejection: a resubmission under it is stale_lease and
            # costs no second verifier run.
            db.execute(
                "UPDATE slices SET rejected_by=?, token=NULL WHERE job=? AND idx=?",
                (worker.lower(), job_id, slice_),
            )
            self._count(db, worker, "rejected", now)
            self._refusal(db, job_id, worker, code, message, now)
            if of is not None and new is SliceState.FAILED:
                self._decide(db, job_id, [of], now)
        return new.value

    def fail_slice(
        self,
        job_id: str,
        slice_: int,
        token: str,
        worker: str,
        code: str,
        message: str,
        now: float,
    ) -> str:
        with self._tx() as db:
            of = self._lock_input(db, job_id, slice_)
            state, attempts, max_attempts, _offer = self._fenced(db, job_id, slice_, token, worker)
            if state is not SliceState.LEASED:
                raise StaleLease(f"slice {job_id}/{slice_}: not leased under this token")
            new = self._release(
                db,
                job_id,
                slice_,
                state,
                attempts,
                max_attempts,
                SliceEvent.FAIL,
                code,
                message[:2000],
                now,
            )
            self._count(db, worker, "failed", now)
            if of is not None and new is SliceState.FAILED:
                self._decide(db, job_id, [of], now)
        return new.value

    def return_slices(
        self,
        worker: str,
        refs: list[LeaseRef],
        code: str = "",
        message: str = "",
        now: float = 0.0,
    ) -> int:
        """Give back leased slices (their attempt is refunded). With ``code``, the worker
        refused them: the refusal is recorded for the job and the worker."""
        returned = 0
        with self._tx() as db:
            for ref in refs:
                job_id, idx = ref.job, ref.slice
                try:
                    state, current, holder, attempts, max_attempts, _o, _w = self._current(
                        db, job_id, idx
                    )
                except UnknownSlice:
                    continue
                if (
                    state is SliceState.LEASED
                    and current == ref.token
                    and (holder or "").lower() == worker.lower()
                ):
                    self._release(
                        db,
                        job_id,
                        idx,
                        state,
                        attempts,
                        max_attempts,
                        SliceEvent.RETURN,
                        code,
                        message,
                        now,
                    )
                    returned += 1
                    if code:
                        self._refusal(db, job_id, worker, code, message, now)
                        self._count(db, worker, "refused", now)
        return returned

    def expire_leases(self, now: float) -> int:
        """Put back the slices whose lease is past its deadline; 0 while another replica is
        at it."""
        with self._exclusively("expiry") as mine, self._tx() as db:
            if not mine:
                return 0
            rows = db.execute(
                "SELECT s.job, s.idx, s.attempts, j.max_attempts FROM slices s"
                " JOIN jobs j ON j.id = s.job WHERE s.state='leased' AND s.deadline < ?"
                f" ORDER BY s.job, s.idx{self._lock('s')}{self.SKIP_LOCKED}",
                (now,),
            ).fetchall()
            exhausted = [
                (job_id, idx) for job_id, idx, attempts, maximum in rows if attempts >= maximum
            ]
            for job_id, idx, attempts, max_attempts in rows:
                self._release(
                    db,
                    job_id,
                    idx,
                    SliceState.LEASED,
                    attempts,
                    max_attempts,
                    SliceEvent.EXPIRE,
                    "lease_expired",
                    "the lease expired without a result",
                    now,
                )
            inputs = self._inputs_of(db, exhausted)
        # A replica that used its attempts: its slice is decided in a transaction of its own,
        # which locks the slice before its replicas (this one locked replicas first).
        for (job_id, _idx), of in sorted(inputs.items()):
            with self._tx() as db:
                self._decide(db, job_id, [of], now)
        return len(rows)

    def extend_leases(self, deadline: float, now: float) -> int:
        """Move every lease's deadline to at least ``deadline``: at start (at ``now``), so
        that workers which held leases while the scheduler was down can come back and
        deliver."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE slices SET deadline=? WHERE state='leased' AND deadline < ?",
                (deadline, deadline),
            )
        return cur.rowcount

    # ------------------------------------------------------------------ admin

    def reset_job(self, job_id: str, now: float = 0.0) -> int:
        with self._tx() as db:
            row = db.execute("SELECT 1 FROM jobs WHERE id=?" + self._lock(), (job_id,))
            if row.fetchone() is None:
                raise UnknownJob(f"no job {job_id}")
            policy = self._policy(db, job_id)[0]
            if policy is not None:
                return self._reset_replicated(db, job_id, policy, now)
            new = transition(SliceState.FAILED, SliceEvent.RESET).value
            cur = db.execute(
                "UPDATE slices SET state=?, attempts=0, token=NULL, worker=NULL, deadline=NULL,"
                " rejected_by=NULL WHERE job=? AND state='failed'",
                (new, job_id),
            )
            if cur.rowcount:
                db.execute(
                    "UPDATE jobs SET state='active', finished=NULL, remaining=remaining+?"
                    " WHERE id=? AND state!='cancelled'",
                    (cur.rowcount, job_id),
                )
        return cur.rowcount

    def _reset_replicated(self, db: Connection, job_id: str, policy: Redundancy, now: float) -> int:
        """Reset a replicated job's failed slices: their replicas are removed (their votes
        with them) and each starts again with its first replicas. The escrow was refunded
        when the job finished: a reset job pays what it needs again from the owner."""
        failed = [
            int(r[0])
            for r in db.execute(
                "SELECT idx FROM slices WHERE job=? AND state='failed' AND replica_of IS NULL"
                " ORDER BY idx",
                (job_id,),
            )
        ]
        if not failed:
            return 0
        owner, offer, escrow = db.execute(
            "SELECT owner, offer_micro, escrow_micro FROM jobs WHERE id=?", (job_id,)
        ).fetchone()
        need = offer * policy.quorum * len(failed) - escrow
        if need > 0:
            balance = _ledger.balance(db, owner, self._lock())
            if balance < need:
                raise InsufficientFunds(owner, need, balance)
            _ledger.move(db, "escrow", owner, f"escrow:{job_id}", need, now, job_id)
        for idx in failed:
            db.execute(
                "DELETE FROM slices INDEXED BY slices_by_input WHERE job=? AND replica_of=?",
                (job_id, idx),
            )
            db.execute(
                "UPDATE slices SET state='voting', needed=?, error_code=NULL, error=NULL"
                " WHERE job=? AND idx=?",
                (policy.first_replicas(), job_id, idx),
            )
            _votes.make_replicas(db, job_id, idx, policy.first_replicas())
        db.execute(
            "UPDATE jobs SET state='active', finished=NULL, remaining=remaining+?"
            " WHERE id=? AND state!='cancelled'",
            (len(failed), job_id),
        )
        return len(failed)

    def _refund(self, db: Connection, job_id: str, now: float) -> None:
        owner, escrow = db.execute(
            "SELECT owner, escrow_micro FROM jobs WHERE id=?", (job_id,)
        ).fetchone()
        _ledger.move(db, "refund", f"escrow:{job_id}", owner, escrow, now, job_id)

    def cancel_job(self, job_id: str, now: float) -> int:
        """Cancel queued and leased slices and refund what is left in escrow."""
        with self._tx() as db:
            row = db.execute("SELECT state FROM jobs WHERE id=?" + self._lock(), (job_id,))
            if row.fetchone() is None:
                raise UnknownJob(f"no job {job_id}")
            cur = db.execute(
                "UPDATE slices SET state=?, deadline=NULL WHERE job=? AND state IN (?, ?, ?)",
                (
                    SliceState.CANCELLED.value,
                    job_id,
                    SliceState.QUEUED.value,
                    SliceState.LEASED.value,
                    SliceState.VOTING.value,
                ),
            )
            db.execute(
                "UPDATE jobs SET state='cancelled', remaining=0, finished=coalesce(finished, ?)"
                " WHERE id=?",
                (now, job_id),
            )
            self._refund(db, job_id, now)
        return cur.rowcount

    def remove_job(self, job_id: str, now: float = 0.0) -> None:
        """Delete a job, its slices and results; refund its escrow first. The ledger keeps
        its entries."""
        with self._tx() as db:
            # Locked: a second replica removing it waits, then finds it gone (never two refunds)
            row = db.execute("SELECT 1 FROM jobs WHERE id=?" + self._lock(), (job_id,))
            if row.fetchone() is None:
                raise UnknownJob(f"no job {job_id}")
            self._refund(db, job_id, now)
            db.execute("DELETE FROM jobs WHERE id=?", (job_id,))
            db.execute("DELETE FROM refusals WHERE job=?", (job_id,))
        self._priced.pop(job_id, None)
        self._policies.pop(job_id, None)

    def collect_garbage(self, now: float, lifetime: float) -> list[str]:
        """Remove jobs finished or cancelled more than ``lifetime`` seconds ago (their escrow
        refunded first); returns their ids. The ledger keeps their entries. Nothing while
        another replica is at it."""
        removed: list[str] = []
        with self._exclusively("gc") as mine:
            if not mine:
                return removed
            rows = self._db.execute(
                "SELECT id FROM jobs WHERE state IN ('finished', 'cancelled') AND finished < ?",
                (now - lifetime,),
            ).fetchall()
            for (job_id,) in rows:
                try:
                    self.remove_job(job_id, now)
                except UnknownJob:
                    continue  # removed meanwhile by an admin command
                removed.append(job_id)
        return removed

    # ------------------------------------------------------------------ owner requests

    def use_nonce(self, address: str, nonce: str, now: float, keep_until: float) -> bool:
        with self._tx() as db:
            db.execute("DELETE FROM request_nonces WHERE keep_until < ?", (now,))
            cur = db.execute(
                "INSERT INTO request_nonces VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                (address.lower(), nonce, keep_until),
            )
            return cur.rowcount == 1

    _TOKEN_COLUMNS = "id, job, created, expires, revoked"

    def create_read_token(
        self, job_id: str, token_sha256: str, now: float, expires: float
    ) -> ReadTokenRecord:
        token_id = secrets.token_hex(8)
        with self._tx() as db:
            if db.execute("SELECT 1 FROM jobs WHERE id=?", (job_id,)).fetchone() is None:
                raise UnknownJob(f"no job {job_id}")
            db.execute(
                "INSERT INTO read_tokens VALUES (?, ?, ?, ?, ?, NULL)",
                (token_id, job_id, token_sha256, now, expires),
            )
        return ReadTokenRecord(token_id, job_id, now, expires, None)

    def read_token(self, token_sha256: str) -> ReadTokenRecord | None:
        row = self._db.execute(
            f"SELECT {self._TOKEN_COLUMNS} FROM read_tokens WHERE token_sha256=?",
            (token_sha256,),
        ).fetchone()
        return None if row is None else ReadTokenRecord(*row)

    def revoke_read_token(self, job_id: str, token_id: str, now: float) -> bool:
        with self._tx() as db:
            cur = db.execute(
                "UPDATE read_tokens SET revoked = coalesce(revoked, ?) WHERE id=? AND job=?",
                (now, token_id, job_id),
            )
            return cur.rowcount == 1

    # ------------------------------------------------------------------ groups, workers

    def create_group(self, name: str, join_key: str, join_hash: str, now: float) -> None:
        with self._tx() as db:
            try:
                db.execute(
                    "INSERT INTO groups VALUES (?, ?, ?, ?)", (join_key, name, join_hash, now)
                )
            except self.UNIQUE_VIOLATION:
                raise DuplicateGroup(f"a group with join key {join_key!r} exists") from None

    def groups(self) -> list[GroupRecord]:
        rows = self._db.execute(
            "SELECT join_key, name, join_hash, created FROM groups ORDER BY created"
        )
        return [GroupRecord(*row) for row in rows]

    def seen_worker(self, address: str, now: float) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO workers (address, first_seen, last_seen) VALUES (?, ?, ?)"
                " ON CONFLICT(address) DO UPDATE SET last_seen = excluded.last_seen",
                (address.lower(), now, now),
            )

    _WORKER_COLUMNS = (
        "w.address, first_seen, last_seen, accepted, rejected, failed, refused, earned_micro,"
        " valid, invalid, consecutive_valid, b.reason FROM workers w"
        " LEFT JOIN blocklist b ON b.address = w.address"
    )

    def workers(self) -> list[WorkerRecord]:
        rows = self._db.execute(f"SELECT {self._WORKER_COLUMNS} ORDER BY first_seen")
        return [WorkerRecord(*row) for row in rows]

    def worker(self, address: str) -> WorkerRecord | None:
        row = self._db.execute(
            f"SELECT {self._WORKER_COLUMNS} WHERE w.address=?", (address.lower(),)
        ).fetchone()
        return None if row is None else WorkerRecord(*row)

    def payee(self, address: str) -> PayeeRecord | None:
        row = self._db.execute(
            "SELECT p.address, valid, invalid, consecutive_valid, earned_micro, b.reason"
            " FROM payees p LEFT JOIN blocklist b ON b.address = p.address WHERE p.address=?",
            (address.lower(),),
        ).fetchone()
        return None if row is None else PayeeRecord(*row)

    def block(self, address: str, reason: str, now: float) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO blocklist VALUES (?, ?, ?) ON CONFLICT(address) DO UPDATE"
                " SET reason = excluded.reason, at = excluded.at",
                (address.lower(), reason[:500], now),
            )

    def unblock(self, address: str) -> bool:
        with self._tx() as db:
            cur = db.execute("DELETE FROM blocklist WHERE address=?", (address.lower(),))
            return cur.rowcount == 1

    def blocked(self) -> dict[str, str]:
        return {a: r for a, r in self._db.execute("SELECT address, reason FROM blocklist")}

    def replicas(self, job_id: str, input_: int | None = None) -> list[ReplicaRecord]:
        self.job_state(job_id)
        params: tuple[Any, ...] = (job_id,) if input_ is None else (job_id, input_)
        rows = self._db.execute(
            "SELECT job, replica_of, idx, state, worker, payment_address, result, vote,"
            " accepted_at, error_code FROM slices INDEXED BY slices_by_input"
            " WHERE job=? AND replica_of IS NOT NULL"
            f"{'' if input_ is None else ' AND replica_of=?'} ORDER BY replica_of, idx",
            params,
        )
        return [self._replica(r) for r in rows]

    def disagreements(self, address: str, limit: int = 20) -> list[ReplicaRecord]:
        """The last replicas of ``address`` (an identity or a payment address) that were
        outvoted or caught, newest first."""
        rows = self._db.execute(
            "SELECT job, replica_of, idx, state, worker, payment_address, result, vote,"
            " accepted_at, error_code FROM slices WHERE vote='disagreed'"
            " AND (lower(worker)=? OR lower(payment_address)=?) ORDER BY accepted_at DESC LIMIT ?",
            (address.lower(), address.lower(), limit),
        )
        return [self._replica(r) for r in rows]

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

    def vote_representatives(self, job_id: str, slice_: int) -> list[tuple[str, bytes]]:
        """For the replica ``slice_`` of a replicated job: the known answer of its slice (if
        the owner gave one) and the first result of each distinct vote key so far, each with
        its key, in order (acceptance compares a new result with them)."""
        row = self._db.execute(
            "SELECT i.idx, i.expected FROM slices r JOIN slices i ON i.job = r.job"
            " AND i.idx = r.replica_of WHERE r.job=? AND r.idx=?",
            (job_id, slice_),
        ).fetchone()
        if row is None:
            return []
        out: list[tuple[str, bytes]] = []
        if row[1] is not None:
            out.append((_votes.vote_key(bytes(row[1])), bytes(row[1])))
        seen = {k for k, _ in out}
        for key, result in self._db.execute(
            "SELECT vote_key, result FROM slices INDEXED BY slices_by_input"
            " WHERE job=? AND replica_of=? AND state='done'"
            " AND vote_key IS NOT NULL AND (vote IS NULL OR vote != 'forfeit') ORDER BY idx",
            (job_id, row[0]),
        ):
            if key not in seen:
                seen.add(key)
                out.append((key, bytes(result)))
        return out

    def record_refusal(self, job_id: str, worker: str, code: str, message: str, now: float) -> None:
        with self._tx() as db:
            self._refusal(db, job_id, worker, code, message, now)

    def refusals(self, job_id: str | None = None) -> list[RefusalRecord]:
        query = "SELECT job, worker, code, count, message, last FROM refusals"
        rows = (
            self._db.execute(query + " WHERE job=? ORDER BY last", (job_id,))
            if job_id is not None
            else self._db.execute(query + " ORDER BY last")
        )
        return [RefusalRecord(*row) for row in rows]
