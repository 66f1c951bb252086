"""The SQLite store (WAL mode): the embedded default backend of the scheduler.

Every public method is one ``BEGIN IMMEDIATE`` transaction, so leasing is atomic even with an
admin command writing from another process. Slice state changes go through the table in
:mod:`dcp_worker.protocol.states`.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dcp_worker.protocol import (
    IllegalTransition,
    LeaseRef,
    Limits,
    Metrics,
    SliceEvent,
    SliceState,
    transition,
)
from dcp_worker.protocol.states import FINAL_STATES

from .store import (
    JobRecord,
    Lease,
    NewJob,
    SliceRecord,
    StaleLease,
    StoreError,
    UnknownJob,
    UnknownSlice,
)

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    runtime TEXT NOT NULL,
    module BLOB NOT NULL,
    module_sha256 TEXT NOT NULL,
    argv TEXT NOT NULL,
    limits TEXT NOT NULL,
    offer REAL NOT NULL,
    payload_sha256 TEXT NOT NULL UNIQUE,
    total INTEGER NOT NULL,
    remaining INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL,
    created REAL NOT NULL,
    finished REAL
);
CREATE TABLE IF NOT EXISTS slices (
    job TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    state TEXT NOT NULL,
    datum BLOB NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    token TEXT,
    worker TEXT,
    deadline REAL,
    progress REAL,
    result BLOB,
    signature TEXT,
    payment_address TEXT,
    metrics TEXT,
    accepted_at REAL,
    error_code TEXT,
    error TEXT,
    PRIMARY KEY (job, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS slices_by_state ON slices (state, job, idx);
"""


