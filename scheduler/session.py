"""Worker sessions without the socket: a frame in, the reply out (docs/protocol.md).

A session opens with a challenge (``hello``); the worker answers with a signed ``auth`` and
is welcomed, then each request gets its answer, in order. A malformed frame gets an ``error``
reply and the session carries on; a fault of ours is ``internal``, never an exception that
ends the session.

:class:`Dispatcher` decides every answer over the store; scheduler/server.py only moves the
frames, parks long-poll fetches (:class:`Park`) and awaits the replies that wait for a
verifier (results go to scheduler/acceptance.py).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from dcp_protocol import (
    BINARY_VERSION,
    SCHEDULER_MESSAGES,
    Ack,
    Auth,
    Error,
    ErrorCode,
    Fetch,
    FrameTooLarge,
    Heartbeat,
    HeartbeatAck,
    JobSpec,
    LeaseRef,
    Message,
    ProtocolError,
    Refusal,
    Result,
    Results,
    Return,
    SliceFailed,
    SliceLease,
    Welcome,
    Work,
    decode_frame,
    encode,
    encode_as,
    encode_json,
    limits,
    peek,
    policy,
    signing,
    to_wire,
    wire_bytes,
)
from dcp_protocol import Hello as HelloMsg
from dcp_protocol.policy import JobTerms, WorkerTerms

from .acceptance import Acceptance
from .acceptance import Reply as AcceptanceReply
from .config import SchedulerConfig
from .specs import JobSpecs
from .store import GroupRecord, JobRecord, Store, StoreError, credits
from .store.pool import StorePool
from .wakeups import Wakeups

__all__ = ["Dispatcher", "Park", "Reply", "WorkerSession"]

log = logging.getLogger("dcp.scheduler")


@dataclass
class WorkerSession:
    """One worker connection as dispatch knows it: its challenge, and once authenticated, the
    worker's identity, the groups it proved it belongs to and what it was already told."""

    id: str
    challenge: str
    address: str = ""
    payment_address: str = ""
    #: Where it connects from (scheduler/quorum.py's network_of), for distinct replicas.
    network: str = ""
    parked: bool = False  # a long-poll fetch is waiting
    groups: frozenset[str] = frozenset()
    leave_public_group: bool = False
    #: (job, code) refusals already reported on this session (each is reported once).
    reported: set[tuple[str, str]] = field(default_factory=set)
    #: Its frames come in MessagePack (protocol version 2): it is answered so.
    binary: bool = False

    def encode(self, message: Message) -> bytes:
        """``message`` as this session's frames go: MessagePack or JSON."""
        return encode_as(message, self.binary)


@dataclass(frozen=True)
class Park:
    """Park this fetch until work may have come or its wait is over, then answer it with
    :meth:`Dispatcher.fetch` (the session is marked ``parked`` until then)."""

    fetch: Fetch


#: What a frame gets: its reply now, a fetch to park, or a reply a verifier decides.
Reply = Message | Park | AcceptanceReply


