"""The scheduler's network face: one listen address for the worker websocket (``/worker``)
and the compute API (``/api/v1/...``, HTTP + JSON). See docs/protocol.md.

Each worker connection is a session: a challenge, a signed answer, then requests answered in
order. A malformed frame gets an ``error`` reply and the session carries on.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from aiohttp import WSMsgType, web

from dcp_worker.protocol import (
    PROTOCOL_VERSION,
    SCHEDULER_MESSAGES,
    Ack,
    Auth,
    Error,
    ErrorCode,
    Fetch,
    Heartbeat,
    HeartbeatAck,
    ItemAck,
    JobSpec,
    LeaseRef,
    Message,
    Metrics,
    ProtocolError,
    Refusal,
    Result,
    ResultItem,
    Results,
    ResultsAck,
    Return,
    SliceFailed,
    SliceLease,
    Welcome,
    Work,
    decode,
    encode,
    nesting,
    policy,
    signing,
)
from dcp_worker.protocol import Hello as HelloMsg
from dcp_worker.protocol.policy import JobTerms, WorkerTerms

from .jobdoc import JobFileError, parse_document
from .limits import ConnectionLimits, ConnectionRefusal, Ticket, UnauthenticatedConnections
from .store import (
    InsufficientFunds,
    JobRecord,
    SliceRecord,
    Store,
    StoreError,
    UnknownJob,
    credits,
)
from .verifier import VERIFIER_LIMITS, VerifierPool

log = logging.getLogger("dcp.scheduler")

API = "/api/v1"
#: Frames above this get a ``frame_too_large`` error; aiohttp closes the socket (1009) at twice it.
MAX_FRAME_BYTES = 32 * 1024 * 1024
MAX_DEPLOY_BYTES = 256 * 1024 * 1024
OWNER_ACTION_WINDOW = 300.0
#: The longest a fetch may be parked waiting for work (the worker asks for less).
MAX_FETCH_WAIT = 30.0
#: The websocket close code of a session that did not authenticate in time.
CLOSE_AUTH_TIMEOUT = 4008
#: Seconds an overdue session's close handshake may take before its socket is dropped.
CLOSE_GRACE = 1.0
#: Where a request's connection ticket (scheduler.limits) is kept on the request.
TICKET = "dcp.ticket"


@dataclass(frozen=True)
class SchedulerConfig:
    name: str = "dcp-scheduler"
    heartbeat_interval: float = 3.0
    lease_timeout: float = 15.0
    max_result_bytes: int = 16 * 1024 * 1024
    expiry_interval: float = 1.0
    verifier_wall_seconds: float = 10.0
    #: Finished and cancelled jobs are removed this long after they end (damocles: 25 h).
    job_lifetime: float = 25 * 3600.0
    gc_interval: float = 60.0
    #: Unauthenticated connections: per address, in total, and the websocket auth deadline.
    limits: ConnectionLimits = ConnectionLimits()
    #: Seconds a connection has to send a complete request line and headers (also the idle
    #: limit of a keep-alive connection between requests): aiohttp's ``keepalive_timeout``.
    http_header_timeout: float = 10.0
    #: Seconds a request has to send its whole body once its headers are in.
    http_body_timeout: float = 60.0


@dataclass
class _Session:
    id: str
    send: Callable[[Message], Awaitable[None]]
    address: str = ""
    payment_address: str = ""
    parked: bool = False  # a long-poll fetch is waiting
    groups: frozenset[str] = frozenset()
    leave_public_group: bool = False
    #: (job, code) refusals already reported on this session (each is reported once).
    reported: set[tuple[str, str]] = field(default_factory=set)


@dataclass(frozen=True)
class _JobInfo:
    """What sessions need of a job, read once: none of it changes after the deploy."""

    spec: JobSpec
    has_verifier: bool


def _item_ack(reply: Message) -> ItemAck:
    """A single result's reply as an entry of ``results_ack``."""
    if isinstance(reply, Ack):
        return ItemAck(reply.status, reply.credited)
    if isinstance(reply, Error):
        status = "retry" if reply.code == ErrorCode.INTERNAL.value else "refused"
        return ItemAck(status, code=reply.code, message=reply.message)
    return ItemAck("retry", code=ErrorCode.INTERNAL.value, message=f"unexpected {reply.type}")


