"""One authenticated websocket session with the scheduler, with request/reply matching.

:func:`open_session` connects, answers the challenge, and returns a :class:`Session` whose
:meth:`Session.request` sends a message and awaits the reply that names its id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

import websockets
from websockets.asyncio.client import ClientConnection, connect

from dcp_keys.identity import Identity
from dcp_protocol import MAX_FRAME_BYTES, DcpError, Error, Message, Welcome
from dcp_protocol.session import Failed, Opened, Replied, Unsolicited, WorkerSession

from . import __version__

__all__ = ["Session", "SessionError", "open_session", "websocket_url"]

log = logging.getLogger("dcp.worker.connection")


class SessionError(DcpError):
    """The session could not be opened or was lost; ``code`` names a protocol reason if any."""

    def __init__(self, message: str, code: str = "", fatal: bool = False) -> None:
        super().__init__(message)
        self.code = code
        #: True when retrying cannot help (e.g. the scheduler refused our identity).
        self.fatal = fatal


def websocket_url(scheduler: str) -> str:
    """``ws(s)://host:port/worker`` for a scheduler URL given as http(s):// or ws(s)://."""
    parts = urlsplit(scheduler if "://" in scheduler else f"http://{scheduler}")
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise SessionError(f"unsupported scheduler URL scheme {parts.scheme!r}", fatal=True)
    path = parts.path if parts.path not in ("", "/") else "/worker"
    return urlunsplit((scheme, parts.netloc, path, "", ""))


class Session:
    """An authenticated session: :class:`dcp_protocol.session.WorkerSession` (the protocol:
    ids, reply matching, the frame limit announced in ``welcome``) run over a websocket."""

    def __init__(self, ws: ClientConnection, core: WorkerSession) -> None:
        assert core.welcome is not None
        self.ws = ws
        self.core = core
        ws.protocol.max_message_size = core.max_frame_bytes
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._reader: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()

    @property
    def welcome(self) -> Welcome:
        assert self.core.welcome is not None  # an open session has one
        return self.core.welcome

    @property
    def max_frame_bytes(self) -> int:
        """The largest frame either side sends on this session (from ``welcome``)."""
        return self.core.max_frame_bytes

    def start(self) -> None:
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for data in self.ws:
                for event in self.core.receive(data):
                    if isinstance(event, Replied):
                        future = self._pending.pop(event.rid, None)
                        if future is not None and not future.done():
                            future.set_result(event.message)
                    elif isinstance(event, Unsolicited):
                        if isinstance(event.message, Error):
                            log.warning(
                                "scheduler error: %s %s", event.message.code, event.message.message
                            )
                    elif isinstance(event, Failed):
                        # A reply we cannot read leaves its request unanswered for good: end
                        # the session (its requests fail, the worker reconnects with backoff).
                        log.warning("scheduler sent a %s; closing the session", event.reason)
                        await self.ws.close(1002, f"bad frame: {event.code}"[:120])
                        return
        except websockets.ConnectionClosed:
            pass
        finally:
            self.core.connection_lost()
            self.closed.set()
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(SessionError("the connection to the scheduler closed"))
            self._pending.clear()

    async def request(self, build: Callable[[int], Message]) -> Message:
        """Send ``build(request_id)`` and await the reply that names that id. A request whose
        frame exceeds ``max_frame_bytes`` is not sent: its reply is a local ``error``
        ``frame_too_large``, as the scheduler would have answered.

        Raises:
            SessionError: the connection closed before the reply came.
        """
        if self.closed.is_set():
            raise SessionError("the connection to the scheduler is closed")
        rid, data = self.core.request(build)
        if isinstance(data, Error):
            log.warning("frame not sent: %s", data.message)
            return data
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        try:
            await self.ws.send(data if self.core.binary else data.decode())
        except websockets.ConnectionClosed as exc:
            self._pending.pop(rid, None)
            self.core.forget(rid)
            raise SessionError(f"the connection to the scheduler closed: {exc}") from None
        return await future

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


async def open_session(
    scheduler: str,
    identity: Identity,
    payment_address: str,
    timeout: float = 15.0,
    groups: dict[str, str] | None = None,
    leave_public_group: bool = False,
    json_frames: bool = False,
) -> Session:
    """Connect and authenticate, proving membership of ``groups`` (join key -> join hash);
    frames go in MessagePack where the scheduler speaks protocol version 2, unless
    ``json_frames``.

    Raises:
        SessionError: unreachable scheduler, protocol violation, or refused identity (fatal).
    """
    url = websocket_url(scheduler)
    core = WorkerSession(
        identity.address,
        identity.sign,
        payment_address,
        agent=f"dcp-worker/{__version__}",
        groups=groups,
        leave_public_group=leave_public_group,
        binary=not json_frames,
    )
    try:
        async with asyncio.timeout(timeout):
            ws = await connect(
                url,
                compression=None,
                max_size=MAX_FRAME_BYTES,
                open_timeout=timeout,
                close_timeout=2,
                ping_interval=20,
                ping_timeout=20,
            )
            try:
                outcome: Opened | Failed | None = None
                while outcome is None:
                    events = core.receive(await ws.recv())
                    for frame in core.data_to_send():
                        await ws.send(frame if core.binary else frame.decode())
                    outcome = next((e for e in events if isinstance(e, Opened | Failed)), None)
            except BaseException:
                await ws.close()
                raise
    except TimeoutError:
        raise SessionError(f"no answer from {url} within {timeout:g} s") from None
    except (OSError, websockets.InvalidHandshake, websockets.InvalidURI) as exc:
        raise SessionError(f"cannot connect to {url}: {exc}") from None
    except websockets.ConnectionClosed as exc:
        raise SessionError(f"{url} closed the connection during the handshake: {exc}") from None
    if isinstance(outcome, Failed):
        await ws.close()
        raise SessionError(f"{url}: {outcome.reason}", outcome.code, fatal=outcome.fatal)
    session = Session(ws, core)
    session.start()
    return session
