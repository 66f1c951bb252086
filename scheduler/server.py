"""The scheduler's network face: one listen address for the worker websocket (``/worker``)
and the compute API (``/api/v1/...``, HTTP + JSON). See docs/protocol.md.

Each worker connection is a session: a challenge, a signed answer, then requests answered in
order. A malformed frame gets an ``error`` reply and the session carries on.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass, field, replace
from typing import Any, TypeVar

from aiohttp import WSMsgType, web

from dcp_protocol import (
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    SCHEDULER_MESSAGES,
    Ack,
    Auth,
    Error,
    ErrorCode,
    Fetch,
    FrameTooLarge,
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
    encode_json,
    limits,
    nesting,
    policy,
    signing,
    to_wire,
)
from dcp_protocol import Hello as HelloMsg
from dcp_protocol.policy import JobTerms, WorkerTerms

from .jobdoc import JobFileError, parse_document
from .limits import (
    ConnectionLimits,
    ConnectionRefusal,
    RefusalBudget,
    RefusalLimits,
    Ticket,
    UnauthenticatedConnections,
)
from .plausibility import MetricsRules
from .store import (
    InsufficientFunds,
    JobRecord,
    ResultLease,
    SliceRecord,
    Store,
    StoreError,
    UnknownJob,
    credits,
)
from .verifier import VERIFIER_LIMITS, VerifierPool

log = logging.getLogger("dcp.scheduler")

API = "/api/v1"
# Frames above the session's ``max_frame_bytes`` (announced in ``welcome``; the protocol's
# MAX_FRAME_BYTES at most) get a ``frame_too_large`` error; aiohttp closes the socket (1009)
# above twice MAX_FRAME_BYTES.
MAX_DEPLOY_BYTES = 256 * 1024 * 1024
#: A signed owner request is accepted this many seconds either side of the scheduler's clock.
REQUEST_WINDOW = 300.0
#: A spent nonce is remembered this long after its request's window closed (clock slack).
NONCE_MARGIN = 60.0
#: Read tokens live this long unless the owner asks for less (or more, up to the maximum).
READ_TOKEN_TTL = 24 * 3600.0
MAX_READ_TOKEN_TTL = 30 * 24 * 3600.0
READ_TOKEN_PREFIX = "dcp-rt-"
_NONCE = re.compile(r"[0-9a-f]{32}")
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
#: The longest a fetch may be parked waiting for work (the worker asks for less).
MAX_FETCH_WAIT = 30.0
#: The websocket close code of a session that did not authenticate in time.
CLOSE_AUTH_TIMEOUT = 4008
#: Seconds an overdue session's close handshake may take before its socket is dropped.
CLOSE_GRACE = 1.0
#: Where a request's connection ticket (scheduler.limits) is kept on the request.
TICKET = web.RequestKey("dcp.ticket", Ticket)
#: Error codes that refuse what a session sent (its fault, unlike ``internal``): a frame
#: answered with one of them spends the session's refusal budget (scheduler.limits).
REFUSING_CODES = frozenset(
    code.value
    for code in (
        ErrorCode.MALFORMED_FRAME,
        ErrorCode.FRAME_TOO_LARGE,
        ErrorCode.UNKNOWN_MESSAGE,
        ErrorCode.INVALID_MESSAGE,
        ErrorCode.UNSUPPORTED_VERSION,
        ErrorCode.UNEXPECTED_MESSAGE,
        ErrorCode.AUTH_FAILED,
        ErrorCode.BAD_SIGNATURE,
        ErrorCode.STALE_LEASE,
        ErrorCode.UNKNOWN_SLICE,
        ErrorCode.RESULT_TOO_LARGE,
        ErrorCode.METRICS_IMPLAUSIBLE,
    )
)


@dataclass(frozen=True)
class SchedulerConfig:
    name: str = "dcp-scheduler"
    heartbeat_interval: float = 3.0
    lease_timeout: float = 15.0
    max_result_bytes: int = 16 * 1024 * 1024
    #: The largest frame of a session, announced in ``welcome``: at most MAX_FRAME_BYTES,
    #: and room for one result of ``max_result_bytes`` (limits.result_frame_bytes).
    max_frame_bytes: int = MAX_FRAME_BYTES
    expiry_interval: float = 1.0
    verifier_wall_seconds: float = 10.0
    #: Evaluator processes that run verifiers; 0: half the CPUs.
    verifier_sandboxes: int = 0
    #: At most this many of one session's results are verified at once; the rest wait their
    #: turn, and a free sandbox goes to the session served least recently.
    verifications_per_session: int = 2
    #: Result metrics must be plausible (scheduler/plausibility.py): wall time within the
    #: lease's age plus the slack; CPU and GPU time within wall time x parallelism plus it.
    metrics_slack_seconds: float = 1.0
    metrics_parallelism: float = 64.0
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
    #: Refused frames a session may send at once, and per second past that burst.
    refusals: RefusalLimits = RefusalLimits()
    #: Leases one worker identity may hold at once (BOINC's "max tasks in progress"): a
    #: session fetching with capabilities that fit everything would otherwise hold every
    #: queued slice until its leases expired, again and again.
    max_leases_per_worker: int = 4096

    def __post_init__(self) -> None:
        if self.max_leases_per_worker < 1:
            raise ValueError("max_leases_per_worker must be at least 1")
        if not 1 <= self.max_frame_bytes <= MAX_FRAME_BYTES:
            raise ValueError(f"max_frame_bytes must be within 1..{MAX_FRAME_BYTES}")
        if not 1 <= self.max_result_bytes or (
            limits.result_frame_bytes(self.max_result_bytes) > self.max_frame_bytes
        ):
            raise ValueError(
                f"max_result_bytes must be >= 1 and leave a frame of max_frame_bytes room for"
                f" one result: at most {_largest_result(self.max_frame_bytes)} here"
            )


def _largest_result(max_frame_bytes: int) -> int:
    """The largest ``max_result_bytes`` that a frame limit carries."""
    return max(0, (max_frame_bytes - limits.RESULT_FIELDS_BYTES) // 4 * 3)


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
    #: Its allowance of refused frames (set when the session opens).
    refusals: RefusalBudget | None = None


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


def _spec_bytes(spec: JobSpec) -> int:
    """What ``spec`` takes in a ``work`` frame (exact: base64 needs no escapes)."""
    return len(encode_json(to_wire(replace(spec, module=b"")))) + 4 * -(-len(spec.module) // 3) + 1


def _peek_id(data: str | bytes, error: ProtocolError) -> int | None:
    """The request id of a frame that failed to parse, if one can be read and is in range
    (an error's ``re`` must be one the worker can decode)."""
    if isinstance(error, FrameTooLarge):
        return None  # never parse what is refused for its size
    try:
        obj = nesting.loads(data)  # the frame may be the one too deep to decode
        value = obj.get("id") if isinstance(obj, dict) else None
    except ValueError:  # NestingTooDeep included
        return None
    if type(value) is not int or not 0 <= value <= limits.MAX_UINT64:
        return None
    return value


class _Refused(Exception):
    """A compute API request refused: ``status`` and ``code`` go into the error reply."""

    def __init__(self, status: int, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


_S = TypeVar("_S")
_ApiHandler = Callable[[_S, web.Request], Coroutine[Any, Any, web.Response]]


def _answers_refusals(handler: _ApiHandler[_S]) -> _ApiHandler[_S]:
    """Answer a :class:`_Refused` raised by a compute API handler with its error reply."""

    @functools.wraps(handler)
    async def answer(self: _S, request: web.Request) -> web.Response:
        try:
            return await handler(self, request)
        except _Refused as exc:
            return _error(exc.status, exc.code, exc.message)

    return answer


class Scheduler:
    """Owns the store and serves sessions and the compute API."""

    def __init__(
        self,
        store: Store,
        config: SchedulerConfig | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``clock``: the compute API's clock (Unix seconds) for request freshness and read
        token expiry; tests inject one."""
        self.store = store
        self.clock = clock
        self.config = config or SchedulerConfig()
        self._jobs: OrderedDict[str, _JobInfo] = OrderedDict()
        self._sockets: set[web.WebSocketResponse] = set()
        self.verifiers = VerifierPool(
            size=self.config.verifier_sandboxes or None,
            limits=replace(VERIFIER_LIMITS, wall_seconds=self.config.verifier_wall_seconds),
            per_owner=self.config.verifications_per_session,
        )
        self._rules = MetricsRules(
            slack_seconds=self.config.metrics_slack_seconds,
            parallelism=self.config.metrics_parallelism,
        )
        #: Results whose verifier is running or waiting, by (job, slice, token): a resubmission
        #: waits for that verdict instead of running the verifier again.
        self._verifying: dict[tuple[str, int, str], asyncio.Event] = {}
        self._work_event = asyncio.Event()
        self._results_event = asyncio.Event()
        self.sessions = 0
        #: Sessions waiting now because they spent their refusal budget.
        self.throttled = 0
        self._stopping = asyncio.Event()
        self.limiter = UnauthenticatedConnections(self.config.limits)
        #: Websockets that hold a ticket, by its serial, until their auth is accepted.
        self._unauthenticated: dict[int, web.WebSocketResponse] = {}

    # ------------------------------------------------------------------ app

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=MAX_DEPLOY_BYTES, middlewares=[self._admit_connection]
        )
        app.router.add_get("/worker", self.worker_session)
        app.router.add_get(f"{API}/status", self.api_status)
        app.router.add_post(f"{API}/jobs", self.api_deploy)
        app.router.add_get(f"{API}/jobs", self.api_list)
        app.router.add_get(f"{API}/jobs/{{job}}", self.api_job)
        app.router.add_get(f"{API}/jobs/{{job}}/results", self.api_results)
        app.router.add_post(f"{API}/jobs/{{job}}/cancel", self.api_cancel)
        app.router.add_post(f"{API}/jobs/{{job}}/tokens", self.api_issue_token)
        app.router.add_delete(f"{API}/jobs/{{job}}/tokens/{{token}}", self.api_revoke_token)
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
    async def _admit_connection(
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
        self._stopping.set()  # throttled sessions stop waiting
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
        if ticket is not None:  # the auth deadline runs until welcome (see _admit_connection)
            self._unauthenticated[ticket.serial] = ws

        async def send(message: Message) -> None:
            if isinstance(message, Welcome):
                # An honest client sends one frame before welcome (auth): until then a session
                # has a burst of one refusal; from now on the configured one.
                session.refusals = RefusalBudget(self.config.refusals, loop.time())
                if ticket is not None:
                    self._unauthenticated.pop(ticket.serial, None)
                    self.limiter.release(ticket)
            async with send_lock:
                await ws.send_str(encode(message).decode())

        loop = asyncio.get_running_loop()
        session = _Session(
            id=secrets.token_hex(8),
            send=send,
            refusals=RefusalBudget(replace(self.config.refusals, burst=1), loop.time()),
        )
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
                    if isinstance(reply, Message) and _refuses(reply):
                        await self._throttle(session)
                for task in tasks:
                    task.cancel()
        finally:
            self._sockets.discard(ws)
            self.sessions -= 1
            log.info("session %s (%s) closed", session.id, session.address or "unauthenticated")
        return ws

    async def _throttle(self, session: _Session) -> None:
        """The session's frame was refused: spend its budget, and past its burst wait before
        its next frame is read (nothing of it is read meanwhile; other sessions go on)."""
        budget = session.refusals
        assert budget is not None
        delay = budget.charge(asyncio.get_running_loop().time())
        if delay <= 0:
            return
        if budget.waited == 1:
            log.warning(
                "session %s (%s): %d refused frames; reading its frames at %g a second",
                session.id,
                session.address or "unauthenticated",
                budget.charged,
                budget.limits.rate,
            )
        self.throttled += 1
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
        finally:
            self.throttled -= 1

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
        """Handle one frame; returns (a reply or a coroutine that will send it, close).

        Every frame gets an answer: a malformed one its error (the field and why), and a
        fault of ours ``internal`` (logged), never an exception that ends the session.
        """
        try:
            message = decode(data, SCHEDULER_MESSAGES, self.config.max_frame_bytes)
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
            return self._auth(session, challenge, message)
        try:
            return self._dispatch(session, message), False
        except StoreError as exc:
            return Error(re=rid, code=exc.code.value, message=str(exc)), False
        except Exception:
            log.exception("session %s: %s %s failed", session.id, message.type, rid)
            return Error(
                re=rid, code=ErrorCode.INTERNAL.value, message=f"{message.type} failed here"
            ), False

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
            max_frame_bytes=self.config.max_frame_bytes,
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
            session.address,
            message.max_slices,
            now,
            self.config.lease_timeout,
            eligible,
            max_held=self.config.max_leases_per_worker,
        )
        known = set(message.known_jobs)
        slices = [
            SliceLease(
                x.job, x.slice, x.token, x.attempt, x.deadline, x.datum, credits(x.offer_micro)
            )
            for x in leases
        ]
        jobs = {
            job_id: self._job(job_id).spec
            for job_id in dict.fromkeys(lease.job for lease in leases)
            if job_id not in known
        }
        kept, specs = self._fit_frame(session, slices, jobs, skipped)
        return Work(re=message.id, slices=kept, jobs=specs, skipped=tuple(skipped))

    def _fit_frame(
        self,
        session: _Session,
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
        if rough <= limit:
            return tuple(slices), tuple(jobs.values())
        size = len(encode(Work(re=limits.MAX_UINT64, skipped=tuple(skipped))))
        kept: list[SliceLease] = []
        specs: dict[str, JobSpec] = {}
        for lease in slices:
            more = len(encode_json(to_wire(lease))) + 1
            spec = jobs.get(lease.job) if lease.job not in specs else None
            if spec is not None:
                more += _spec_bytes(spec)
            if size + more > limit:
                break
            size += more
            kept.append(lease)
            if spec is not None:
                specs[lease.job] = spec
        rest = slices[len(kept) :]
        if rest:
            refs = [(x.job, x.slice, x.token) for x in rest]
            self.store.return_slices(session.address, refs)
            if not kept:
                log.error(
                    "slice %s/%d does not fit in a frame of %d bytes: not sent",
                    rest[0].job,
                    rest[0].slice,
                    limit,
                )
        return tuple(kept), tuple(specs.values())

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

    def _admit(
        self, session: _Session, item: Result | ResultItem, now: float
    ) -> ResultLease | Error:
        """The cheap checks of a result, in order: size, lease (token and holder), signature,
        metrics (docs/protocol.md section 3, "Result acceptance"). Nothing here runs a
        verifier. Returns the result's lease, or the refusal to answer (``re`` unset)."""
        if len(item.result) > self.config.max_result_bytes:
            return Error(
                re=None,
                code=ErrorCode.RESULT_TOO_LARGE.value,
                message=f"results are limited to {self.config.max_result_bytes} bytes",
            )
        try:
            lease = self.store.result_lease(item.job, item.slice, item.token, session.address)
        except StoreError as exc:
            return Error(re=None, code=exc.code.value, message=str(exc))
        payload = signing.result_payload(
            item.job, item.slice, item.token, item.result, item.payment_address
        )
        if not signing.verify(payload, item.signature, session.address):
            return Error(
                re=None,
                code=ErrorCode.BAD_SIGNATURE.value,
                message="the result is not signed by this session's identity",
            )
        if lease.state == "done":
            return lease  # a resubmission of the accepted result: acceptance says duplicate
        problem = self._rules.problem(item.metrics, lease, len(item.result), now)
        if problem is None:
            return lease
        return self._reject(session, item, ErrorCode.METRICS_IMPLAUSIBLE.value, problem, now)

    def _reject(
        self, session: _Session, item: Result | ResultItem, code: str, why: str, now: float
    ) -> Error:
        """Refuse a result as the verifier's rejection does: unpaid, counted against the
        worker, the slice queued again for other workers (or failed after its attempts)."""
        try:
            state = self.store.reject_result(
                item.job, item.slice, item.token, session.address, code, why, now
            )
        except StoreError as exc:
            return Error(re=None, code=exc.code.value, message=str(exc))
        log.warning(
            "result %s/%d from %s rejected: %s %s", item.job, item.slice, session.address, code, why
        )
        if state == "queued":
            self._wake()
        else:
            self._results_changed()
        return Error(re=None, code=code, message=why)

    def _result(
        self, session: _Session, message: Result, now: float
    ) -> Message | Coroutine[Any, Any, None]:
        admitted = self._admit(session, message, now)
        if isinstance(admitted, Error):
            return replace(admitted, re=message.id)
        if admitted.state != "done" and self._job(message.job).has_verifier:
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
            admitted = self._admit(session, item, now)
            if isinstance(admitted, Error):
                acks[i] = _item_ack(admitted)
            elif admitted.state != "done" and self._job(item.job).has_verifier:
                checked.append(i)
            else:
                plain.append(i)
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
        """Run the job's verifier on an admitted result, then accept or reject it; the reply.
        One verification per lease at a time: a resubmission meanwhile gets the answer
        acceptance gives once the first verdict is in (``duplicate`` or ``stale_lease``)."""
        key = (message.job, message.slice, message.token)
        try:
            while (running := self._verifying.get(key)) is not None:
                await running.wait()
                lease = self.store.result_lease(
                    message.job, message.slice, message.token, session.address
                )
                if lease.state == "done":
                    return self._accept(session, message, rid, time.time())
            done = self._verifying[key] = asyncio.Event()
            try:
                return await self._verify(session, message, rid)
            finally:
                del self._verifying[key]
                done.set()
        except StoreError as exc:
            return Error(re=rid, code=exc.code.value, message=str(exc))

    async def _verify(self, session: _Session, message: Result | ResultItem, rid: int) -> Message:
        verifier = self.store.job_verifier(message.job)
        argv = self._job(message.job).spec.argv
        datum = self.store.datum(message.job, message.slice)
        assert verifier is not None
        ref = LeaseRef(message.job, message.slice, message.token)
        # The worker stopped heartbeating this slice when it finished it: keep the lease alive
        # while its result waits for a sandbox and while it is checked.
        hold = self.config.lease_timeout + self.verifiers.limits.wall_seconds + 5
        self.store.heartbeat(session.address, [ref], time.time(), hold)

        def started() -> None:
            # Its turn came: still the current lease? (else StaleLease, and nothing runs)
            self.store.result_lease(message.job, message.slice, message.token, session.address)
            self.store.heartbeat(session.address, [ref], time.time(), hold)

        verdict = await self.verifiers.verify(
            message.job, verifier, argv, datum, message.result, owner=session.id, started=started
        )
        if verdict.ok:
            return self._accept(session, message, rid, time.time())
        error = self._reject(session, message, verdict.code, verdict.message, time.time())
        return replace(error, re=rid)

    # ------------------------------------------------------------------ compute API

    async def api_status(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "server": self.config.name,
                "protocol": PROTOCOL_VERSION,
                "sessions": self.sessions,
                "throttled_sessions": self.throttled,
            }
        )

    async def _signer(self, request: web.Request) -> str | None:
        """The address that signed this request (verified, fresh, its nonce now spent), or
        None when it carries no signature.

        Raises:
            _Refused: the signature headers are malformed, stale, wrong or replayed.
        """
        signature = request.headers.get("X-DCP-Signature")
        if signature is None:
            return None
        stamp = request.headers.get("X-DCP-Timestamp", "")
        nonce = request.headers.get("X-DCP-Nonce", "")
        if not _TIMESTAMP.fullmatch(stamp) or not _NONCE.fullmatch(nonce):
            raise _Refused(
                400,
                ErrorCode.INVALID_MESSAGE,
                "a signed request needs X-DCP-Timestamp (Unix seconds) and X-DCP-Nonce "
                "(32 lowercase hex digits)",
            )
        try:
            address = signing.checksum(request.headers.get("X-DCP-Owner", ""))
        except ValueError:
            raise _Refused(
                400, ErrorCode.INVALID_MESSAGE, "X-DCP-Owner is not an address"
            ) from None
        timestamp, now = int(stamp), self.clock()
        if abs(now - timestamp) > REQUEST_WINDOW:
            raise _Refused(
                401,
                ErrorCode.STALE_REQUEST,
                f"signed at {timestamp}, the scheduler's clock reads {now:.0f}: more than "
                f"{REQUEST_WINDOW:g} s apart",
            )
        body = await request.read()
        payload = signing.owner_request_payload(
            request.method,
            request.host,
            request.path,
            request.query.items(),
            body,
            timestamp,
            nonce,
            address,
        )
        if not signing.verify(payload, signature, address):
            raise _Refused(401, ErrorCode.BAD_SIGNATURE, "the request is not signed by X-DCP-Owner")
        try:
            fresh = self.store.use_nonce(
                address, nonce, now, timestamp + REQUEST_WINDOW + NONCE_MARGIN
            )
        except StoreError as exc:
            raise _Refused(503, ErrorCode.INTERNAL, str(exc)) from None
        if not fresh:
            raise _Refused(409, ErrorCode.REPLAYED_REQUEST, "this request was made before")
        return address

    def _owner_of(self, job_id: str) -> str:
        try:
            return self.store.job(job_id, counts=False).owner
        except UnknownJob as exc:
            raise _Refused(404, ErrorCode.UNKNOWN_SLICE, str(exc)) from None

    async def _check_owner(self, request: web.Request, job_id: str) -> str:
        """Acting on a job (cancel, tokens) needs its owner's signature; returns the owner."""
        signer = await self._signer(request)
        if signer is None:
            raise _Refused(401, ErrorCode.UNAUTHENTICATED, "this request must be signed")
        owner = self._owner_of(job_id)
        if signer != owner:
            raise _Refused(403, ErrorCode.NOT_OWNER, f"{signer} does not own job {job_id}")
        return owner

    async def _check_reader(self, request: web.Request, job_id: str) -> None:
        """Reading a job (spec, status, results) needs its owner's signature or a read token
        for that job."""
        if "X-DCP-Signature" in request.headers:
            await self._check_owner(request, job_id)
            return
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _Refused(
                401,
                ErrorCode.UNAUTHENTICATED,
                "reading a job needs its owner's signature or a read token",
            )
        record = self.store.read_token(_token_sha256(token.strip()))
        if record is None:
            raise _Refused(401, ErrorCode.READ_TOKEN_INVALID, "no such read token")
        if record.revoked is not None:
            raise _Refused(401, ErrorCode.READ_TOKEN_REVOKED, "the read token was revoked")
        if self.clock() >= record.expires:
            raise _Refused(401, ErrorCode.READ_TOKEN_EXPIRED, "the read token has expired")
        if record.job != job_id:
            raise _Refused(403, ErrorCode.READ_TOKEN_WRONG_JOB, "the read token is for another job")

    @_answers_refusals
    async def api_deploy(self, request: web.Request) -> web.Response:
        owner = await self._signer(request)
        if owner is None:
            return _error(401, ErrorCode.UNAUTHENTICATED, "a deploy must be signed by its owner")
        body = await request.read()
        try:
            job = parse_document(body, owner)
        except JobFileError as exc:
            return _error(400, ErrorCode.INVALID_MESSAGE, str(exc))
        try:
            job_id = self.store.create_job(job, time.time())
        except InsufficientFunds as exc:
            return _error(402, exc.code, str(exc), missing=credits(exc.missing))
        self._wake()
        log.info("job %s deployed by %s: %s, %d slices", job_id, job.owner, job.name, len(job.data))
        return web.json_response({"job": job_id, "slices": len(job.data)}, status=201)

    @_answers_refusals
    async def api_list(self, request: web.Request) -> web.Response:
        """Signed: the signer's jobs, in full. Anonymous: what a worker weighs of the active
        public jobs, and nothing else (no id, name, owner, argv or results)."""
        signer = await self._signer(request)
        jobs = self.store.list_jobs()
        if signer is not None:
            return web.json_response({"jobs": [_job_json(j) for j in jobs if j.owner == signer]})
        market = [_market_json(j) for j in jobs if j.state == "active" and not j.group]
        return web.json_response({"jobs": market})

    @_answers_refusals
    async def api_job(self, request: web.Request) -> web.Response:
        job_id = request.match_info["job"]
        await self._check_reader(request, job_id)
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

    @_answers_refusals
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
        await self._check_reader(request, job_id)
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

    @_answers_refusals
    async def api_cancel(self, request: web.Request) -> web.Response:
        job_id = request.match_info["job"]
        await self._check_owner(request, job_id)
        n = self.store.cancel_job(job_id, time.time())
        self._results_changed()
        return web.json_response({"job": job_id, "cancelled_slices": n})

    @_answers_refusals
    async def api_issue_token(self, request: web.Request) -> web.Response:
        """A read token for one job: its owner hands it to whoever may read the job."""
        job_id = request.match_info["job"]
        await self._check_owner(request, job_id)
        ttl = _token_ttl(await request.read())
        token = READ_TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = self.clock()
        try:
            record = self.store.create_read_token(job_id, _token_sha256(token), now, now + ttl)
        except UnknownJob as exc:
            return _error(404, ErrorCode.UNKNOWN_SLICE, str(exc))
        log.info("read token %s issued for job %s, expires in %g s", record.id, job_id, ttl)
        return web.json_response(
            {"job": job_id, "token": token, "token_id": record.id, "expires": record.expires},
            status=201,
        )

    @_answers_refusals
    async def api_revoke_token(self, request: web.Request) -> web.Response:
        job_id, token_id = request.match_info["job"], request.match_info["token"]
        await self._check_owner(request, job_id)
        if not self.store.revoke_read_token(job_id, token_id, self.clock()):
            return _error(
                404, ErrorCode.READ_TOKEN_INVALID, f"job {job_id} has no token {token_id}"
            )
        log.info("read token %s of job %s revoked", token_id, job_id)
        return web.json_response({"job": job_id, "token_id": token_id, "revoked": True})


def _token_sha256(token: str) -> str:
    # Tokens are 256 random bits: a fast hash is enough to keep the database from holding them.
    return hashlib.sha256(token.encode()).hexdigest()


def _token_ttl(body: bytes) -> float:
    """The lifetime a token request asks for: ``{"ttl": seconds}``, or the default."""
    if not body:
        return READ_TOKEN_TTL
    try:
        doc = nesting.loads(body)
    except ValueError:
        raise _Refused(400, ErrorCode.INVALID_MESSAGE, "the body is not JSON") from None
    ttl = doc.get("ttl", READ_TOKEN_TTL) if isinstance(doc, dict) else None
    if (
        not isinstance(doc, dict)
        or set(doc) - {"ttl"}
        or isinstance(ttl, bool)
        or not isinstance(ttl, (int, float))
        or not 1 <= ttl <= MAX_READ_TOKEN_TTL
    ):
        raise _Refused(
            400,
            ErrorCode.INVALID_MESSAGE,
            f'the body is {{"ttl": seconds}}, 1 to {MAX_READ_TOKEN_TTL:g}',
        )
    return float(ttl)


def _refuses(reply: Message) -> bool:
    """Whether ``reply`` refuses what the session sent (it spends the refusal budget): an
    error of REFUSING_CODES, a ``results_ack`` refusing any item so, or a heartbeat's lost
    leases. A frame counts once however many items it refuses."""
    if isinstance(reply, Error):
        return reply.code in REFUSING_CODES
    if isinstance(reply, ResultsAck):
        return any(a.status == "refused" and a.code in REFUSING_CODES for a in reply.acks)
    if isinstance(reply, HeartbeatAck):
        return bool(reply.lost)
    return False


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


def _market_json(job: JobRecord) -> dict[str, Any]:
    """What anyone may see of an active public job: what a worker weighs before it takes a
    slice. Nothing names the job or its owner; the job's id comes only with a lease."""
    return {
        "runtime": job.runtime,
        "offer": credits(job.offer_micro),
        "limits": asdict(job.limits),
        "requirements": job.requirements,
        "effective_wage": _effective_wage(credits(job.offer_micro), job.cost),
        "slices": job.total,
        "queued": job.counts.get("queued", 0),
    }


def _slice_json(s: SliceRecord) -> dict[str, Any]:
    out: dict[str, Any] = {"slice": s.slice, "state": s.state, "attempts": s.attempts}
    if s.result is not None:
        out["result_base64"] = base64.b64encode(s.result).decode()
    if s.error_code:
        out["error"] = {"code": s.error_code, "message": s.error or ""}
    return out