def _peek_id(data: str | bytes) -> int | None:
    """The request id of a frame that failed to parse, if one can be read."""
    try:
        obj = nesting.loads(data)  # the frame may be the one too deep to decode
        value = obj.get("id") if isinstance(obj, dict) else None
    except ValueError:  # NestingTooDeep included
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class Scheduler:
    """Owns the store and serves sessions and the compute API."""

    def __init__(self, store: Store, config: SchedulerConfig | None = None) -> None:
        self.store = store
        self.config = config or SchedulerConfig()
        self._jobs: OrderedDict[str, _JobInfo] = OrderedDict()
        self._sockets: set[web.WebSocketResponse] = set()
        self.verifiers = VerifierPool(
            limits=replace(VERIFIER_LIMITS, wall_seconds=self.config.verifier_wall_seconds)
        )
        self._work_event = asyncio.Event()
        self._results_event = asyncio.Event()
        self.sessions = 0
        self.limiter = UnauthenticatedConnections(self.config.limits)
        #: Websockets that hold a ticket, by its serial, until their auth is accepted.
        self._unauthenticated: dict[int, web.WebSocketResponse] = {}

    # ------------------------------------------------------------------ app

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_DEPLOY_BYTES, middlewares=[self._admit])
        app.router.add_get("/worker", self.worker_session)
        app.router.add_get(f"{API}/status", self.api_status)
        app.router.add_post(f"{API}/jobs", self.api_deploy)
        app.router.add_get(f"{API}/jobs", self.api_list)
        app.router.add_get(f"{API}/jobs/{{job}}", self.api_job)
        app.router.add_get(f"{API}/jobs/{{job}}/results", self.api_results)
        app.router.add_post(f"{API}/jobs/{{job}}/cancel", self.api_cancel)
        app.router.add_get(f"{API}/accounts/{{address}}", self.api_account)
        app.cleanup_ctx.append(self._expiry_ctx)
        app.cleanup_ctx.append(self._auth_deadline_ctx)
        app.on_shutdown.append(self._close_sessions)
        return app

    def runner_options(self) -> dict[str, Any]:
        """aiohttp server settings that belong to this configuration (``web.AppRunner``)."""
        # keepalive_timeout runs from the accept: a connection whose request line and headers
        # are not all in by then is closed (aiohttp has no separate header timeout).
        return {"keepalive_timeout": self.config.http_header_timeout}

    @web.middleware
    async def _admit(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Every request holds a ticket of the unauthenticated-connection limits while it is
        served (a worker websocket until its auth is accepted); over a limit it is refused at
        once (503, named); its body must arrive within the body timeout (408, named)."""
        address = request.remote or ""
        ticket = self.limiter.admit(address, websocket=request.path == "/worker")
        if isinstance(ticket, ConnectionRefusal):
            log.info("refused a connection from %s: %s", address, ticket.value)
            return _refusal(503, ticket, "too many unauthenticated connections; retry later")
        request[TICKET] = ticket
        try:
            if request.body_exists:
                try:
                    async with asyncio.timeout(self.config.http_body_timeout):
                        await request.read()  # kept by aiohttp: the handler's read() returns it
                except TimeoutError:
                    log.info(
                        "closed a request from %s: %s", address, ConnectionRefusal.BODY_TIMEOUT
                    )
                    return _refusal(
                        408,
                        ConnectionRefusal.BODY_TIMEOUT,
                        f"the body did not arrive within {self.config.http_body_timeout:g} s",
                    )
            return await handler(request)
        finally:
            self._unauthenticated.pop(ticket.serial, None)
            self.limiter.release(ticket)

    async def _auth_deadline_ctx(self, app: web.Application) -> Any:
        task = asyncio.create_task(self._close_overdue_forever())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _close_overdue_forever(self) -> None:
        """Close the websockets that did not authenticate by their deadline (4008)."""
        interval = min(1.0, self.config.limits.auth_timeout / 4)
        async with asyncio.TaskGroup() as tg:
            while True:
                await asyncio.sleep(interval)
                for ticket in self.limiter.overdue():
                    ws = self._unauthenticated.pop(ticket.serial, None)
                    if ws is not None:
                        tg.create_task(self._close_overdue(ws, ticket))

    async def _close_overdue(self, ws: web.WebSocketResponse, ticket: Ticket) -> None:
        log.info("closing a session from %s: %s", ticket.address, ConnectionRefusal.AUTH_TIMEOUT)
        reason = ConnectionRefusal.AUTH_TIMEOUT.value.encode()
        # A peer that never answers the close frame is dropped after CLOSE_GRACE (aiohttp
        # closes the transport when its close is cancelled).
        with contextlib.suppress(TimeoutError, ConnectionError, RuntimeError):
            async with asyncio.timeout(CLOSE_GRACE):
                await ws.close(code=CLOSE_AUTH_TIMEOUT, message=reason)

    async def _close_sessions(self, app: web.Application) -> None:
        """Shutting down: close every worker session (1001, going away); workers reconnect
        with backoff and resend what they hold."""
        for ws in list(self._sockets):
            with contextlib.suppress(Exception):
                await ws.close(code=1001, message=b"scheduler shutting down")

    async def _expiry_ctx(self, app: web.Application) -> Any:
        # Leases held while the scheduler was down would expire at the first pass: give their
        # workers one lease timeout from now to reconnect and deliver (they retry well within).
        extended = self.store.extend_leases(time.time() + self.config.lease_timeout)
        if extended:
            log.info(
                "%d lease(s) held across the restart get %g s more",
                extended,
                self.config.lease_timeout,
            )
        task = asyncio.create_task(self._expire_forever())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await self.verifiers.close()

    async def _expire_forever(self) -> None:
        last_gc = 0.0
        while True:
            await asyncio.sleep(self.config.expiry_interval)
            now = time.time()
            try:
                n = self.store.expire_leases(now)
                if now - last_gc >= self.config.gc_interval:
                    last_gc = now
                    for job_id in self.store.collect_garbage(now, self.config.job_lifetime):
                        log.info(
                            "job %s removed %g h after it ended",
                            job_id,
                            self.config.job_lifetime / 3600,
                        )
            except StoreError as exc:
                log.error("lease expiry failed: %s", exc)
                continue
            if n:
                log.info("expired %d lease(s)", n)
                self._wake()
                self._results_changed()

    # ------------------------------------------------------------------ worker sessions

    async def worker_session(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=2 * MAX_FRAME_BYTES, compress=False)
        await ws.prepare(request)
        send_lock = asyncio.Lock()
        ticket: Ticket | None = request.get(TICKET)
        if ticket is not None:  # the auth deadline runs until welcome (see _admit)
            self._unauthenticated[ticket.serial] = ws

        async def send(message: Message) -> None:
            if ticket is not None and isinstance(message, Welcome):
                self._unauthenticated.pop(ticket.serial, None)
                self.limiter.release(ticket)
            async with send_lock:
                await ws.send_str(encode(message).decode())

        session = _Session(id=secrets.token_hex(8), send=send)
        self._sockets.add(ws)
        challenge = secrets.token_hex(32)
        self.sessions += 1
        try:
            await send(
                HelloMsg(protocol=PROTOCOL_VERSION, challenge=challenge, server=self.config.name)
            )
            async with asyncio.TaskGroup() as tg:
                tasks: set[asyncio.Task[None]] = set()
                async for frame in ws:
                    if frame.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                        break
                    reply, close = self._receive(session, challenge, frame.data)
                    if asyncio.iscoroutine(reply):
                        # A long poll or a verification: its own task, so the session keeps
                        # serving; it sends its reply itself.
                        task = tg.create_task(reply)
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                    elif isinstance(reply, Message):
                        await send(reply)
                    if close:
                        await ws.close(code=4001, message=b"authentication failed")
                        break
                for task in tasks:
                    task.cancel()
        finally:
            self._sockets.discard(ws)
            self.sessions -= 1
            log.info("session %s (%s) closed", session.id, session.address or "unauthenticated")
        return ws

    def _wake(self) -> None:
        """Slices became available: wake every parked fetch."""
        self._work_event.set()
        self._work_event = asyncio.Event()

    async def _long_fetch(self, session: _Session, message: Fetch) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(message.wait_seconds, MAX_FETCH_WAIT)
        try:
            while True:
                event = self._work_event  # taken before leasing, so no wake-up is missed
                try:
                    work = self._fetch(session, message, time.time())
                except StoreError as exc:
                    await session.send(Error(re=message.id, code=exc.code.value, message=str(exc)))
                    return
                remaining = deadline - loop.time()
                if work.slices or work.skipped or remaining <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), remaining)
        finally:
            session.parked = False
        try:
            await session.send(work)
        except (ConnectionError, RuntimeError):
            # The worker left while its fetch was parked: give the slices back at once rather
            # than letting them expire (which would cost them an attempt).
            refs = [(x.job, x.slice, x.token) for x in work.slices]
            n = self.store.return_slices(session.address, refs)
            log.info("session %s left during a long poll; returned %d slice(s)", session.id, n)

    def _receive(
        self, session: _Session, challenge: str, data: str | bytes
    ) -> tuple[Message | Coroutine[Any, Any, None] | None, bool]:
        """Handle one frame; returns (a reply or a coroutine that will send it, close)."""
        try:
            message = decode(data, SCHEDULER_MESSAGES, MAX_FRAME_BYTES)
        except ProtocolError as exc:
            log.warning("session %s: %s", session.id, exc.message)
            return Error(re=_peek_id(data), code=exc.code.value, message=exc.message), False
        rid = getattr(message, "id", None)
        if not session.address:
            if not isinstance(message, Auth):
                return Error(
                    re=rid,
                    code=ErrorCode.AUTH_FAILED.value,
                    message="the first message of a session must be auth",
                ), True
            return self._auth(session, challenge, message)
        try:
            return self._dispatch(session, message), False
        except StoreError as exc:
            return Error(re=rid, code=exc.code.value, message=str(exc)), False

    def _auth(self, session: _Session, challenge: str, message: Auth) -> tuple[Message, bool]:
        payload = signing.session_payload(challenge, self.config.name, message.address)
        if not signing.verify(payload, message.signature, message.address):
            log.warning("session %s: bad challenge signature for %s", session.id, message.address)
            return Error(
                re=message.id,
                code=ErrorCode.AUTH_FAILED.value,
                message="the challenge signature does not match the address",
            ), True
        session.address = signing.checksum(message.address)
        session.payment_address = signing.checksum(message.payment_address)
        session.leave_public_group = message.leave_public_group
        hashes = {g.join_key: g.join_hash for g in self.store.groups()}
        joined, refused = set(), []
        for proof in message.groups:
            expected = hashes.get(proof.join_key)
            if expected is not None and hmac.compare_digest(
                proof.proof, policy.group_proof(expected, challenge, session.address)
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
        self.store.seen_worker(session.address, time.time())
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
        ), False

    def _dispatch(self, session: _Session, message: Message) -> Message | Coroutine[Any, Any, None]:
        now = time.time()
        if isinstance(message, Fetch):
            if message.wait_seconds > 0 and not session.parked:
                session.parked = True
                return self._long_fetch(session, message)
            return self._fetch(session, message, now)
        if isinstance(message, Heartbeat):
            lost = self.store.heartbeat(
                session.address, list(message.leases), now, self.config.lease_timeout
            )
            return HeartbeatAck(
                re=message.id, deadline=now + self.config.lease_timeout, lost=tuple(lost)
            )
        if isinstance(message, Result):
            return self._result(session, message, now)
        if isinstance(message, Results):
            return self._results(session, message, now)
        if isinstance(message, SliceFailed):
            state = self.store.fail_slice(
                message.job,
                message.slice,
                message.token,
                session.address,
                message.code,
                message.message,
                now,
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
                self._wake()
            else:
                self._results_changed()
            return Ack(re=message.id, status=state)
        if isinstance(message, Return):
            refs = [(r.job, r.slice, r.token) for r in message.leases]
            n = self.store.return_slices(session.address, refs, message.code, message.message, now)
            if message.code:
                log.warning(
                    "worker %s refused %d slice(s): %s %s",
                    session.address,
                    n,
                    message.code,
                    message.message,
                )
            if n:
                self._wake()
            return Ack(re=message.id, status=f"returned {n}")
        return Error(
            re=getattr(message, "id", None),
            code=ErrorCode.UNEXPECTED_MESSAGE.value,
            message=f"a scheduler does not accept {message.type!r} here",
        )

    def _eligible(self, session: _Session, message: Fetch) -> tuple[list[str], list[Refusal]]:
        """The active jobs this worker may be given, and the refusals to report for the rest."""
        terms = WorkerTerms(
            groups=session.groups,
            leave_public_group=session.leave_public_group,
            capabilities=message.capabilities,
            min_wage=message.min_wage,
            allowed_jobs=frozenset(message.allowed_jobs),
            allowed_owners=frozenset(message.allowed_owners),
            declined={d.job: d.offer for d in message.declined},
        )
        eligible, report = [], []
        now = time.time()
        for job in self.store.active_jobs():
            why = policy.refusal(_terms(job), terms)
            if why is None:
                eligible.append(job.id)
                continue
            if (job.id, why.code) in session.reported:
                continue
            session.reported.add((job.id, why.code))
            self.store.record_refusal(job.id, session.address, why.code, why.message, now)
            private = job.group != policy.PUBLIC_GROUP and job.group not in session.groups
            if not private:  # never tell a non-member that a private job exists
                report.append(why)
        return eligible, report

    def _fetch(self, session: _Session, message: Fetch, now: float) -> Work:
        eligible, skipped = self._eligible(session, message)
        leases = self.store.lease(
            session.address, message.max_slices, now, self.config.lease_timeout, eligible
        )
        known = set(message.known_jobs)
        jobs = [
            self._job(job_id).spec
            for job_id in dict.fromkeys(lease.job for lease in leases)
            if job_id not in known
        ]
        return Work(
            re=message.id,
            slices=tuple(
                SliceLease(
                    x.job, x.slice, x.token, x.attempt, x.deadline, x.datum, credits(x.offer_micro)
                )
                for x in leases
            ),
            jobs=tuple(jobs),
            skipped=tuple(skipped),
        )

    def _job(self, job_id: str) -> _JobInfo:
        """A job's spec (module included) from a small cache: every worker's first fetch of a
        job needs it, and reading it from the store each time (a blob and a record) showed
        as the whole profile with 1,000 workers."""
        info = self._jobs.get(job_id)
        if info is not None:
            self._jobs.move_to_end(job_id)
            return info
        record = self.store.job(job_id, counts=False)
        spec = JobSpec(
            job=job_id,
            runtime=record.runtime,
            module=self.store.job_module(job_id),
            sha256=record.module_sha256,
            argv=record.argv,
            limits=record.limits,
            name=record.name,
            owner=record.owner,
            group=record.group,
            requirements=record.requirements,
            config=record.config,
        )
        info = self._jobs[job_id] = _JobInfo(spec, record.has_verifier)
        if len(self._jobs) > 64:
            self._jobs.popitem(last=False)
        return info

    def _result(
        self, session: _Session, message: Result, now: float
    ) -> Message | Coroutine[Any, Any, None]:
        if len(message.result) > self.config.max_result_bytes:
            return Error(
                re=message.id,
                code=ErrorCode.RESULT_TOO_LARGE.value,
                message=f"results are limited to {self.config.max_result_bytes} bytes",
            )
        payload = signing.result_payload(
            message.job, message.slice, message.token, message.result, message.payment_address
        )
        if not signing.verify(payload, message.signature, session.address):
            return Error(
                re=message.id,
                code=ErrorCode.BAD_SIGNATURE.value,
                message="the result is not signed by this session's identity",
            )
        if self._job(message.job).has_verifier:
            return self._verify_then_accept(session, message)
        return self._accept(session, message, message.id, now)

    def _accept(
        self, session: _Session, message: Result | ResultItem, rid: int, now: float
    ) -> Message:
        status, paid = self.store.accept_result(
            message.job,
            message.slice,
            message.token,
            session.address,
            message.result,
            signing.checksum(message.payment_address),
            message.signature,
            message.metrics,
            now,
        )
        if status == "accepted":
            self._results_changed()
        return Ack(re=rid, status=status, credited=credits(paid))

    def _results(
        self, session: _Session, message: Results, now: float
    ) -> Message | Coroutine[Any, Any, None]:
        """Many results, one transaction for those without a verifier; one reply."""
        acks: list[ItemAck | None] = [None] * len(message.results)
        plain: list[int] = []
        checked: list[int] = []
        for i, item in enumerate(message.results):
            if len(item.result) > self.config.max_result_bytes:
                acks[i] = ItemAck(
                    "refused",
                    code=ErrorCode.RESULT_TOO_LARGE.value,
                    message=f"results are limited to {self.config.max_result_bytes} bytes",
                )
                continue
            payload = signing.result_payload(
                item.job, item.slice, item.token, item.result, item.payment_address
            )
            if not signing.verify(payload, item.signature, session.address):
                acks[i] = ItemAck(
                    "refused",
                    code=ErrorCode.BAD_SIGNATURE.value,
                    message="the result is not signed by this session's identity",
                )
                continue
            (checked if self._job(item.job).has_verifier else plain).append(i)
        if plain:
            rows = [
                (
                    it.job,
                    it.slice,
                    it.token,
                    it.result,
                    signing.checksum(it.payment_address),
                    it.signature,
                    it.metrics,
                )
                for it in (message.results[i] for i in plain)
            ]
            try:
                outcomes = self.store.accept_results(session.address, rows, now)
            except StoreError as exc:  # the whole transaction: nothing of it happened
                for i in plain:
                    acks[i] = ItemAck("retry", code=exc.code.value, message=str(exc))
            else:
                for i, outcome in zip(plain, outcomes, strict=True):
                    if isinstance(outcome, StoreError):
                        acks[i] = _item_ack(
                            Error(re=None, code=outcome.code.value, message=str(outcome))
                        )
                    else:
                        acks[i] = ItemAck(outcome[0], credits(outcome[1]))
                if any(a is not None and a.status == "accepted" for a in acks):
                    self._results_changed()
        if not checked:
            return ResultsAck(re=message.id, acks=tuple(a for a in acks if a is not None))

        async def verify_and_reply() -> None:
            replies = await asyncio.gather(
                *(self._checked(session, message.results[i], message.id) for i in checked)
            )
            for i, reply in zip(checked, replies, strict=True):
                acks[i] = _item_ack(reply)
            await session.send(
                ResultsAck(re=message.id, acks=tuple(a for a in acks if a is not None))
            )

        return verify_and_reply()

    async def _verify_then_accept(self, session: _Session, message: Result) -> None:
        await session.send(await self._checked(session, message, message.id))

    async def _checked(self, session: _Session, message: Result | ResultItem, rid: int) -> Message:
        """Run the job's verifier on a result, then accept or reject it; the reply."""
        try:
            verifier = self.store.job_verifier(message.job)
            argv = self._job(message.job).spec.argv
            datum = self.store.datum(message.job, message.slice)
            assert verifier is not None
            # The worker stopped heartbeating this slice when it finished it: keep the lease
            # alive while its result is checked.
            hold = self.config.lease_timeout + self.verifiers.limits.wall_seconds + 5
            self.store.heartbeat(
                session.address,
                [LeaseRef(message.job, message.slice, message.token)],
                time.time(),
                hold,
            )
            verdict = await self.verifiers.verify(
                message.job, verifier, argv, datum, message.result
            )
            if verdict.ok:
                reply = self._accept(session, message, rid, time.time())
            else:
                state = self.store.reject_result(
                    message.job,
                    message.slice,
                    message.token,
                    session.address,
                    verdict.code,
                    verdict.message,
                    time.time(),
                )
                log.warning(
                    "result %s/%d from %s rejected: %s",
                    message.job,
                    message.slice,
                    session.address,
                    verdict.message,
                )
                if state == "queued":
                    self._wake()
                else:
                    self._results_changed()
                reply = Error(re=rid, code=verdict.code, message=verdict.message)
        except StoreError as exc:
            reply = Error(re=rid, code=exc.code.value, message=str(exc))
        return reply

    # ------------------------------------------------------------------ compute API

    async def api_status(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"server": self.config.name, "protocol": PROTOCOL_VERSION, "sessions": self.sessions}
        )

    async def api_deploy(self, request: web.Request) -> web.Response:
        owner = request.headers.get("X-DCP-Owner", "")
        signature = request.headers.get("X-DCP-Signature", "")
        body = await request.read()
        if not signing.verify(signing.deploy_payload(body), signature, owner):
            return _error(401, ErrorCode.BAD_SIGNATURE, "the deploy is not signed by X-DCP-Owner")
        try:
            job = parse_document(body, signing.checksum(owner))
        except JobFileError as exc:
            return _error(400, ErrorCode.INVALID_MESSAGE, str(exc))
        try:
            job_id = self.store.create_job(job, time.time())
        except InsufficientFunds as exc:
            return _error(402, exc.code, str(exc), missing=credits(exc.missing))
        self._wake()
        log.info("job %s deployed by %s: %s, %d slices", job_id, job.owner, job.name, len(job.data))
        return web.json_response({"job": job_id, "slices": len(job.data)}, status=201)

    async def api_list(self, request: web.Request) -> web.Response:
        return web.json_response({"jobs": [_job_json(j) for j in self.store.list_jobs()]})

    async def api_job(self, request: web.Request) -> web.Response:
        job_id = request.match_info["job"]
        try:
            out = _job_json(self.store.job(job_id))
        except UnknownJob as exc:
            return _error(404, ErrorCode.UNKNOWN_SLICE, str(exc))
        refusals: dict[str, int] = {}
        for r in self.store.refusals(job_id):
            refusals[r.code] = refusals.get(r.code, 0) + r.count
        out["refusals"] = refusals
        return web.json_response(out)

    async def api_account(self, request: web.Request) -> web.Response:
        try:
            address = signing.checksum(request.match_info["address"])
        except ValueError:
            return _error(400, ErrorCode.INVALID_MESSAGE, "not an address")
        micro = self.store.balance(address)
        return web.json_response(
            {"address": address, "balance": credits(micro), "balance_micro": micro}
        )

    async def api_results(self, request: web.Request) -> web.Response:
        """Final slices after ``after``, in order, up to the first one not final yet. With
        ``wait`` (seconds, at most 30), an empty answer for an active job is held until one
        more slice becomes final."""
        job_id = request.match_info["job"]
        try:
            after = int(request.query.get("after", "-1"))
            limit = min(10_000, max(1, int(request.query.get("limit", "1000"))))
            wait = min(MAX_FETCH_WAIT, max(0.0, float(request.query.get("wait", "0"))))
        except ValueError:
            return _error(400, ErrorCode.INVALID_MESSAGE, "after, limit and wait are numbers")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            event = self._results_event  # taken before reading, so no wake-up is missed
            try:
                state = self.store.job_state(job_id)
                slices = self.store.slices(job_id, after, limit, final_prefix=True)
            except UnknownJob as exc:
                return _error(404, ErrorCode.UNKNOWN_SLICE, str(exc))
            remaining = deadline - loop.time()
            if slices or state != "active" or remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), remaining)
        return web.json_response(
            {"job": job_id, "state": state, "slices": [_slice_json(s) for s in slices]}
        )

    def _results_changed(self) -> None:
        self._results_event.set()
        self._results_event = asyncio.Event()

    async def api_cancel(self, request: web.Request) -> web.Response:
        job_id = request.match_info["job"]
        try:
            timestamp = int(request.headers.get("X-DCP-Timestamp", ""))
        except ValueError:
            return _error(400, ErrorCode.INVALID_MESSAGE, "X-DCP-Timestamp is required")
        if abs(time.time() - timestamp) > OWNER_ACTION_WINDOW:
            return _error(401, ErrorCode.BAD_SIGNATURE, "the signed timestamp is too old or new")
        try:
            record = self.store.job(job_id)
        except UnknownJob as exc:
            return _error(404, ErrorCode.UNKNOWN_SLICE, str(exc))
        payload = signing.owner_action_payload("cancel", job_id, timestamp)
        if not signing.verify(payload, request.headers.get("X-DCP-Signature", ""), record.owner):
            return _error(403, ErrorCode.BAD_SIGNATURE, "only the job's owner may cancel it")
        n = self.store.cancel_job(job_id, time.time())
        self._results_changed()
        return web.json_response({"job": job_id, "cancelled_slices": n})


