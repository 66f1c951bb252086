"""Result acceptance: the checks a result passes before its slice is done and its offer paid,
once for a single ``result`` and for each item of ``results`` (docs/protocol.md section 3,
"Result acceptance").

In order: size, lease (token and holder), signature, the blocklist, metrics; then the job's
verifier, if it has one, in the sandboxes of scheduler/verifier.py; for a replicated job with a
comparison function, which earlier vote it agrees with (its vote key); then the store accepts
it, paying the offer (a replica's vote: once its slice's replicas agree, scheduler/quorum.py),
or rejects it, queueing the slice again. Nothing here touches a socket: a reply is a
message, or a coroutine that returns one once a verifier has spoken; a store call is awaited
(scheduler/store/pool.py runs it off the event loop where it can).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Sequence
from dataclasses import replace
from typing import Any

from dcp_protocol import (
    Ack,
    Error,
    ErrorCode,
    ItemAck,
    LeaseRef,
    Message,
    Result,
    ResultItem,
    Results,
    ResultsAck,
    signing,
)

from .blocklist import Blocklist
from .config import SchedulerConfig
from .plausibility import MetricsRules
from .specs import JobSpecs
from .store import ResultLease, ResultRow, Store, StoreError, VotesChanged, credits
from .store.pool import StorePool
from .store.votes import vote_key
from .verifier import VerifierPool
from .wakeups import Wakeups

__all__ = ["Acceptance", "Reply"]

log = logging.getLogger("dcp.scheduler")

#: Comparisons and acceptances a replica's result is given while other replicas' results of
#: its slice are accepted between them (each pass compares with the new votes only).
VOTE_ATTEMPTS = 8

#: A reply now, or one a verifier's verdict decides.
Reply = Message | Coroutine[Any, Any, Message]


def _item_ack(reply: Message) -> ItemAck:
    """A single result's reply as an entry of ``results_ack``."""
    if isinstance(reply, Ack):
        return ItemAck(reply.status, reply.credited)
    if isinstance(reply, Error):
        status = "retry" if reply.code == ErrorCode.INTERNAL.value else "refused"
        return ItemAck(status, code=reply.code, message=reply.message)
    return ItemAck("retry", code=ErrorCode.INTERNAL.value, message=f"unexpected {reply.type}")


