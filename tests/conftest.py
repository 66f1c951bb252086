"""Shared fixtures: keystores, and real scheduler / worker processes on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
import websockets
from websockets.asyncio.server import ServerConnection

import dcp_protocol as p
from dcp_keys.identity import Identity, create_keystore
from scheduler.local import LocalScheduler
from tests import postgres

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
BIN = Path(sys.executable).parent
PASSPHRASE = b"test passphrase"

# Workers started by the tests see no configuration of the machine they run on: no
# /etc/dcp-worker layer, no user file, no DCP_WORKER_* variables.
os.environ["DCP_WORKER_SYSTEM_CONFIG"] = ""
os.environ["XDG_CONFIG_HOME"] = str(ROOT / ".no-user-config")
for _name in [
    n for n in os.environ if n.startswith("DCP_WORKER_") and n != "DCP_WORKER_SYSTEM_CONFIG"
]:
    del os.environ[_name]


def command(name: str) -> str:
    return str(BIN / name)


@dataclass
class Keystore:
    path: Path
    passphrase_file: Path
    identity: Identity


@pytest.fixture
def make_keystore(tmp_path: Path) -> Callable[[str], Keystore]:
    def make(name: str) -> Keystore:
        path = tmp_path / f"{name}.json"
        pw = tmp_path / f"{name}.pass"
        pw.write_bytes(PASSPHRASE + b"\n")
        # A low scrypt cost keeps tests fast; the format is the same.
        identity = create_keystore(path, PASSPHRASE, iterations=1024)
        return Keystore(path, pw, identity)

    return make


T = TypeVar("T")


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, interval: float = 0.02) -> None:
    """Poll ``predicate`` until it holds; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


async def wait_until(
    predicate: Callable[[], bool], timeout: float = 30.0, interval: float = 0.02
) -> None:
    """:func:`wait_for` inside an event loop: the loop runs while ``predicate`` is polled."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


async def eventually(
    attempt: Callable[[], Awaitable[T]],
    failure: type[BaseException] | tuple[type[BaseException], ...],
    timeout: float = 30.0,
    interval: float = 0.02,
) -> T:
    """What ``attempt`` returns once it no longer raises ``failure`` (the condition waited
    for is that it succeeds); fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await attempt()
        except failure:
            if time.monotonic() > deadline:
                raise AssertionError(f"still failing after {timeout} s") from None
        await asyncio.sleep(interval)


async def answer_empty(ws: ServerConnection, fetch: p.Fetch) -> None:
    """Answer ``fetch`` as a scheduler without work does: a long poll, held until its
    ``wait_seconds`` are over, and never answered if the session closes first."""
    try:
        await asyncio.wait_for(ws.wait_closed(), fetch.wait_seconds)
    except TimeoutError:
        with contextlib.suppress(websockets.ConnectionClosed):
            await ws.send(p.encode(p.Work(re=fetch.id)).decode())


#: The store backends the parametrized suites run on.
BACKENDS = ("sqlite", "postgres")


def postgres_server() -> postgres.Server:
    """The tests' PostgreSQL server; the test skips (or fails, under DCP_REQUIRE_POSTGRES=1,
    as in CI) where none can be had, with the reason."""
    server = postgres.server()
    if server is None:
        reason = postgres.UNAVAILABLE or "no PostgreSQL server"
        if postgres.required():
            pytest.fail(f"DCP_REQUIRE_POSTGRES is set: {reason}")
        pytest.skip(reason)
    return server


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db(backend: str, tmp_path: Path) -> str:
    """A new, empty database of ``backend``: what ``--db`` takes (a SQLite path or a
    PostgreSQL URL)."""
    if backend == "sqlite":
        return str(tmp_path / "scheduler.db")
    return postgres_server().create_database()


@pytest.fixture
def pg_db() -> str:
    """A new, empty PostgreSQL database's URL, for the tests of PostgreSQL alone."""
    return postgres_server().create_database()


class SchedulerProcess(LocalScheduler):
    """A scheduler on loopback whose verbose log sits beside its database (a SQLite file), or
    in ``log`` (needed for a PostgreSQL URL, whose console token then sits beside it)."""

    def __init__(
        self, db: Path | str, *extra: str, listen: str = "127.0.0.1:0", log: Path | None = None
    ) -> None:
        if log is None:
            assert not str(db).startswith("postgresql"), "a PostgreSQL scheduler needs a log"
            log = Path(db).with_suffix(".log")
        super().__init__(db, *extra, listen=listen, log=log)


#: The options of the ``scheduler`` fixtures: quick leases and heartbeats, a short verifier.
QUICK = ("--lease-timeout", "5", "--heartbeat-interval", "0.5", "--verifier-wall-seconds", "1")


@pytest.fixture
def scheduler(tmp_path: Path) -> Iterator[SchedulerProcess]:
    """A scheduler on SQLite. A module whose tests must hold on both backends overrides it
    with a ``scheduler`` fixture that returns ``scheduler_on_every_backend``."""
    proc = SchedulerProcess(tmp_path / "scheduler.db", *QUICK)
    yield proc
    proc.stop()


@pytest.fixture
def scheduler_on_every_backend(db: str, tmp_path: Path) -> Iterator[SchedulerProcess]:
    """The ``scheduler`` fixture, once per backend (``db``)."""
    proc = SchedulerProcess(db, *QUICK, log=tmp_path / "scheduler.log")
    yield proc
    proc.stop()


class WorkerProcess:
    def __init__(
        self,
        url: str,
        keystore: Keystore,
        state_dir: Path,
        sandboxes: int = 2,
        *extra: str,
        log_dir: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.log = (log_dir or state_dir.parent) / f"worker-{os.getpid()}-{time.monotonic_ns()}.log"
        self.log_file = open(self.log, "w")
        self.proc = subprocess.Popen(
            [
                command("dcp-worker"),
                "-vv",
                "-o",
                "console",
                "--scheduler",
                url,
                "--identity",
                str(keystore.path),
                "--passphrase-file",
                str(keystore.passphrase_file),
                "--sandboxes",
                str(sandboxes),
                "--state-dir",
                str(state_dir),
                *extra,
            ],
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    def output(self) -> str:
        if not self.log_file.closed:
            self.log_file.flush()
        return self.log.read_text()

    def stop(self, sig: int = signal.SIGINT, timeout: float = 40) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()
        return self.proc.returncode


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(
        url: str,
        keystore: Keystore,
        sandboxes: int = 2,
        *extra: str,
        state_dir: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> WorkerProcess:
        w = WorkerProcess(
            url,
            keystore,
            state_dir or tmp_path / "worker-state",
            sandboxes,
            *extra,
            log_dir=tmp_path,
            env=env,
        )
        started.append(w)
        return w

    yield start
    for w in started:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait()
        w.log_file.close()


@pytest.fixture(scope="session")
def zig_build(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Path], bytes]:
    """Compile a C file to wasm32-wasi with zig cc (ziglang from PyPI), as examples/build.sh."""
    out_dir = tmp_path_factory.mktemp("wasm")

    def build(source: Path) -> bytes:
        out = out_dir / (source.stem + ".wasm")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "ziglang",
                "cc",
                "-target",
                "wasm32-wasi",
                "-O2",
                "-s",
                "-o",
                str(out),
                str(source),
            ],
            check=True,
            timeout=600,
        )
        return out.read_bytes()

    return build
