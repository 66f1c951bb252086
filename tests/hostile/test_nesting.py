"""Deeply nested JSON (and TOML) from every untrusted source: refused with the channel's error
before any decoder recurses, and the process that got it keeps serving.

A frame of 200,000 nested arrays is 400 KB, well under every size limit. Decoded as it is, it
overflows the C stack when the recursion limit has been raised (a worker once died by SIGSEGV
on it as the first frame of a session), and raises RecursionError past the handlers when not.
"""

from __future__ import annotations

import asyncio
import http
import http.server
import json
import os
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import websockets
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response

import dcp_protocol as p
from dcp_worker.config import ConfigError, load_config
from scheduler.client import ComputeClient, ComputeError
from scheduler.jobdoc import JobFileError, load_job_file

from ..conftest import (
    Keystore,
    SchedulerProcess,
    WorkerProcess,
    answer_empty,
    command,
    wait_for,
)
from ..test_scheduler_session import _open, _recv

LEVELS = 200_000
DEEP = "[" * LEVELS + "]" * LEVELS


class NestingScheduler:
    """A websocket server on loopback that sends the deep frame: as the very first frame of
    every connection (``first``), or right after a normal handshake (``session``); in every
    mode (``balance``: only there) its account readings answer a deep body."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.connections = 0
        self.balance_reads = 0
        self.after_deep: list[p.Message] = []  # what the worker sent after the deep frame
        self.ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._main(),))
        self._thread.start()
        assert self.ready.wait(10)
        self.url = f"http://127.0.0.1:{self.port}"

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with serve(
            self._session,
            "127.0.0.1",
            0,
            compression=None,
            max_size=None,
            process_request=self._http,
        ) as server:
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self.ready.set()
            await self._stop.wait()

    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        """The compute API's account reading (the worker's lifetime earnings): deep too."""
        if not request.path.startswith("/api/v1/accounts/"):
            return None
        self.balance_reads += 1
        # 20,000 levels: 40 KB, under the reader's size bound, far past the recursion limit.
        deep = "[" * 20_000 + "]" * 20_000
        return connection.respond(http.HTTPStatus.OK, '{"balance": ' + deep + "}")

    async def _session(self, ws: ServerConnection) -> None:
        self.connections += 1
        polls: list[asyncio.Task[None]] = []
        try:
            if self.mode == "first":
                await ws.send(DEEP)
                async for _ in ws:
                    pass
                return
            await ws.send(p.encode(p.Hello(protocol=1, challenge="ab" * 32, server="n")).decode())
            auth = p.decode(await ws.recv(), p.SCHEDULER_MESSAGES)
            assert isinstance(auth, p.Auth)
            welcome = p.Welcome(
                re=auth.id,
                session="s",
                address=auth.address,
                heartbeat_interval=1,
                lease_timeout=30,
                max_result_bytes=1 << 20,
            )
            await ws.send(p.encode(welcome).decode())
            if self.mode == "session":
                await ws.send(DEEP)
            async for frame in ws:
                message = p.decode(frame, p.SCHEDULER_MESSAGES)
                self.after_deep.append(message)
                if isinstance(message, p.Fetch):  # no work: a long poll
                    polls.append(asyncio.create_task(answer_empty(ws, message)))
                elif isinstance(message, p.Heartbeat):
                    await ws.send(p.encode(p.HeartbeatAck(re=message.id, deadline=1e12)).decode())
        except websockets.ConnectionClosed:
            pass
        finally:
            for poll in polls:
                poll.cancel()

    def close(self) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture
def nesting_scheduler() -> Iterator[Callable[[str], NestingScheduler]]:
    started: list[NestingScheduler] = []

    def start(mode: str) -> NestingScheduler:
        started.append(NestingScheduler(mode))
        return started[-1]

    yield start
    for server in started:
        server.close()


def test_worker_survives_a_deep_first_frame_and_reconnects(
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
    nesting_scheduler: Callable[[str], NestingScheduler],
) -> None:
    fake = nesting_scheduler("first")
    worker = workers(fake.url, make_keystore("w"), 1)
    wait_for(lambda: fake.connections >= 2 or worker.proc.poll() is not None, 60)
    assert worker.proc.poll() is None, f"the worker died: {worker.proc.returncode}"
    assert worker.stop() == 0
    assert "nests deeper than 64 levels" in worker.output()


def test_worker_survives_a_deep_account_reply(
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
    nesting_scheduler: Callable[[str], NestingScheduler],
) -> None:
    """The worker reads its lifetime earnings over HTTP on connect: a deep reply raised
    RecursionError out of that reader and ended the worker with a traceback."""
    fake = nesting_scheduler("balance")
    worker = workers(fake.url, make_keystore("w"), 1)
    wait_for(
        lambda: "lifetime earnings unknown" in worker.output() or worker.proc.poll() is not None,
        60,
    )
    assert worker.proc.poll() is None, f"the worker died: {worker.proc.returncode}"
    assert fake.balance_reads >= 1
    assert "nests deeper than 64 levels" in worker.output()
    assert worker.stop() == 0


def _control_lines(sock: Path, data: bytes, n: int) -> list[dict[str, object]]:
    directory = os.open(sock.parent, os.O_PATH)  # the state path may exceed sun_path
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(f"/proc/self/fd/{directory}/{sock.name}")
            s.sendall(data)
            received = b""
            while received.count(b"\n") < n:
                chunk = s.recv(65536)
                assert chunk, "the control socket closed early"
                received += chunk
    finally:
        os.close(directory)
    return [json.loads(line) for line in received.split(b"\n")[:n]]


def test_worker_survives_a_deep_frame_in_session_and_on_its_control_socket(
    tmp_path: Path,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
    nesting_scheduler: Callable[[str], NestingScheduler],
) -> None:
    fake = nesting_scheduler("session")
    state = tmp_path / "state"
    worker = workers(fake.url, make_keystore("w"), 1, state_dir=state)
    # The worker refuses the frame, ends that session (a request could be waiting for the
    # reply it cannot read) and comes back on a new one.
    wait_for(lambda: fake.connections >= 2 or worker.proc.poll() is not None, 60)
    assert worker.proc.poll() is None, f"the worker died: {worker.proc.returncode}"
    assert "scheduler sent a bad frame" in worker.output()

    sock = state / "control.sock"
    wait_for(sock.exists, 30)
    deep_line = ('{"cmd": ' + DEEP + "}\n").encode()
    refused, status = _control_lines(sock, deep_line + b'{"cmd": "status"}\n', 2)
    assert refused["ok"] is False and "nests deeper than 64 levels" in str(refused["error"])
    assert status["ok"] is True
    assert worker.proc.poll() is None
    assert worker.stop() == 0
    assert fake.connections >= 2  # it reconnected after each bad frame


def test_scheduler_answers_deep_frames_with_malformed_frame_and_keeps_serving(
    scheduler: SchedulerProcess, make_keystore: Callable[[str], Keystore]
) -> None:
    keystore = make_keystore("worker")

    async def main() -> None:
        async with connect(scheduler.ws_url, compression=None, max_size=None) as ws:
            assert isinstance(await _recv(ws), p.Hello)
            await ws.send(DEEP)  # before auth
            reply = await _recv(ws)
            assert isinstance(reply, p.Error), reply
            assert (reply.re, reply.code) == (None, "malformed_frame")
            assert "nests deeper than 64 levels" in reply.message
        ws = await _open(scheduler.ws_url, keystore)
        await ws.send('{"v": 1, "type": "fetch", "id": 5, "x": ' + DEEP + "}")  # in session
        reply = await _recv(ws)
        assert isinstance(reply, p.Error) and reply.code == "malformed_frame"
        await ws.send(p.encode(p.Fetch(id=6, max_slices=1)).decode())
        reply = await _recv(ws)
        assert isinstance(reply, p.Work) and reply.re == 6
        await ws.close()

    asyncio.run(main())
    assert scheduler.proc.poll() is None


def test_compute_api_answers_a_deep_body_with_400_and_keeps_serving(
    scheduler: SchedulerProcess, make_keystore: Callable[[str], Keystore]
) -> None:
    owner = make_keystore("owner").identity
    body = ('{"name": ' + DEEP + "}").encode()
    with ComputeClient(scheduler.url, owner) as client, pytest.raises(ComputeError) as info:
        client.deploy_document(body)
    assert (info.value.status, info.value.code) == (400, "invalid_job")
    assert "nests deeper than" in str(info.value)
    assert httpx.get(scheduler.url + "/api/v1/status", timeout=30).status_code == 200


class _DeepHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        body = ('{"jobs": ' + DEEP + "}").encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_compute_client_refuses_a_deep_reply() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _DeepHandler)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        with ComputeClient(f"http://127.0.0.1:{server.server_address[1]}") as client:
            with pytest.raises(ComputeError, match="nests deeper than 64 levels"):
                client.status("a" * 32)
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()


@pytest.mark.parametrize(
    "text",
    [
        "sandboxes = " + "[" * 5000 + "]" * 5000 + "\n",
        "sandboxes = " + "{a = " * 5000 + "1" + "}" * 5000 + "\n",
        # Dotted keys nest tables without a bracket: 30,000 parts (90 KB) took tomllib past
        # 3 GB of memory.
        "a" + ".a" * 30_000 + " = 1\n",
        "[" + "a." * 30_000 + "a]\n",
        '"a".' * 10_000 + "b = 1\n",
    ],
    ids=["arrays", "inline-tables", "dotted-key", "dotted-header", "quoted-dotted-key"],
)
def test_config_files_nested_too_deep_are_named(tmp_path: Path, text: str) -> None:
    path = tmp_path / "w.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"w\.toml: nests deeper than 64 levels"):
        load_config(path, {})
    out = subprocess.run(
        [command("dcp-worker"), "--config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2, out.stderr
    assert "nests deeper than 64 levels" in out.stderr and "Traceback" not in out.stderr
    # The scheduler's --config and the evaluator manager's status file, likewise.
    out = subprocess.run(
        [command("dcp-scheduler"), "--config", str(path), "db", "status"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stderr
    assert "nests deeper than 64 levels" in out.stderr and "Traceback" not in out.stderr


def test_an_evaluator_manager_status_file_nested_too_deep_is_no_status(tmp_path: Path) -> None:
    status = tmp_path / "status.json"
    status.write_text('{"accepting": ' + DEEP + "}")
    out = subprocess.run(
        [command("dcp-evaluator-manager"), "status", "--status-file", str(status)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 4 and "no manager status" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "deep",
    ["argv = " + "[" * 5000 + "]" * 5000, "x" + ".x" * 30_000 + " = 1"],
    ids=["arrays", "dotted"],
)
def test_job_files_nested_too_deep_are_named(tmp_path: Path, deep: str) -> None:
    (tmp_path / "m.wasm").write_bytes(b"\0asm\1\0\0\0")
    path = tmp_path / "job.toml"
    path.write_text('module = "m.wasm"\n' + deep + "\n")
    with pytest.raises(JobFileError, match=r"job\.toml: nests deeper than 32 levels"):
        load_job_file(path)


def test_keystores_nested_too_deep_are_named(tmp_path: Path) -> None:
    path = tmp_path / "deep.json"
    path.write_text('{"version": 3, "crypto": ' + DEEP + "}")
    out = subprocess.run(
        [command("dcp-wallet"), "show", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2, out.stderr
    assert "nests deeper than 64 levels" in out.stderr and "Traceback" not in out.stderr
