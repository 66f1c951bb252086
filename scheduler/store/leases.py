"""The store's leases room: claiming queued slices for a worker (a replicated job's replicas kept
apart), heartbeats, a worker's failures and returns, and the expiry of leases nobody renewed.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Iterable

from dcp_protocol import (
    LeaseRef,
    SliceEvent,
    SliceState,
    transition,
)

from . import (
    Lease,
    StaleLease,
    UnknownSlice,
)
from .dbapi import Connection
from .jobs import JobsRoom
from .sqlbase import (
    QUEUED_OF_JOB,
    QUEUED_REPLICAS_OF_JOB,
    _per_slice,
)


class LeasesRoom(JobsRoom):
    """Leases: who holds which slice under which token until when (fenced: a token is
    current or stale)."""

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
            # Both reads asked before either is read: one round trip for the two in
            # PostgreSQL's pipeline mode (scheduler/store/postgres.py).
            holding = (
                db.execute(
                    "SELECT count(*) FROM slices INDEXED BY slices_by_worker"
                    " WHERE worker=? AND state='leased'",
                    (worker,),
                )
                if max_held is not None
                else None
            )
            jobs_in_order = db.execute(
                "SELECT id, offer_micro, redundancy IS NOT NULL FROM jobs"
                f" WHERE state='active'{where} ORDER BY seq",
                params,
            )
            if holding is not None and max_held is not None:
                (held,) = holding.fetchone()
                max_slices = min(max_slices, max_held - held)
            order = jobs_in_order.fetchall()
            who, pays = worker.lower(), (payee or worker).lower()
            # (job, index, attempts, the index its datum is kept under, offer, the datum or
            # None where it is still to be read)
            picked: list[tuple[str, int, int, int, int, bytes | None]] = []
            for job_id, offer, replicated in order:
                want = max_slices - len(picked)
                if want <= 0:
                    break
                # Job by job through the state index: a query over all jobs at once walked
                # every slice of the job (done ones included) and grew with its progress.
                rows: Iterable[tuple[int, int, int, bytes | None]]
                if replicated:
                    rows = (
                        (idx, attempts, of, None)
                        for idx, attempts, of in self._queued_replicas(
                            db, job_id, who, pays, network, want
                        )
                    )
                else:
                    rows = (
                        (idx, attempts, idx, datum)
                        for idx, attempts, datum in db.execute(
                            f"{QUEUED_OF_JOB}{self._lock('s')}{self.SKIP_LOCKED}",
                            (job_id, who, want),
                        )
                    )
                picked.extend(
                    (job_id, idx, attempts, of, offer, datum) for idx, attempts, of, datum in rows
                )
            # A replica's datum is its input's, read after the replicas are chosen (the rows
            # read and skipped there would carry datums for nothing).
            datums = {
                (job_id, idx): datum
                for job_id, (idx, datum) in _per_slice(
                    db,
                    [(job_id, of) for job_id, _i, _a, of, _o, datum in picked if datum is None],
                    "SELECT idx, datum FROM slice_data WHERE job=? AND idx IN ({marks})",
                )
            }
            for job_id, idx, attempts, of, offer, datum in picked:
                token = secrets.token_hex(16)
                updates.append(
                    (new_state, token, worker, deadline, now, pays, network, job_id, idx)
                )
                leases.append(
                    Lease(
                        job_id,
                        idx,
                        token,
                        attempts + 1,
                        deadline,
                        bytes(datums[(job_id, of)] if datum is None else datum),
                        offer,
                    )
                )
            db.executemany(
                "UPDATE slices SET state=?, token=?, worker=?, deadline=?, leased_at=?, payee=?,"
                " network=?, attempts=attempts+1, progress=NULL WHERE job=? AND idx=?",
                updates,
            )
        return leases

    def _queued_replicas(
        self, db: Connection, job_id: str, who: str, pays: str, network: str | None, want: int
    ) -> list[tuple[int, int, int]]:
        """Up to ``want`` queued replicas of distinct slices that ``who`` (paid to ``pays``,
        from ``network``) may compute, locked: (index, attempts, its input's index)."""
        policy = self._policy(db, job_id)[0]
        assert policy is not None
        apart = network if policy.distinct_networks and network else None
        rows = db.execute(
            f"{QUEUED_REPLICAS_OF_JOB}{self._lock('s')}{self.SKIP_LOCKED}",
            (job_id, who, who, pays, pays, apart, want * policy.quorum),
        ).fetchall()
        taken: set[int] = set()
        out = []
        for idx, attempts, of in rows:
            if of in taken:
                continue
            taken.add(of)
            out.append((idx, attempts, of))
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
        def once() -> str:  # one transaction: run again where the engine rolled it back
            with self._tx() as db:
                of = self._lock_input(db, job_id, slice_)
                state, attempts, max_attempts, _offer = self._fenced(
                    db, job_id, slice_, token, worker
                )
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

        return self._again(once)

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
            # Each run again on its own where the engine rolled it back (the releases above
            # are committed: running the whole call again would find nothing to decide).
            self._again(functools.partial(self._decide_alone, job_id, of, now))
        return len(rows)

    def _decide_alone(self, job_id: str, input_: int, now: float) -> None:
        with self._tx() as db:
            self._decide(db, job_id, [input_], now)

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

    def _lock_input(self, db: Connection, job_id: str, idx: int) -> int | None:
        """Before a single replica's row is locked: lock its job's row and its slice's (the
        order every transaction that may decide votes takes them in: :meth:`_lock_job`); the
        slice, or None for a slice of an unreplicated job."""
        of = self._inputs_of(db, [(job_id, idx)]).get((job_id, idx))
        if of is not None:
            self._lock_job(db, job_id)
            db.execute("SELECT 1 FROM slices WHERE job=? AND idx=?" + self._lock(), (job_id, of))
        return of
