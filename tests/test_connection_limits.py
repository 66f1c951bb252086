"""Connections that never authenticate are closed or refused (issue 14 item 6): a real
scheduler on loopback with short configured limits, raw sockets and websockets."""

from __future__ import annotations

import asyncio
import functools
import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import websockets
from websockets.asyncio.client import ClientConnection, connect

import dcp_protocol as p
from dcp_protocol import signing

from .conftest import Keystore, SchedulerProcess, eventually

#: How long a test waits for the scheduler to act on a 1 s limit (generous: a loaded machine).
PATIENCE = 20.0


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[SchedulerProcess]:
    """Every deadline 1 s."""
    proc = SchedulerProcess(
        tmp_path / "scheduler.db",
        "--auth-timeout",
        "1",
        "--http-header-timeout",
        "1",
        "--http-body-timeout",
        "1",
    )
    yield proc
    proc.stop()


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[SchedulerProcess]:
    """Three unauthenticated connections per address, and deadlines far beyond the test."""
    proc = SchedulerProcess(
        tmp_path / "scheduler.db",
        "--auth-timeout",
        "600",
        "--http-header-timeout",
        "600",
        "--max-unauthenticated-per-address",
        "3",
    )
    yield proc
    proc.stop()


async def _recv(ws: ClientConnection) -> p.Message:
    return p.decode(await asyncio.wait_for(ws.recv(), PATIENCE), p.SCHEDULER_MESSAGES)


async def _authenticated(url: str, keystore: Keystore) -> ClientConnection:
    ws = await connect(url, compression=None)
    hello = await _recv(ws)
    assert isinstance(hello, p.Hello)
    identity = keystore.identity
    sig = identity.sign(signing.session_payload(hello.challenge, hello.server, identity.address))
    auth = p.Auth(id=1, address=identity.address, signature=sig, payment_address=identity.address)
    await ws.send(p.encode(auth).decode())
    assert isinstance(await _recv(ws), p.Welcome)
    return ws


async def _still_works(ws: ClientConnection, rid: int) -> None:
    await ws.send(p.encode(p.Fetch(id=rid, max_slices=1)).decode())
    reply = await _recv(ws)
    assert isinstance(reply, p.Work) and reply.re == rid


def _raw(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=PATIENCE)
    return sock


def _read_until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes the socket, and the seconds that took."""
    started = time.monotonic()
    data = b""
    while chunk := sock.recv(65536):  # a timeout (socket.timeout) fails the test
        data += chunk
    return data, time.monotonic() - started


def test_a_websocket_that_never_authenticates_is_closed_by_the_deadline(
    guarded: SchedulerProcess, make_keystore: Callable[[str], Keystore]
) -> None:
    async def main() -> None:
        honest = await _authenticated(guarded.ws_url, make_keystore("worker"))
        async with connect(guarded.ws_url, compression=None) as idle:
            assert isinstance(await _recv(idle), p.Hello)
            started = time.monotonic()
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(idle.recv(), PATIENCE)
            assert time.monotonic() - started >= 0.5  # the deadline, not an instant refusal
            assert closed.value.rcvd is not None
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4008, "auth_timeout")
        # The authenticated session outlived the deadline and still works.
        await _still_works(honest, 2)
        await honest.close()

    asyncio.run(main())


def test_a_websocket_upgrade_that_is_never_read_is_closed(guarded: SchedulerProcess) -> None:
    # A raw upgrade whose client never reads the hello nor answers the close frame.
    with _raw(guarded.url) as sock:
        sock.sendall(
            b"GET /worker HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        data, _ = _read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 101")
    assert b"auth_timeout" in data  # in the close frame


def test_a_half_sent_request_line_is_closed(guarded: SchedulerProcess) -> None:
    with _raw(guarded.url) as sock:
        sock.sendall(b"GET /api/v1/sta")
        data, elapsed = _read_until_closed(sock)
    assert data == b"" and elapsed >= 0.5


def test_half_sent_headers_are_closed(guarded: SchedulerProcess) -> None:
    with _raw(guarded.url) as sock:
        sock.sendall(b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\n")
        data, _ = _read_until_closed(sock)
    assert data == b""


def test_a_half_sent_body_is_refused_with_408_and_closed(guarded: SchedulerProcess) -> None:
    with _raw(guarded.url) as sock:
        sock.sendall(b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
        data, _ = _read_until_closed(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert json.loads(body)["error"]["code"] == "http_body_timeout"


def test_the_per_address_limit_refuses_the_next_unauthenticated_connection(
    limited: SchedulerProcess, make_keystore: Callable[[str], Keystore]
) -> None:
    async def main() -> None:
        honest = await _authenticated(limited.ws_url, make_keystore("worker"))
        idle = [await connect(limited.ws_url, compression=None) for _ in range(3)]
        for ws in idle:
            assert isinstance(await _recv(ws), p.Hello)
        with pytest.raises(websockets.InvalidStatus) as refused:
            await connect(limited.ws_url, compression=None)
        response = refused.value.response
        assert response.status_code == 503
        body = json.loads(response.body or b"")
        assert body["error"]["code"] == "too_many_unauthenticated_from_address"
        # The compute API from the same address is under the same limit.
        with _raw(limited.url) as sock:
            sock.sendall(b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\n\r\n")
            data, _ = _read_until_closed(sock)
        assert data.startswith(b"HTTP/1.1 503")
        assert b"too_many_unauthenticated_from_address" in data
        # The authenticated worker is not counted and keeps working.
        await _still_works(honest, 2)
        # A place frees when an idle connection goes.
        await idle[0].close()
        again = await eventually(
            lambda: connect(limited.ws_url, compression=None), websockets.InvalidStatus, PATIENCE
        )
        assert isinstance(await _recv(again), p.Hello)
        for ws in [*idle, again, honest]:
            await ws.close()

    asyncio.run(main())


def test_half_sent_requests_count_against_the_per_address_limit_from_their_accept(
    limited: SchedulerProcess,
) -> None:
    """aiohttp reads a request only once its headers are in: connections that sent half a
    request line held a descriptor each, uncounted, until the header timeout (300 of them
    from one address against a limit of 32). They count from the accept now."""
    held = [_raw(limited.url) for _ in range(3)]
    try:
        for sock in held:
            sock.sendall(b"GET /api/v1/sta")

        refused = functools.partial(_status_answered, limited.url, b"503")
        data = asyncio.run(eventually(lambda: _async(refused), AssertionError, PATIENCE))
        head, _, body = data.partition(b"\r\n\r\n")
        assert json.loads(body)["error"]["code"] == "too_many_unauthenticated_from_address"
    finally:
        for sock in held:
            sock.close()

    served = functools.partial(_status_answered, limited.url, b"200")
    asyncio.run(eventually(lambda: _async(served), AssertionError, PATIENCE))


def _status_answered(url: str, status: bytes) -> bytes:
    """A whole status request on a fresh connection, its answer read to the close; it must
    have this HTTP ``status``."""
    with _raw(url) as sock:
        sock.sendall(b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data, _ = _read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 " + status), data[:80]
    return data


async def _async(call: Callable[[], bytes]) -> bytes:
    return await asyncio.get_running_loop().run_in_executor(None, call)
