"""The store's results room: a result checked against its lease, accepted with the payment and
the job's price in one transaction, or rejected; a replicated slice's vote recorded and decided.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from dcp_protocol import (
    IllegalTransition,
    LeaseRef,
    SliceEvent,
    SliceState,
    transition,
)

from . import (
    DatabaseError,
    ResultLease,
    ResultRow,
    Settled,
    StaleLease,
    StoreError,
    UnknownSlice,
    VotesChanged,
)
from . import ledger as _ledger
from . import votes as _votes
from .dbapi import Connection
from .leases import LeasesRoom
from .sqlbase import (
    PRICE_EXACT_WORKERS,
    PRICE_INTERVAL,
    PRICE_MIN_WORKERS,
    SLICES_TO_SETTLE,
    _per_slice,
)


class _Writes:
    """A batch of acceptances' writes, sent together: one executemany for the slices' rows
    and one for the ledger's, and one credit per payee (:func:`ledger.pay`). Sent one
    statement per result, they were PostgreSQL's largest cost per slice after the network
    (a statement's round of psycopg's pipeline, about 0.3 ms of the scheduler's time)."""

    def __init__(self) -> None:
        #: The accepted slices' UPDATE parameters.
        self.slices: list[tuple[Any, ...]] = []
        #: (escrow account, payee, amount, job, slice) per paid result.
        self.payments: list[tuple[str, str, int, str, int]] = []

    def flush(self, db: Connection, now: float) -> None:
        db.executemany(
            "UPDATE slices SET state=?, result=?, signature=?, payment_address=?, metrics=?,"
            " accepted_at=?, deadline=NULL, error_code=NULL, error=NULL, vote_key=?"
            " WHERE job=? AND idx=?",
            self.slices,
        )
        _ledger.pay(db, self.payments, now)
        self.slices, self.payments = [], []


class ResultsRoom(LeasesRoom):
    """Results: acceptance and settlement (the ledger rows in the same transaction), pricing,
    rejection."""

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
                "SELECT s.idx, s.state, s.token, s.worker, s.leased_at, length(d.datum)"
                " FROM slices s JOIN slice_data d ON d.job=s.job"
                " AND d.idx=coalesce(s.replica_of, s.idx) WHERE s.job=? AND s.idx IN ({marks})",
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

    def accept_result(self, worker: str, row: ResultRow, now: float) -> Settled:
        """Accept a result once and pay its slice's offer to its payment address.

        Returns:
            ``accepted`` with the micro-credits paid, or ``duplicate`` for a resubmission.
        """
        (outcome,) = self.accept_results(worker, [row], now)
        if isinstance(outcome, StoreError):
            raise outcome
        return outcome

    def accept_results(
        self, worker: str, rows: list[ResultRow], now: float
    ) -> list[Settled | StoreError]:
        """:meth:`accept_result` for many results in one transaction (one commit for a
        batch). Each item's outcome is its own: a stale or unknown one is its StoreError and
        changes nothing, the others are accepted."""
        outcomes: list[Settled | StoreError] = [StoreError("not accepted")] * len(rows)
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
            for job_id in sorted({j for j, _ in inputs}):  # votes are decided below
                self._lock_job(db, job_id)
            # A replicated slice's row before its replicas' (scheduler/store/votes.py): inputs
            # have lower indices than every replica, so one sorted order takes both.
            locked = self._lock_slices(
                db, sorted({*keys, *((j, i) for (j, _), i in inputs.items())})
            )
            writes = _Writes()
            for i in order:
                row = rows[i]
                try:
                    # A refusal (stale, unknown) is raised before the item writes anything,
                    # so the batch goes on without it; a database error ends the batch.
                    outcome = self._accept(db, worker, row, now, locked, writes)
                except DatabaseError:
                    raise
                except StoreError as exc:
                    outcomes[i] = exc
                else:
                    outcomes[i] = outcome
                    if outcome.status == "accepted":
                        m = row.metrics
                        vote = (row.job, row.slice) in inputs
                        add = (
                            1,
                            outcome.credited_micro,
                            m.cpu_seconds,
                            m.gpu_seconds,
                            m.bytes_in,
                            m.bytes_out,
                        )
                        acc = sums.setdefault(row.job, [0, 0, 0.0, 0.0, 0, 0, 0])
                        for k, v in enumerate(add):
                            acc[k] += v
                        if vote:  # decided below: no slice of the job is final by it alone
                            voted.setdefault(row.job, set()).add(inputs[(row.job, row.slice)])
                        else:
                            acc[6] += 1
            writes.flush(db, now)
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
                SLICES_TO_SETTLE + self._lock("s"),
            )
        }

    def _accept(
        self,
        db: Connection,
        worker: str,
        row: ResultRow,
        now: float,
        locked: dict[tuple[str, int], tuple[SliceState, str | None, str | None, int]],
        writes: _Writes,
    ) -> Settled:
        """Accept one result of a batch whose slices ``locked`` holds (kept current: an
        accepted slice is marked done there, so the same result twice is a duplicate); its
        writes go to ``writes``, which the batch flushes before it reads what they change."""
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
            return Settled("duplicate")  # resubmission of the accepted result: harmless
        try:
            new = transition(state, SliceEvent.ACCEPT)
        except IllegalTransition:
            raise StaleLease(f"slice {job_id}/{slice_} is {state.value}") from None
        replica = self._policy(db, job_id)[0] is not None
        if replica and row.votes_seen is not None:
            # The slice's input is locked (accept_results): no vote can be accepted between
            # this read and the commit. The batch's votes so far written first.
            writes.flush(db, now)
            now_seen = tuple(k for k, _ in self._representatives(db, job_id, slice_))
            if now_seen != row.votes_seen:
                raise VotesChanged(
                    f"slice {job_id}/{slice_}: {len(now_seen)} vote(s) now, where its"
                    f" comparison saw {len(row.votes_seen)}"
                )
        locked[key] = (new, current, holder, offer)
        writes.slices.append(
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
            )
        )
        if replica:
            return Settled("accepted")  # a vote: paid once its slice's replicas agree
        # The job's row, its cost sums and the worker's counters: once per batch
        # (accept_results); the escrow is debited there too.
        if offer > 0:
            writes.payments.append((f"escrow:{job_id}", row.payment_address, offer, job_id, slice_))
        return Settled("accepted", offer)

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

        def once() -> str:  # one transaction: run again where the engine rolled it back
            with self._tx() as db:
                of = self._lock_input(db, job_id, slice_)
                state, attempts, max_attempts, _offer = self._fenced(
                    db, job_id, slice_, token, worker
                )
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

        return self._again(once)
