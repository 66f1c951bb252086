"""The store's jobs room: deploying a job (its slices, and a replicated job's replicas), reading
jobs and slices, deciding a replicated slice from its replicas' votes, and the admin's changes
(reset, cancel, remove, garbage collection) with their refunds.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

from dcp_protocol import (
    Limits,
    Metrics,
    SliceEvent,
    SliceState,
    transition,
)
from dcp_protocol.states import FINAL_STATES

from ..quorum import Redundancy
from . import (
    InsufficientFunds,
    JobRecord,
    NewJob,
    ReplicaRecord,
    SliceRecord,
    UnknownJob,
    UnknownSlice,
)
from . import ledger as _ledger
from . import votes as _votes
from .dbapi import Connection
from .sqlbase import (
    ACTIVE_JOBS,
    SQLBase,
    replica_position,
)


class JobsRoom(SQLBase):
    """Jobs and their slices, as deployed, read and changed by an owner or an admin."""

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
                self._insert_many(
                    db,
                    "slices",
                    ("job", "idx", "state"),
                    ((job_id, i, "queued") for i in range(len(job.data))),
                )
                self._insert_data(db, job_id, job)
            else:
                self._create_inputs(db, job_id, job, policy)
            _ledger.move(db, "escrow", job.owner, f"escrow:{job_id}", escrow, now, job_id)
            if not job.data:
                db.execute("UPDATE jobs SET state='finished', finished=? WHERE id=?", (now, job_id))
        return job_id

    def _insert_data(self, db: Connection, job_id: str, job: NewJob) -> None:
        """The datums of a new job's slices (schema 9: out of the slice rows, which change)."""
        self._insert_many(
            db,
            "slice_data",
            ("job", "idx", "datum"),
            ((job_id, i, datum) for i, datum in enumerate(job.data)),
        )

    def _create_inputs(self, db: Connection, job_id: str, job: NewJob, policy: Redundancy) -> None:
        """A replicated job's slices, ``voting``, each with its first replicas (the adaptive
        policy's one, or the quorum), queued REPLICA_SPREAD slices apart (below)."""
        first = policy.first_replicas()
        self._insert_many(
            db,
            "slices",
            ("job", "idx", "state", "needed", "expected"),
            ((job_id, i, "voting", first, job.known.get(i)) for i in range(len(job.data))),
        )
        self._insert_data(db, job_id, job)
        total = len(job.data)
        self._insert_many(  # a replica reads its input's datum
            db,
            "slices",
            ("job", "idx", "state", "replica_of"),
            (
                (job_id, total + replica_position(i, r, total, first), "queued", i)
                for i in range(total)
                for r in range(first)
            ),
        )
        db.execute("UPDATE jobs SET next_idx=? WHERE id=?", (total + total * first, job_id))

    def _lock_job(self, db: Connection, job_id: str) -> None:
        """Lock a replicated job's row before any of its slices: every transaction that
        decides votes takes it first (and so they run one at a time per job). A decision
        may reopen other slices' decisions (a caught liar's votes are forfeited) and lock them
        after writing the job's row (new replicas, a final slice); taken the other way round
        by two transactions, slices then the job's row, the two deadlocked (8 deadlocks in
        two runs of tests/test_redundancy_e2e.py on PostgreSQL with a replica's calls on
        several connections; none in 8 runs since)."""
        db.execute("SELECT 1 FROM jobs WHERE id=?" + self._lock(), (job_id,))

    def _decide(self, db: Connection, job_id: str, inputs: Iterable[int], now: float) -> None:
        """Decide the replicated slices ``inputs`` of ``job_id`` (and those a caught liar's
        forfeited votes reopen), then refund the escrow left if the job is finished. The
        job's row is locked first unless the transaction holds it (:meth:`_lock_job`)."""
        policy, offer = self._policy(db, job_id)
        if policy is None:
            return
        self._lock_job(db, job_id)
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
            "SELECT d.datum FROM slices s JOIN slice_data d ON d.job=s.job"
            " AND d.idx=coalesce(s.replica_of, s.idx) WHERE s.job=? AND s.idx=?",
            (job_id, slice_),
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
        self,
        job_id: str,
        after: int = -1,
        limit: int = 1000,
        final_prefix: bool = False,
        max_bytes: int | None = None,
    ) -> list[SliceRecord]:
        self.job_state(job_id)
        cursor = self._db.execute(
            "SELECT job, idx, state, attempts, worker, deadline, error_code, error, result,"
            " payment_address, accepted_at, metrics, progress, needed FROM slices WHERE job=?"
            " AND idx>? AND replica_of IS NULL ORDER BY idx LIMIT ?",
            (job_id, after, limit),
        )
        out: list[SliceRecord] = []
        size = 0
        for r in cursor:
            if final_prefix and SliceState(r[2]) not in FINAL_STATES:
                break  # rows are read lazily: stopping here reads no further
            if max_bytes is not None and out and size >= max_bytes:
                break
            size += 0 if r[8] is None else len(r[8])
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

    def vote_representatives(self, job_id: str, slice_: int) -> list[tuple[str, bytes]]:
        """For the replica ``slice_`` of a replicated job: the known answer of its slice (if
        the owner gave one) and the first result of each distinct vote key so far, each with
        its key, in order (acceptance compares a new result with them)."""
        return self._representatives(self._db, job_id, slice_)

    @staticmethod
    def _representatives(db: Connection, job_id: str, slice_: int) -> list[tuple[str, bytes]]:
        row = db.execute(
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
        for key, result in db.execute(
            "SELECT vote_key, result FROM slices INDEXED BY slices_by_input"
            " WHERE job=? AND replica_of=? AND state='done'"
            " AND vote_key IS NOT NULL AND (vote IS NULL OR vote != 'forfeit') ORDER BY idx",
            (job_id, row[0]),
        ):
            if key not in seen:
                seen.add(key)
                out.append((key, bytes(result)))
        return out

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