class SQLiteStore:
    """:class:`scheduler.store.Store` on one SQLite database file."""

    def __init__(self, path: str | Path) -> None:
        try:
            self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=10000")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
            self._db.execute(
                "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the database {path}: {exc}") from exc
        (version,) = self._db.execute(
            "SELECT value FROM meta WHERE key='schema_version'"
        ).fetchone()
        if int(version) != SCHEMA_VERSION:
            raise StoreError(f"database schema {version} is not {SCHEMA_VERSION}")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"database unavailable: {exc}") from exc
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        else:
            self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()

    # ------------------------------------------------------------------ jobs

    def create_job(self, job: NewJob, now: float) -> str:
        job_id = secrets.token_hex(16)
        with self._tx() as db:
            existing = db.execute(
                "SELECT id FROM jobs WHERE payload_sha256=?", (job.payload_sha256,)
            ).fetchone()
            if existing:
                return str(existing[0])  # a replayed deploy: the same job, not a second one
            db.execute(
                "INSERT INTO jobs (id, owner, name, state, runtime, module, module_sha256, argv,"
                " limits, offer, payload_sha256, total, remaining, max_attempts, created)"
                " VALUES (?, ?, ?, 'active', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    job.owner,
                    job.name,
                    job.runtime,
                    job.module,
                    job.module_sha256,
                    json.dumps(list(job.argv)),
                    json.dumps(asdict(job.limits)),
                    job.offer,
                    job.payload_sha256,
                    len(job.data),
                    len(job.data),
                    job.max_attempts,
                    now,
                ),
            )
            db.executemany(
                "INSERT INTO slices (job, idx, state, datum) VALUES (?, ?, 'queued', ?)",
                ((job_id, i, datum) for i, datum in enumerate(job.data)),
            )
            if not job.data:
                db.execute("UPDATE jobs SET state='finished', finished=? WHERE id=?", (now, job_id))
        return job_id

    _JOB_COLUMNS = (
        "id, owner, name, state, runtime, module_sha256, argv, limits, offer, created,"
        " finished, total, max_attempts"
    )

    def _job_record(self, row: tuple[Any, ...], counts: dict[str, int]) -> JobRecord:
        return JobRecord(
            id=row[0],
            owner=row[1],
            name=row[2],
            state=row[3],
            runtime=row[4],
            module_sha256=row[5],
            argv=tuple(json.loads(row[6])),
            limits=Limits(**json.loads(row[7])),
            offer=row[8],
            created=row[9],
            finished=row[10],
            total=row[11],
            max_attempts=row[12],
            counts=counts,
        )

    def _counts(self, job_id: str) -> dict[str, int]:
        rows = self._db.execute(
            "SELECT state, count(*) FROM slices WHERE job=? GROUP BY state", (job_id,)
        )
        return {state: n for state, n in rows}

    def job(self, job_id: str) -> JobRecord:
        row = self._db.execute(
            f"SELECT {self._JOB_COLUMNS} FROM jobs WHERE id=?", (job_id,)
        ).fetchone()
        if row is None:
            raise UnknownJob(f"no job {job_id}")
        return self._job_record(row, self._counts(job_id))

    def job_module(self, job_id: str) -> bytes:
        row = self._db.execute("SELECT module FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise UnknownJob(f"no job {job_id}")
        return bytes(row[0])

    def list_jobs(self) -> list[JobRecord]:
        rows = self._db.execute(f"SELECT {self._JOB_COLUMNS} FROM jobs ORDER BY seq").fetchall()
        return [self._job_record(row, self._counts(row[0])) for row in rows]

    def job_state(self, job_id: str) -> str:
        row = self._db.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise UnknownJob(f"no job {job_id}")
        return str(row[0])

    def slices(
        self, job_id: str, after: int = -1, limit: int = 1000, final_prefix: bool = False
    ) -> list[SliceRecord]:
        self.job_state(job_id)
        cursor = self._db.execute(
            "SELECT job, idx, state, attempts, worker, deadline, error_code, error, result,"
            " payment_address, accepted_at, metrics, progress FROM slices WHERE job=? AND idx>?"
            " ORDER BY idx LIMIT ?",
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
                )
            )
        cursor.close()
        return out

    # ------------------------------------------------------------------ leases

    def lease(self, worker: str, max_slices: int, now: float, timeout: float) -> list[Lease]:
        deadline = now + timeout
        leases: list[Lease] = []
        with self._tx() as db:
            rows = db.execute(
                "SELECT s.job, s.idx, s.attempts, s.datum FROM slices s"
                " JOIN jobs j ON j.id = s.job"
                " WHERE s.state='queued' AND j.state='active'"
                " ORDER BY j.seq, s.idx LIMIT ?",
                (max_slices,),
            ).fetchall()
            new_state = transition(SliceState.QUEUED, SliceEvent.LEASE).value
            updates = []
            for job_id, idx, attempts, datum in rows:
                token = secrets.token_hex(16)
                updates.append((new_state, token, worker, deadline, job_id, idx))
                leases.append(Lease(job_id, idx, token, attempts + 1, deadline, bytes(datum)))
            db.executemany(
                "UPDATE slices SET state=?, token=?, worker=?, deadline=?, attempts=attempts+1,"
                " progress=NULL WHERE job=? AND idx=?",
                updates,
            )
        return leases

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
        self, db: sqlite3.Connection, job_id: str, idx: int
    ) -> tuple[SliceState, str | None, str | None, int, int]:
        row = db.execute(
            "SELECT s.state, s.token, s.worker, s.attempts, j.max_attempts FROM slices s"
            " JOIN jobs j ON j.id = s.job WHERE s.job=? AND s.idx=?",
            (job_id, idx),
        ).fetchone()
        if row is None:
            raise UnknownSlice(f"no slice {job_id}/{idx}")
        return SliceState(row[0]), row[1], row[2], row[3], row[4]

    def _settle(self, db: sqlite3.Connection, job_id: str, now: float) -> None:
        """One slice of the job reached a final state: finish the job when none is left."""
        db.execute("UPDATE jobs SET remaining = remaining - 1 WHERE id=?", (job_id,))
        db.execute(
            "UPDATE jobs SET state='finished', finished=? WHERE id=? AND remaining<=0"
            " AND state='active'",
            (now, job_id),
        )

    def accept_result(
        self,
        job_id: str,
        slice_: int,
        token: str,
        worker: str,
        result: bytes,
        payment_address: str,
        signature: str,
        metrics: Metrics,
        now: float,
    ) -> str:
        with self._tx() as db:
            state, current, holder, _attempts, _max = self._current(db, job_id, slice_)
            if current != token or (holder or "").lower() != worker.lower():
                raise StaleLease(
                    f"slice {job_id}/{slice_}: lease {token[:8]}... is not the current lease"
                )
            if state is SliceState.DONE:
                return "duplicate"  # resubmission of the accepted result: harmless
            try:
                new = transition(state, SliceEvent.ACCEPT)
            except IllegalTransition:
                raise StaleLease(f"slice {job_id}/{slice_} is {state.value}") from None
            db.execute(
                "UPDATE slices SET state=?, result=?, signature=?, payment_address=?, metrics=?,"
                " accepted_at=?, deadline=NULL, error_code=NULL, error=NULL WHERE job=? AND idx=?",
                (
                    new.value,
                    result,
                    signature,
                    payment_address,
                    json.dumps(asdict(metrics)),
                    now,
                    job_id,
                    slice_,
                ),
            )
            self._settle(db, job_id, now)
        return "accepted"

    def _release(
        self,
        db: sqlite3.Connection,
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
            self._settle(db, job_id, now)
        return new

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
            state, current, holder, attempts, max_attempts = self._current(db, job_id, slice_)
            if (
                state is not SliceState.LEASED
                or current != token
                or (holder or "").lower() != worker.lower()
            ):
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
        return new.value

    def return_slices(self, worker: str, refs: list[tuple[str, int, str]]) -> int:
        returned = 0
        with self._tx() as db:
            for job_id, idx, token in refs:
                try:
                    state, current, holder, attempts, max_attempts = self._current(db, job_id, idx)
                except UnknownSlice:
                    continue
                if (
                    state is SliceState.LEASED
                    and current == token
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
                        "",
                        "",
                        0.0,
                    )
                    returned += 1
        return returned

    def expire_leases(self, now: float) -> int:
        with self._tx() as db:
            rows = db.execute(
                "SELECT s.job, s.idx, s.attempts, j.max_attempts FROM slices s"
                " JOIN jobs j ON j.id = s.job WHERE s.state='leased' AND s.deadline < ?",
                (now,),
            ).fetchall()
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
        return len(rows)

    # ------------------------------------------------------------------ admin

    def reset_job(self, job_id: str) -> int:
        with self._tx() as db:
            if db.execute("SELECT 1 FROM jobs WHERE id=?", (job_id,)).fetchone() is None:
                raise UnknownJob(f"no job {job_id}")
            new = transition(SliceState.FAILED, SliceEvent.RESET).value
            cur = db.execute(
                "UPDATE slices SET state=?, attempts=0, token=NULL, worker=NULL, deadline=NULL"
                " WHERE job=? AND state='failed'",
                (new, job_id),
            )
            if cur.rowcount:
                db.execute(
                    "UPDATE jobs SET state='active', finished=NULL, remaining=remaining+?"
                    " WHERE id=? AND state!='cancelled'",
                    (cur.rowcount, job_id),
                )
        return cur.rowcount

    def cancel_job(self, job_id: str, now: float) -> int:
        with self._tx() as db:
            row = db.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                raise UnknownJob(f"no job {job_id}")
            cur = db.execute(
                "UPDATE slices SET state=?, deadline=NULL WHERE job=? AND state IN (?, ?)",
                (
                    SliceState.CANCELLED.value,
                    job_id,
                    SliceState.QUEUED.value,
                    SliceState.LEASED.value,
                ),
            )
            db.execute(
                "UPDATE jobs SET state='cancelled', remaining=0, finished=coalesce(finished, ?)"
                " WHERE id=?",
                (now, job_id),
            )
        return cur.rowcount

    def remove_job(self, job_id: str) -> None:
        with self._tx() as db:
            if db.execute("DELETE FROM jobs WHERE id=?", (job_id,)).rowcount == 0:
                raise UnknownJob(f"no job {job_id}")