class Acceptance:
    """Checks, verifies and stores the results of every session.

    ``worker`` in each call is the session's authenticated identity (it must hold the lease
    and have signed the result); ``owner`` is the session's id, whose share of the verifier
    sandboxes the result waits for.
    """

    def __init__(
        self,
        db: StorePool,
        config: SchedulerConfig,
        specs: JobSpecs,
        verifiers: VerifierPool,
        wakeups: Wakeups,
        blocklist: Blocklist | None = None,
    ) -> None:
        self.db = db
        self.config = config
        self.specs = specs
        self.verifiers = verifiers
        self.wakeups = wakeups
        self.blocklist = blocklist or Blocklist(db)
        self._rules = MetricsRules(
            slack_seconds=config.metrics_slack_seconds, parallelism=config.metrics_parallelism
        )
        #: Results whose verifier is running or waiting, by lease: a resubmission waits for
        #: that verdict instead of running the verifier again.
        self._verifying: dict[LeaseRef, asyncio.Event] = {}

    async def result(self, worker: str, owner: str, message: Result, now: float) -> Reply:
        """The reply to one ``result``."""
        (found,) = await self._leases(worker, [message])
        admitted = await self._admit(worker, message, found, now)
        if isinstance(admitted, Error):
            return replace(admitted, re=message.id)
        lease, row = admitted
        if lease.state != "done" and await self._sandboxed(message.job):
            return self._checked(worker, owner, row, message.id)
        return await self._accept(worker, row, message.id, now)

    async def _sandboxed(self, job: str) -> bool:
        """Whether the job's results go through a sandbox here: its verifier, or its
        comparison function (a replicated job's)."""
        info = await self.specs.get(job)
        return info.has_verifier or info.has_compare

    async def results(self, worker: str, owner: str, message: Results, now: float) -> Reply:
        """Many results, one transaction for those without a verifier; one reply."""
        acks: list[ItemAck | None] = [None] * len(message.results)
        plain: list[tuple[int, ResultRow]] = []
        checked: list[tuple[int, ResultRow]] = []
        leases = await self._leases(worker, message.results)
        for i, (item, found) in enumerate(zip(message.results, leases, strict=True)):
            admitted = await self._admit(worker, item, found, now)
            if isinstance(admitted, Error):
                acks[i] = _item_ack(admitted)
                continue
            lease, row = admitted
            if lease.state != "done" and await self._sandboxed(item.job):
                checked.append((i, row))
            else:
                plain.append((i, row))
        if plain:
            try:
                rows = [row for _, row in plain]
                outcomes = await self.db.run(lambda s: s.accept_results(worker, rows, now))
            except StoreError as exc:  # the whole transaction: nothing of it happened
                for i, _ in plain:
                    acks[i] = ItemAck("retry", code=exc.code.value, message=str(exc))
            else:
                for (i, _), outcome in zip(plain, outcomes, strict=True):
                    if isinstance(outcome, StoreError):
                        acks[i] = _item_ack(
                            Error(re=None, code=outcome.code.value, message=str(outcome))
                        )
                    else:
                        acks[i] = ItemAck(outcome.status, credits(outcome.credited_micro))
                if any(a is not None and a.status == "accepted" for a in acks):
                    self.wakeups.wake_results()
        if not checked:
            return ResultsAck(re=message.id, acks=tuple(a for a in acks if a is not None))

        async def verify_then_reply() -> Message:
            replies = await asyncio.gather(
                *(self._checked(worker, owner, row, message.id) for _, row in checked)
            )
            for (i, _), reply in zip(checked, replies, strict=True):
                acks[i] = _item_ack(reply)
            return ResultsAck(re=message.id, acks=tuple(a for a in acks if a is not None))

        return verify_then_reply()

    async def _leases(
        self, worker: str, items: Sequence[Result | ResultItem]
    ) -> list[ResultLease | StoreError]:
        """The leases the results name, read in one go (a batch's, one statement per job)."""
        refs = [LeaseRef(item.job, item.slice, item.token) for item in items]
        try:
            return await self.db.run(lambda s: s.result_leases(worker, refs))
        except StoreError as exc:  # the database, for all of them
            return [exc] * len(refs)

    async def _admit(
        self,
        worker: str,
        item: Result | ResultItem,
        found: ResultLease | StoreError,
        now: float,
    ) -> tuple[ResultLease, ResultRow] | Error:
        """The cheap checks of a result, in order: size, lease (token and holder: ``found``,
        read by :meth:`_leases`), signature, metrics. Nothing here runs a verifier. Returns
        the result's lease and the row to store, or the refusal to answer (``re`` unset)."""
        if len(item.result) > self.config.max_result_bytes:
            return Error(
                re=None,
                code=ErrorCode.RESULT_TOO_LARGE.value,
                message=f"results are limited to {self.config.max_result_bytes} bytes",
            )
        if isinstance(found, StoreError):
            return Error(re=None, code=found.code.value, message=str(found))
        lease = found
        payload = signing.result_payload(
            item.job, item.slice, item.token, item.result, item.payment_address
        )
        if not signing.verify(payload, item.signature, worker):
            return Error(
                re=None,
                code=ErrorCode.BAD_SIGNATURE.value,
                message="the result is not signed by this session's identity",
            )
        if (why := await self.blocklist.reason(worker, item.payment_address)) is not None:
            return Error(re=None, code=ErrorCode.BLOCKED.value, message=why)
        row = ResultRow(
            job=item.job,
            slice=item.slice,
            token=item.token,
            result=item.result,
            payment_address=signing.checksum(item.payment_address),
            signature=item.signature,
            metrics=item.metrics,
        )
        if lease.state == "done":
            return lease, row  # a resubmission of the accepted result: acceptance says duplicate
        try:
            spec = (await self.specs.get(item.job)).spec
        except StoreError as exc:
            return Error(re=None, code=exc.code.value, message=str(exc))
        problem = self._rules.problem(
            item.metrics, lease, len(item.result), now, spec.runtime, spec.limits
        )
        if problem is None:
            return lease, row
        return await self._reject(worker, row, ErrorCode.METRICS_IMPLAUSIBLE.value, problem, now)

    async def _reject(self, worker: str, row: ResultRow, code: str, why: str, now: float) -> Error:
        """Refuse a result as the verifier's rejection does: unpaid, counted against the
        worker, the slice queued again for other workers (or failed after its attempts)."""
        try:
            state = await self.db.run(
                lambda s: s.reject_result(row.job, row.slice, row.token, worker, code, why, now)
            )
        except StoreError as exc:
            return Error(re=None, code=exc.code.value, message=str(exc))
        log.warning("result %s/%d from %s rejected: %s %s", row.job, row.slice, worker, code, why)
        if state == "queued":
            self.wakeups.wake_work()
        else:
            self.wakeups.wake_results()
        return Error(re=None, code=code, message=why)

    async def _accept(self, worker: str, row: ResultRow, rid: int, now: float) -> Message:
        settled = await self.db.run(lambda s: s.accept_result(worker, row, now))
        if settled.status == "accepted":
            self.wakeups.wake_results()
        return Ack(re=rid, status=settled.status, credited=credits(settled.credited_micro))

    async def _checked(self, worker: str, owner: str, row: ResultRow, rid: int) -> Message:
        """Run the job's verifier on an admitted result, then accept or reject it; the reply.
        One verification per lease at a time: a resubmission meanwhile gets the answer
        acceptance gives once the first verdict is in (``duplicate`` or ``stale_lease``)."""
        ref = LeaseRef(row.job, row.slice, row.token)
        try:
            while (running := self._verifying.get(ref)) is not None:
                await running.wait()
                lease = await self.db.run(
                    lambda s: s.result_lease(row.job, row.slice, row.token, worker)
                )
                if lease.state == "done":
                    return await self._accept(worker, row, rid, time.time())
            done = self._verifying[ref] = asyncio.Event()
            try:
                return await self._verify(worker, owner, row, ref, rid)
            finally:
                del self._verifying[ref]
                done.set()
        except StoreError as exc:
            return Error(re=rid, code=exc.code.value, message=str(exc))

    async def _verify(
        self, worker: str, owner: str, row: ResultRow, ref: LeaseRef, rid: int
    ) -> Message:
        info = await self.specs.get(row.job)
        argv = info.spec.argv
        # The worker stopped heartbeating this slice when it finished it: keep the lease alive
        # while its result waits for a sandbox and while it is checked.
        hold = self.config.lease_timeout + self.verifiers.limits.wall_seconds + 5
        datum, _ = await self.db.run(
            lambda s: (s.datum(row.job, row.slice), s.heartbeat(worker, [ref], time.time(), hold))
        )

        def still_leased(s: Store) -> None:
            s.result_lease(row.job, row.slice, row.token, worker)
            s.heartbeat(worker, [ref], time.time(), hold)

        async def started() -> None:
            # Its turn came: still the current lease? (else StaleLease, and nothing runs)
            await self.db.run(still_leased)

        if info.has_verifier:
            found = await self.db.run(lambda s: s.job_verifier(row.job))
            assert found is not None
            verifier, runtime = found
            verdict = await self.verifiers.verify(
                row.job,
                verifier,
                argv,
                datum,
                row.result,
                owner=owner,
                started=started,
                runtime=runtime,
            )
            if not verdict.ok:
                error = await self._reject(worker, row, verdict.code, verdict.message, time.time())
                return replace(error, re=rid)
        if not info.has_compare:
            return await self._accept(worker, row, rid, time.time())
        verdicts: dict[str, bool] = {}
        for _ in range(VOTE_ATTEMPTS):
            key, seen = await self._vote_key(owner, row, argv, datum, verdicts)
            try:
                voted = replace(row, vote_key=key, votes_seen=seen)
                return await self._accept(worker, voted, rid, time.time())
            except VotesChanged:
                # Another replica's result was accepted meanwhile (here or in another
                # replica): compare with it too, then try again.
                continue
        return Error(
            re=rid,
            code=ErrorCode.INTERNAL.value,
            message=f"the votes of slice {row.job}/{row.slice} kept changing; send it again",
        )

    async def _vote_key(
        self,
        owner: str,
        row: ResultRow,
        argv: tuple[str, ...],
        datum: bytes,
        verdicts: dict[str, bool],
    ) -> tuple[str, tuple[str, ...]]:
        """The key of the earlier vote (or known answer) of the slice that the job's
        comparison function says ``row`` agrees with, first match in order, else its own; and
        the keys of the votes compared with, which acceptance checks are still the slice's
        (:class:`VotesChanged`). ``verdicts``: what the function said of a key before (a
        second pass compares only with the votes that are new)."""
        found, votes = await self.db.run(
            lambda s: (s.job_compare(row.job), s.vote_representatives(row.job, row.slice))
        )
        assert found is not None
        compare, runtime = found
        seen = tuple(key for key, _ in votes)
        for key, earlier in votes:
            if key not in verdicts:
                verdict = await self.verifiers.compare(
                    row.job,
                    compare,
                    argv,
                    datum,
                    earlier,
                    row.result,
                    owner=owner,
                    runtime=runtime,
                )
                verdicts[key] = verdict.ok
            if verdicts[key]:
                return key, seen
        return vote_key(row.result), seen
