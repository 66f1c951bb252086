"""The scheduler's listening socket: a connection counts against the unauthenticated limits
from the moment it is accepted, not from when its request's headers are all in.

aiohttp hands a request to the application only once its request line and headers have
arrived, so a client that sends half a request line held a file descriptor, uncounted, until
the header timeout: 300 such connections from one address stayed open against a per-address
limit of 32. :class:`GuardedSite` listens as ``web.TCPSite`` does, each connection's protocol
wrapped by :class:`_Counted`, which takes a ticket of the scheduler's limiter when the
connection is made (refusing it at once, with a named 503, when a limit is reached) and gives
it back when the first request's own ticket is taken (``Scheduler._admit_connection``) or the
connection ends.
"""

from __future__ import annotations

import asyncio
import json
from typing import Protocol

from aiohttp import web

from .limits import ConnectionRefusal

__all__ = ["Admission", "GuardedSite", "REFUSED_LINGER"]

#: How long a refused connection may take to close after its answer (then it is aborted).
REFUSED_LINGER = 1.0


class Admission(Protocol):
    """What the listener asks of the scheduler about each connection."""

    def connection_opened(self, transport: asyncio.BaseTransport) -> ConnectionRefusal | None:
        """Count a new connection; the reason it is refused, or None."""

    def connection_closed(self, transport: asyncio.BaseTransport) -> None:
        """The connection ended: what it still holds is released."""


def refusal_bytes(reason: ConnectionRefusal, message: str) -> bytes:
    """A whole HTTP response refusing a connection by name (what ``_refusal`` answers a
    request with), for a connection refused before any request was read."""
    body = json.dumps({"error": {"code": reason.value, "message": message}}).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Retry-After: 1\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


class _Counted(asyncio.Protocol):
    """aiohttp's protocol for one connection, counted by ``admission`` while it lives; a
    refused connection never reaches aiohttp."""

    def __init__(self, inner: asyncio.Protocol, admission: Admission) -> None:
        self._inner: asyncio.Protocol | None = inner
        self._admission = admission
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        refused = self._admission.connection_opened(transport)
        if refused is not None:
            # Answered, then closed once the client has sent what it sends (what it sends is
            # dropped): a close with its request unread would reset the connection, and the
            # client would never read why. At most REFUSED_LINGER seconds.
            self._inner = None
            assert isinstance(transport, asyncio.Transport)
            transport.write(
                refusal_bytes(refused, "too many unauthenticated connections; retry later")
            )
            if transport.can_write_eof():
                transport.write_eof()
            asyncio.get_running_loop().call_later(REFUSED_LINGER, transport.abort)
            return
        self._transport = transport
        assert self._inner is not None
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._admission.connection_closed(self._transport)
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        # A refused connection (no inner protocol): returning None closes it.
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()


class GuardedSite(web.TCPSite):
    """``web.TCPSite``, each accepted connection counted by ``admission`` from its accept."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, admission: Admission) -> None:
        super().__init__(runner, host, port)
        self._admission = admission

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        assert server is not None
        admission = self._admission

        def counted() -> asyncio.Protocol:
            return _Counted(server(), admission)

        self._server = await asyncio.get_running_loop().create_server(
            counted, self._host, self._port, backlog=self._backlog
        )
        self._bound_port = self._server.sockets[0].getsockname()[1]