def _spec_bytes(spec: JobSpec, binary: bool) -> int:
    """What ``spec`` takes in a ``work`` frame (exact: base64 needs no escapes; a ``bin``
    is its bytes and a header of at most 5)."""
    if binary:
        return wire_bytes(replace(spec, module=b""), True) + len(spec.module) + 4
    return len(encode_json(to_wire(replace(spec, module=b"")))) + 4 * -(-len(spec.module) // 3) + 1


def _peek_id(data: str | bytes, error: ProtocolError) -> int | None:
    """The request id of a frame that failed to parse, if one can be read and is in range
    (an error's ``re`` must be one the worker can decode)."""
    if isinstance(error, FrameTooLarge):
        return None  # never parse what is refused for its size
    obj = peek(data)  # the frame may be the one too deep to decode
    value = obj.get("id") if isinstance(obj, dict) else None
    if type(value) is not int or not 0 <= value <= limits.MAX_UINT64:
        return None
    return value


def _as_told(why: Refusal, job: JobRecord, terms: WorkerTerms, session: WorkerSession) -> Refusal:
    """A refusal as ``work.skipped`` tells it: a worker learns a job's id (and its owner)
    only with a lease, so a job it did not name itself (in ``allowed_jobs``, ``declined`` or
    ``excluded_jobs``) is told by an alias that holds within this session only."""
    if job.id in terms.allowed_jobs or job.id in terms.declined or job.id in terms.excluded_jobs:
        return why
    alias = hashlib.sha256(f"{session.challenge}:{job.id}".encode()).hexdigest()[:16]
    message = why.message
    if why.code == ErrorCode.OWNER_NOT_ALLOWED.value:
        message = "its owner is not in the worker's owner list"
    return Refusal(f"job-{alias}", why.code, message)


def _terms(job: JobRecord) -> JobTerms:
    return JobTerms(
        job=job.id,
        owner=job.owner,
        runtime=job.runtime,
        group=job.group,
        requirements=job.requirements,
        offer=credits(job.offer_micro),
        cost=job.cost,
    )


def _ref(lease: SliceLease) -> LeaseRef:
    return LeaseRef(lease.job, lease.slice, lease.token)


#: Seconds the active jobs read for one fetch serve the next (Dispatcher._active_jobs).
ACTIVE_JOBS_TTL = 0.5


class Dispatcher:
    """Answers the frames of every worker session over one store: auth, fetch (eligibility,
    leasing, fitting the ``work`` frame), heartbeat, results (through ``acceptance``), slice
    failures and returns. Its store calls are awaited (on the pool's threads where the
    backend allows), so a slow one holds up its own session's frame, not the others'."""

    def __init__(
        self,
        db: StorePool,
        config: SchedulerConfig,
        specs: JobSpecs,
        acceptance: Acceptance,
        wakeups: Wakeups,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db = db
        self.config = config
        self.specs = specs
        self.acceptance = acceptance
        self.wakeups = wakeups
        self.clock = clock
        #: The active jobs as last read, with the work event of the time and when: they
        #: serve the fetches that follow (ACTIVE_JOBS_TTL), until the event fires.
        self._active: tuple[object, float, list[JobRecord]] | None = None

    def open(self, network: str = "") -> WorkerSession:
        """A new session with its own id and challenge, from ``network``."""
        return WorkerSession(
            id=secrets.token_hex(8), challenge=secrets.token_hex(32), network=network
        )

    def hello(self, session: WorkerSession) -> HelloMsg:
        """The session's first frame: the challenge its ``auth`` must sign."""
        return HelloMsg(
            protocol=BINARY_VERSION, challenge=session.challenge, server=self.config.name
        )

    async def receive(self, session: WorkerSession, data: str | bytes) -> tuple[Reply, bool]:
        """Handle one frame; returns (its reply, whether to close the session).

        Every frame gets an answer: a malformed one its error (the field and why), and a
        fault of ours ``internal`` (logged), never an exception that ends the session.
        """
        try:
            message, session.binary = decode_frame(
                data, SCHEDULER_MESSAGES, self.config.max_frame_bytes
            )
        except ProtocolError as exc:
            log.warning("session %s: %s", session.id, exc.message)
            return Error(re=_peek_id(data, exc), code=exc.code.value, message=exc.message), False
        rid = getattr(message, "id", None)
        if not session.address:
            if not isinstance(message, Auth):
                return Error(
                    re=rid,
                    code=ErrorCode.AUTH_FAILED.value,
                    message="the first message of a session must be auth",
                ), True
            try:
                return await self.auth(session, message)
            except StoreError as exc:  # the session stays unauthenticated: it may try again
                log.warning("session %s: auth: %s", session.id, exc)
                return Error(re=rid, code=exc.code.value, message=str(exc)), False
        try:
            return await self.dispatch(session, message), False
        except StoreError as exc:
            return Error(re=rid, code=exc.code.value, message=str(exc)), False
        except Exception:
            log.exception("session %s: %s %s failed", session.id, message.type, rid)
            return Error(
                re=rid, code=ErrorCode.INTERNAL.value, message=f"{message.type} failed here"
            ), False

    async def auth(self, session: WorkerSession, message: Auth) -> tuple[Message, bool]:
        """Check the signed answer to the challenge and the group proofs; ``welcome`` or the
        refusal that closes the session."""
        payload = signing.session_payload(session.challenge, self.config.name, message.address)
        if not signing.verify(payload, message.signature, message.address):
            log.warning("session %s: bad challenge signature for %s", session.id, message.address)
            return Error(
                re=message.id,
                code=ErrorCode.AUTH_FAILED.value,
                message="the challenge signature does not match the address",
            ), True
        blocklist = self.acceptance.blocklist
        if why := await blocklist.reason(message.address, message.payment_address):
            log.warning("session %s: %s", session.id, why)
            return Error(re=message.id, code=ErrorCode.BLOCKED.value, message=why), True
        address = signing.checksum(message.address)

        def login(s: Store) -> list[GroupRecord]:
            s.seen_worker(address, time.time())
            return s.groups()

        hashes = {g.join_key: g.join_hash for g in await self.db.run(login)}
        session.address = address  # authenticated from here on
        session.payment_address = signing.checksum(message.payment_address)
        session.leave_public_group = message.leave_public_group
        joined, refused = set(), []
        for proof in message.groups:
            expected = hashes.get(proof.join_key)
            if expected is not None and hmac.compare_digest(
                proof.proof, policy.group_proof(expected, session.challenge, session.address)
            ):
                joined.add(proof.join_key)
            else:
                refused.append(
                    Refusal(
                        proof.join_key,
                        ErrorCode.GROUP_PROOF_INVALID.value,
                        "unknown join key or wrong proof",
                    )
                )
        session.groups = frozenset(joined)
        log.info(
            "session %s: worker %s (%s), groups %s%s",
            session.id,
            session.address,
            message.agent,
            sorted(joined) or "-",
            ", left the public group" if message.leave_public_group else "",
        )
        return Welcome(
            re=message.id,
            session=session.id,
            address=session.address,
            heartbeat_interval=self.config.heartbeat_interval,
            lease_timeout=self.config.lease_timeout,
            max_result_bytes=self.config.max_result_bytes,
            groups=tuple(sorted(joined)),
            refused=tuple(refused),
            max_frame_bytes=self.config.max_frame_bytes,
        ), False

    async def dispatch(self, session: WorkerSession, message: Message) -> Reply:
        """The reply to a decoded message of an authenticated session.

        Raises:
            StoreError: the store failed or refused; :meth:`receive` answers with its code.
        """
        now = time.time()
        if isinstance(message, Fetch):
            if message.wait_seconds > 0 and not session.parked:
                session.parked = True
                return Park(message)
            return await self.fetch(session, message, now)
        if isinstance(message, Heartbeat):
            leases, timeout = list(message.leases), self.config.lease_timeout
            lost = await self.db.run(lambda s: s.heartbeat(session.address, leases, now, timeout))
            return HeartbeatAck(
                re=message.id, deadline=now + self.config.lease_timeout, lost=tuple(lost)
            )
        if isinstance(message, Result):
            return await self.acceptance.result(session.address, session.id, message, now)
        if isinstance(message, Results):
            return await self.acceptance.results(session.address, session.id, message, now)
        if isinstance(message, SliceFailed):
            return await self._slice_failed(session, message, now)
        if isinstance(message, Return):
            return await self._return(session, message, now)
        return Error(
            re=getattr(message, "id", None),
            code=ErrorCode.UNEXPECTED_MESSAGE.value,
            message=f"a scheduler does not accept {message.type!r} here",
        )

    async def _slice_failed(
        self, session: WorkerSession, message: SliceFailed, now: float
    ) -> Message:
        m, worker = message, session.address
        state = await self.db.run(
            lambda s: s.fail_slice(m.job, m.slice, m.token, worker, m.code, m.message, now)
        )
        log.info(
            "slice %s/%d failed on %s: %s %s -> %s",
            message.job,
            message.slice,
            session.address,
            message.code,
            message.message,
            state,
        )
        if state == "queued":
            self.wakeups.wake_work()
        else:
            self.wakeups.wake_results()
        return Ack(re=message.id, status=state)

    async def _return(self, session: WorkerSession, message: Return, now: float) -> Message:
        m, worker = message, session.address
        n = await self.db.run(
            lambda s: s.return_slices(worker, list(m.leases), m.code, m.message, now)
        )
        if message.code:
            log.warning(
                "worker %s refused %d slice(s): %s %s",
                session.address,
                n,
                message.code,
                message.message,
            )
        if n:
            self.wakeups.wake_work()
        return Ack(re=message.id, status=f"returned {n}")

    async def eligible(
        self, session: WorkerSession, message: Fetch
    ) -> tuple[list[str], list[Refusal]]:
        """The active jobs this worker may be given, and the refusals to report for the rest."""
        terms = WorkerTerms(
            groups=session.groups,
            leave_public_group=session.leave_public_group,
            capabilities=message.capabilities,
            min_wage=message.min_wage,
            allowed_jobs=frozenset(message.allowed_jobs),
            allowed_owners=frozenset(message.allowed_owners),
            declined={d.job: d.offer for d in message.declined},
            excluded_jobs=frozenset(message.excluded_jobs),
        )
        eligible, report = [], []
        now = time.time()
        refusals: list[tuple[str, str, str]] = []
        for job in await self._active_jobs():
            why = policy.refusal(_terms(job), terms)
            if why is None:
                eligible.append(job.id)
                continue
            if (job.id, why.code) in session.reported:
                continue
            session.reported.add((job.id, why.code))
            refusals.append((job.id, why.code, why.message))
            private = job.group != policy.PUBLIC_GROUP and job.group not in session.groups
            if not private:  # never tell a non-member that a private job exists
                report.append(_as_told(why, job, terms, session))
        if refusals:
            worker = session.address

            def record(s: Store) -> None:
                for job_id, code, text in refusals:
                    s.record_refusal(job_id, worker, code, text, now)

            await self.db.run(record)
        return eligible, report

    async def _active_jobs(self) -> list[JobRecord]:
        """The active jobs with queued slices, read at most once per ACTIVE_JOBS_TTL while no
        slices became available (the work event: a deploy, a return, an expiry, a rejection,
        here or, told by NOTIFY or the peer poll, in another replica). Every fetch asked it
        anew, the same answer between two changes: one round trip of 7 a fetch on PostgreSQL.
        A job whose queue emptied meanwhile costs its next lease one empty read."""
        now, event = self.clock(), self.wakeups.work
        cached = self._active
        if cached is not None and cached[0] is event and now - cached[1] < ACTIVE_JOBS_TTL:
            return cached[2]
        # The event was taken before the read: a change meanwhile shows.
        jobs = await self.db.run(lambda s: s.active_jobs())
        self._active = (event, now, jobs)
        return jobs

    async def fetch(self, session: WorkerSession, message: Fetch, now: float) -> Work:
        """Lease what this worker may have, up to ``max_slices`` and its lease allowance; the
        ``work`` reply (possibly empty).

        Raises:
            StoreError: the store failed.
        """
        eligible, skipped = await self.eligible(session, message)
        config = self.config
        leases = await self.db.run(
            lambda s: s.lease(
                session.address,
                message.max_slices,
                now,
                config.lease_timeout,
                eligible,
                max_held=config.max_leases_per_worker,
                payee=session.payment_address,
                network=session.network,
            )
        )
        known = set(message.known_jobs)
        slices = [
            SliceLease(
                x.job, x.slice, x.token, x.attempt, x.deadline, x.datum, credits(x.offer_micro)
            )
            for x in leases
        ]
        jobs = {
            job_id: (await self.specs.get(job_id)).spec
            for job_id in dict.fromkeys(lease.job for lease in leases)
            if job_id not in known
        }
        kept, specs = await self.fit_frame(session, slices, jobs, skipped)
        return Work(re=message.id, slices=kept, jobs=specs, skipped=tuple(skipped))

    async def fit_frame(
        self,
        session: WorkerSession,
        slices: list[SliceLease],
        jobs: dict[str, JobSpec],
        skipped: list[Refusal],
    ) -> tuple[tuple[SliceLease, ...], tuple[JobSpec, ...]]:
        """The leading slices (and their jobs' specs) whose ``work`` frame fits in the
        session's ``max_frame_bytes``; the others are returned at once (no attempt spent)."""
        limit = self.config.max_frame_bytes
        # Cheap bound first: base64 of the datums and modules, and room for everything else.
        rough = sum(4 * (len(x.datum) + 2) // 3 + limits.RESULT_FIELDS_BYTES for x in slices)
        rough += sum(
            4 * (len(j.module) + 2) // 3 + len(encode_json(j.config)) for j in jobs.values()
        )
        rough += sum(len(encode_json(j.requirements)) + 4096 for j in jobs.values())
        rough += len(encode(Work(re=limits.MAX_UINT64, skipped=tuple(skipped))))
        if rough <= limit:  # base64 bounds a MessagePack bin as well
            return tuple(slices), tuple(jobs.values())
        binary = session.binary
        size = len(session.encode(Work(re=limits.MAX_UINT64, skipped=tuple(skipped))))
        size += 10 if binary else 0  # the arrays' headers, up to 5 bytes each
        kept: list[SliceLease] = []
        specs: dict[str, JobSpec] = {}
        for lease in slices:
            more = wire_bytes(lease, binary) + (0 if binary else 1)
            spec = jobs.get(lease.job) if lease.job not in specs else None
            if spec is not None:
                more += _spec_bytes(spec, binary)
            if size + more > limit:
                break
            size += more
            kept.append(lease)
            if spec is not None:
                specs[lease.job] = spec
        rest = slices[len(kept) :]
        if rest:
            refs = [_ref(x) for x in rest]
            await self.db.run(lambda s: s.return_slices(session.address, refs))
            if not kept:
                log.error(
                    "slice %s/%d does not fit in a frame of %d bytes: not sent",
                    rest[0].job,
                    rest[0].slice,
                    limit,
                )
        return tuple(kept), tuple(specs.values())

    async def return_unsent(self, session: WorkerSession, work: Work) -> int:
        """Give back the slices of a ``work`` reply that could not be sent (the worker left):
        at once, rather than letting them expire (which would cost them an attempt)."""
        refs = [_ref(x) for x in work.slices]
        return await self.db.run(lambda s: s.return_slices(session.address, refs))