def _refusal(status: int, reason: ConnectionRefusal, message: str) -> web.Response:
    """A named refusal of a connection: the response closes it."""
    response = web.json_response(
        {"error": {"code": reason.value, "message": message}}, status=status
    )
    response.headers["Retry-After"] = "1"
    response.force_close()
    return response


def _error(status: int, code: ErrorCode, message: str, **extra: Any) -> web.Response:
    body = {"code": code.value, "message": message, **extra}
    return web.json_response({"error": body}, status=status)


def _effective_wage(offer: float, cost: Metrics | None) -> dict[str, float | None] | None:
    """What the offer pays per unit of each measured resource (the wage a worker earns)."""
    if cost is None:
        return None

    def per(amount: float) -> float | None:
        return offer / amount if amount > 0 else None

    return {
        "cpu_hour": per(cost.cpu_seconds / 3600),
        "gpu_hour": per(cost.gpu_seconds / 3600),
        "mb_in": per(cost.bytes_in / 1e6),
        "mb_out": per(cost.bytes_out / 1e6),
    }


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


def _job_json(job: JobRecord) -> dict[str, Any]:
    return {
        "job": job.id,
        "name": job.name,
        "owner": job.owner,
        "state": job.state,
        "runtime": job.runtime,
        "module_sha256": job.module_sha256,
        "argv": list(job.argv),
        "limits": asdict(job.limits),
        "offer": credits(job.offer_micro),
        "escrow": credits(job.escrow_micro),
        "group": job.group,
        "requirements": job.requirements,
        "verifier": job.has_verifier,
        "cost_per_slice": asdict(job.cost) if job.cost else None,
        "effective_wage": _effective_wage(credits(job.offer_micro), job.cost),
        "created": job.created,
        "finished": job.finished,
        "slices": job.total,
        "max_attempts": job.max_attempts,
        "counts": job.counts,
    }


def _slice_json(s: SliceRecord) -> dict[str, Any]:
    out: dict[str, Any] = {"slice": s.slice, "state": s.state, "attempts": s.attempts}
    if s.result is not None:
        out["result_base64"] = base64.b64encode(s.result).decode()
    if s.error_code:
        out["error"] = {"code": s.error_code, "message": s.error or ""}
    return out
