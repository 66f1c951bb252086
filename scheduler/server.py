"""The scheduler's network face: one listen address for the worker websocket (``/worker``),
the compute API (``/api/v1/...``, HTTP + JSON; docs/protocol.md) and the web console
(``/console/...``, scheduler/web/; docs/console.md).

:class:`Scheduler` wires the rooms together over one store: worker sessions
(scheduler/session.py) and result acceptance (scheduler/acceptance.py) decide every reply to a
frame, the compute API (scheduler/api.py) every HTTP answer. What is left here is I/O and time:
the aiohttp app, the websocket loop, parked long-poll fetches, the throttling of sessions that
spend their refusal budget, the admission of unauthenticated connections, lease expiry and
garbage collection, and shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import replace
from typing import Any

from aiohttp import WSMsgType, web

from dcp_protocol import (
    BINARY_VERSION,
    MAX_FRAME_BYTES,
    Error,
    ErrorCode,
    Fetch,
    HeartbeatAck,
    Message,
    ResultsAck,
    Welcome,
)

from .acceptance import Acceptance
from .api import ComputeApi
from .config import MAX_FETCH_WAIT, SchedulerConfig
from .limits import (
    ConnectionRefusal,
    RefusalBudget,
    Ticket,
    UnauthenticatedConnections,
)
from .quorum import network_of
from .session import Dispatcher, Park, WorkerSession
from .specs import JobSpecs
from .store import PeerNotifier, Store, StoreError
from .store.pool import StorePool
from .verifier import VERIFIER_LIMITS, VerifierPool
from .wakeups import RESULTS, WORK, Wakeups
from .web import Console
from .web.access import OPERATOR_PREFIX

__all__ = ["REFUSING_CODES", "TICKET", "Scheduler", "SchedulerConfig"]

log = logging.getLogger("dcp.scheduler")

API = "/api/v1"
# Frames above the session's ``max_frame_bytes`` (announced in ``welcome``; the protocol's
# MAX_FRAME_BYTES at most) get a ``frame_too_large`` error; aiohttp closes the socket (1009)
# above twice MAX_FRAME_BYTES.
MAX_DEPLOY_BYTES = 256 * 1024 * 1024
#: The websocket close code of a session that did not authenticate in time.
CLOSE_AUTH_TIMEOUT = 4008
#: Seconds an overdue session's close handshake may take before its socket is dropped.
CLOSE_GRACE = 1.0
#: Where a request's connection ticket (scheduler.limits) is kept on the request.
TICKET = web.RequestKey("dcp.ticket", Ticket)
#: Seconds between wake-ups of every waiter where replicas notify each other: a notification
#: lost with the listening connection is made good within this.
SAFETY_POLL = 1.0
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


class Scheduler:
    """Owns the store and serves sessions and the compute API."""

    def __init__(
        self,
        store: Store,
        config: SchedulerConfig | None = None,
        clock: Callable[[], float] = time.time,
        operator_token: str | None = None,
        peer_wakeups: float | None = None,
    ) -> None:
        """``clock``: the compute API's clock (Unix seconds) for request freshness and read
        token expiry; tests inject one. ``operator_token``: what opens the web console's
        operator pages (``serve`` keeps it beside the database); None makes one that nobody
        is told (no operator pages). ``peer_wakeups``: how other replicas on the same
        database wake this one's parked fetches and long polls: None, PostgreSQL's
        LISTEN/NOTIFY (with a safety poll each SAFETY_POLL seconds); a number, a poll with
        that period (any backend)."""
        self.store = store
        self.config = config or SchedulerConfig()
        #: Where every store call of serving runs: inline, or on threads (PostgreSQL with
        #: ``db_connections``).
        self.db = StorePool(store, self.config.db_connections)
        self._sockets: set[web.WebSocketResponse] = set()
        self.verifiers = VerifierPool(
            size=self.config.verifier_sandboxes or None,
            limits=replace(VERIFIER_LIMITS, wall_seconds=self.config.verifier_wall_seconds),
            per_owner=self.config.verifications_per_session,
        )
        self.wakeups = Wakeups()
        self._peer_poll = peer_wakeups
        self.notifier: PeerNotifier | None = None
        if peer_wakeups is None:
            self.notifier = store.notifier((WORK, RESULTS), self.wakeups.woken, self.db)
        if self.notifier is not None:
            self.wakeups.publish = self.notifier.publish
            self._peer_poll = SAFETY_POLL
        specs = JobSpecs(self.db)
        acceptance = Acceptance(self.db, self.config, specs, self.verifiers, self.wakeups)
        self.dispatcher = Dispatcher(self.db, self.config, specs, acceptance, self.wakeups)
        self.api = ComputeApi(self.db, clock, self.wakeups)
        #: Worker sessions open now (an address once authenticated).
        self._live: dict[str, WorkerSession] = {}
        self.console = Console(
            self.db,
            self.connected_workers,
            operator_token or OPERATOR_PREFIX + secrets.token_urlsafe(32),
            clock,
        )
        self.sessions = 0
        #: Sessions waiting now because they spent their refusal budget.
        self.throttled = 0
        self._stopping = asyncio.Event()
        self.limiter = UnauthenticatedConnections(self.config.limits)
        #: Websockets that hold a ticket, by its serial, until their auth is accepted.
        self._unauthenticated: dict[int, web.WebSocketResponse] = {}
        #: Connections accepted whose first request has not begun (scheduler/listener.py).
        self._accepted: dict[asyncio.BaseTransport, Ticket] = {}

    # ------------------------------------------------------------------ app

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=MAX_DEPLOY_BYTES, middlewares=[self._admit_connection]
        )
        app.router.add_get("/worker", self.worker_session)
        app.router.add_get(f"{API}/status", self.api_status)
        app.router.add_post(f"{API}/jobs", self.api.deploy)
        app.router.add_get(f"{API}/jobs", self.api.list_jobs)
        app.router.add_get(f"{API}/jobs/{{job}}", self.api.job)
        app.router.add_get(f"{API}/jobs/{{job}}/results", self.api.results)
        app.router.add_get(f"{API}/jobs/{{job}}/votes", self.api.votes)
        app.router.add_post(f"{API}/jobs/{{job}}/cancel", self.api.cancel)
        app.router.add_post(f"{API}/jobs/{{job}}/tokens", self.api.issue_token)
        app.router.add_delete(f"{API}/jobs/{{job}}/tokens/{{token}}", self.api.revoke_token)
        app.router.add_get(f"{API}/accounts/{{address}}", self.api.account)
        self.console.add_routes(app)  # /console/... and / (scheduler/web/)
        app.cleanup_ctx.append(self._pool_ctx)  # first in, last out: after every handler
        app.cleanup_ctx.append(self._expiry_ctx)
        app.cleanup_ctx.append(self._peers_ctx)
        app.cleanup_ctx.append(self._auth_deadline_ctx)
        app.on_shutdown.append(self._close_sessions)
        return app

    def runner_options(self) -> dict[str, Any]:
        """aiohttp server settings that belong to this configuration (``web.AppRunner``)."""
        # keepalive_timeout runs from the accept: a connection whose request line and headers
        # are not all in by then is closed (aiohttp has no separate header timeout).
        return {"keepalive_timeout": self.config.http_header_timeout}

    def connection_opened(self, transport: asyncio.BaseTransport) -> ConnectionRefusal | None:
        """A connection was accepted (:class:`~scheduler.listener.GuardedSite`): it holds a
        ticket until its first request takes its own, or it ends; over a limit it is
        refused (the reason)."""
        peer = transport.get_extra_info("peername")
        address = peer[0] if isinstance(peer, tuple) and peer else ""
        ticket = self.limiter.admit(address)
        if isinstance(ticket, ConnectionRefusal):
            log.info("refused a connection from %s: %s", address, ticket.value)
            return ticket
        self._accepted[transport] = ticket
        return None

    def connection_closed(self, transport: asyncio.BaseTransport) -> None:
        ticket = self._accepted.pop(transport, None)
        if ticket is not None:
            self.limiter.release(ticket)

    @web.middleware
    async def _admit_connection(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Every request holds a ticket of the unauthenticated-connection limits while it is
        served (a worker websocket until its auth is accepted); over a limit it is refused at
        once (503, named); its body must arrive within the body timeout (408, named)."""
        address = request.remote or ""
        if request.transport is not None:  # its accept's ticket is replaced by this one
            self.connection_closed(request.transport)
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
            try:
                return await handler(request)
            except StoreError as exc:
                # What a handler did not answer itself: the database failed (unavailable,
                # locked, a lost connection). Nothing of the request happened; say so, and
                # when to try again, instead of a bare 500.
                if exc.code is not ErrorCode.INTERNAL:
                    raise
                log.warning("%s %s: %s", request.method, request.path, exc)
                response = web.json_response(
                    {"error": {"code": exc.code.value, "message": str(exc)}}, status=503
                )
                response.headers["Retry-After"] = "1"
                return response
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

    async def _pool_ctx(self, app: web.Application) -> Any:
        yield
        # The handlers are done: wait for their calls on the pool's threads, then close them.
        await asyncio.get_running_loop().run_in_executor(None, self.db.close)

    async def _peers_ctx(self, app: web.Application) -> Any:
        """Listen to the other replicas, and poll: what a lost notification missed is found
        within one period."""
        tasks = []
        if self.notifier is not None:
            tasks.append(asyncio.create_task(self.notifier.listen()))
        if self._peer_poll is not None:
            tasks.append(asyncio.create_task(self._poll_peers(self._peer_poll)))
        yield
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _poll_peers(self, period: float) -> None:
        """Wake the long polls of results, and the parked fetches only if some slice is
        queued at all: waking every parked fetch costs one lease transaction each (200
        parked fetches: 1,950 statements a second at a 0.1 s poll, benchmarks/wakeups.py),
        one question costs one."""
        while True:
            await asyncio.sleep(period)
            try:
                queued = await self.db.run(lambda s: s.has_queued())
            except StoreError:
                queued = True  # cannot tell: let the fetches find out, as they would
            self.wakeups.woken(RESULTS)
            if queued:
                self.wakeups.woken(WORK)

    async def _expiry_ctx(self, app: web.Application) -> Any:
        # Leases held while the scheduler was down would expire at the first pass: give their
        # workers one lease timeout from now to reconnect and deliver (they retry well within).
        now = time.time()
        extended = await self.db.run(
            lambda s: s.extend_leases(now + self.config.lease_timeout, now)
        )
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
                n = await self.db.run(functools.partial(_expire, now=now))
                if now - last_gc >= self.config.gc_interval:
                    last_gc = now
                    collect = functools.partial(
                        _collect_garbage, now=now, lifetime=self.config.job_lifetime
                    )
                    for job_id in await self.db.run(collect):
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
                self.wakeups.wake_work()
                self.wakeups.wake_results()

    # ------------------------------------------------------------------ worker sessions

    async def worker_session(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=2 * MAX_FRAME_BYTES, compress=False)
        await ws.prepare(request)
        send_lock = asyncio.Lock()
        ticket: Ticket | None = request.get(TICKET)
        if ticket is not None:  # the auth deadline runs until welcome (see _admit_connection)
            self._unauthenticated[ticket.serial] = ws
        loop = asyncio.get_running_loop()
        # An honest client sends one frame before welcome (auth): until then a session has a
        # burst of one refusal; from welcome on the configured one.
        refusals = RefusalBudget(replace(self.config.refusals, burst=1), loop.time())

        async def send(message: Message) -> None:
            nonlocal refusals
            if isinstance(message, Welcome):
                refusals = RefusalBudget(self.config.refusals, loop.time())
                if ticket is not None:
                    self._unauthenticated.pop(ticket.serial, None)
                    self.limiter.release(ticket)
            data = session.encode(message)  # MessagePack to a session whose frames are
            async with send_lock:
                if session.binary:
                    await ws.send_bytes(data)
                else:
                    await ws.send_str(data.decode())

        session = self.dispatcher.open(network_of(request.remote or ""))
        self._live[session.id] = session
        self._sockets.add(ws)
        self.sessions += 1
        try:
            await send(self.dispatcher.hello(session))
            async with asyncio.TaskGroup() as tg:
                tasks: set[asyncio.Task[None]] = set()
                async for frame in ws:
                    if frame.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                        break
                    reply, close = await self.dispatcher.receive(session, frame.data)
                    if isinstance(reply, Park):
                        later: Coroutine[Any, Any, None] | None = self._long_fetch(
                            session, send, reply.fetch
                        )
                    elif asyncio.iscoroutine(reply):
                        later = _send_when_ready(send, reply)
                    else:
                        later = None
                        await send(reply)
                    if later is not None:
                        # A long poll or a verification: its own task, so the session keeps
                        # serving; it sends its reply itself.
                        task = tg.create_task(later)
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                    if close:
                        await ws.close(code=4001, message=b"authentication failed")
                        break
                    if isinstance(reply, Message) and _refuses(reply):
                        await self._throttle(session, refusals)
                for task in tasks:
                    task.cancel()
        finally:
            self._live.pop(session.id, None)
            self._sockets.discard(ws)
            self.sessions -= 1
            log.info("session %s (%s) closed", session.id, session.address or "unauthenticated")
        return ws

    async def _throttle(self, session: WorkerSession, budget: RefusalBudget) -> None:
        """The session's frame was refused: spend its budget, and past its burst wait before
        its next frame is read (nothing of it is read meanwhile; other sessions go on)."""
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

    async def _long_fetch(
        self,
        session: WorkerSession,
        send: Callable[[Message], Awaitable[None]],
        message: Fetch,
    ) -> None:
        """Answer a parked fetch once it leased something, or when its wait is over."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(message.wait_seconds, MAX_FETCH_WAIT)
        try:
            while True:
                event = self.wakeups.work  # taken before leasing, so no wake-up is missed
                try:
                    work = await self.dispatcher.fetch(session, message, time.time())
                except StoreError as exc:
                    await send(Error(re=message.id, code=exc.code.value, message=str(exc)))
                    return
                remaining = deadline - loop.time()
                if work.slices or work.skipped or remaining <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), remaining)
        finally:
            session.parked = False
        try:
            await send(work)
        except (ConnectionError, RuntimeError):
            # The worker left while its fetch was parked: give the slices back at once rather
            # than letting them expire (which would cost them an attempt).
            n = await self.dispatcher.return_unsent(session, work)
            log.info("session %s left during a long poll; returned %d slice(s)", session.id, n)

    def connected_workers(self) -> set[str]:
        """The addresses of the workers whose sessions are open and authenticated now."""
        return {s.address for s in self._live.values() if s.address}

    # ------------------------------------------------------------------ compute API

    async def api_status(self, request: web.Request) -> web.Response:
        """The server's name and protocol, and its sessions now (the compute API's other
        handlers are scheduler/api.py's)."""
        return web.json_response(
            {
                "server": self.config.name,
                "protocol": BINARY_VERSION,  # the highest it speaks, as in hello
                "sessions": self.sessions,
                "throttled_sessions": self.throttled,
                # Store calls under way on the pool's threads (PostgreSQL): how many requests
                # wait for the database now.
                "store_calls_in_flight": self.db.in_flight,
            }
        )


def _expire(store: Store, now: float) -> int:
    return store.expire_leases(now)


def _collect_garbage(store: Store, now: float, lifetime: float) -> list[str]:
    return store.collect_garbage(now, lifetime)


async def _send_when_ready(
    send: Callable[[Message], Awaitable[None]], reply: Coroutine[Any, Any, Message]
) -> None:
    """Send a reply that a verifier decides once it is decided."""
    await send(await reply)


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
