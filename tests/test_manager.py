"""dcp-evaluator-manager as a real process: where it listens, what it refuses and why, what it
stops when a person comes back, and that the worker loses nothing."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import wasmtime

import dcp_protocol as p
from evaluator.client import Sandbox, SliceWork
from evaluator.launch import Hardening, _runnable_by_others, evaluator_command, probe_layers
from evaluator.manager import Access, Manager, bind_unix
from evaluator.manager.monitors import BusyPolicy, RateMonitor
from scheduler.client import ComputeClient
from scheduler.store.sqlite import SQLiteStore

from .conftest import Keystore, SchedulerProcess, WorkerProcess, command, wait_for
from .test_pipeline import PUZZLE, job_file


class ManagerProcess:
    def __init__(
        self,
        tmp: Path,
        *args: str,
        env: dict[str, str] | None = None,
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        self.status_file = tmp / f"manager-{time.monotonic_ns()}.json"
        self.log = self.status_file.with_suffix(".log")
        # Each its own socket (never the shared default), and a token file for TCP.
        self.token: bytes | None = None
        if "--max-load" not in args:  # the machine's own load must not hold the tests
            args = (*args, "--max-load", "1000")
        if "--socket" not in args:
            args = (*args, "--socket", str(self.status_file.with_suffix(".sock")))
        if "--listen" in args and "--token-file" not in args:
            token_file = self.status_file.with_suffix(".token")
            args = (*args, "--token-file", str(token_file))
            self.token_file = token_file
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [
                    command("dcp-evaluator-manager"),
                    "serve",
                    "-v",
                    "--status-file",
                    str(self.status_file),
                    "--run-on-battery",
                    *args,
                ],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=env,
                pass_fds=pass_fds,
            )
        assert self.proc.stdout is not None
        self.first_line = self.proc.stdout.readline()
        match = re.search(r"listening on (\S+?)[;,]", self.first_line)
        self.address = match.group(1) if match else ""
        if "--listen" in args:
            self.token_file = Path(args[args.index("--token-file") + 1])
            with contextlib.suppress(OSError):
                self.token = self.token_file.read_bytes().strip()

    def status(self) -> dict:  # type: ignore[type-arg]
        return json.loads(self.status_file.read_text())  # type: ignore[no-any-return]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(20)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


@pytest.fixture
def managers(tmp_path: Path) -> Iterator[Callable[..., ManagerProcess]]:
    started: list[ManagerProcess] = []

    def start(*args: str, **kwargs: object) -> ManagerProcess:
        m = ManagerProcess(tmp_path, *args, **kwargs)  # type: ignore[arg-type]
        started.append(m)
        return m

    yield start
    for m in started:
        m.stop()


def connect_and_describe(address: str, token: bytes | None = None) -> p.Message:
    """Open a connection as a worker would (sending ``token`` first, if any) and ask the
    evaluator to describe itself."""
    if address.startswith("/"):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(address)
    else:
        host, _, port = address.rpartition(":")
        sock = socket.create_connection((host, int(port)), timeout=10)
    sock.settimeout(20)
    with sock:
        preamble = b"" if token is None else b"dcp-token " + token + b"\n"
        sock.sendall(preamble + p.frame(p.Describe(id=1)))
        decoder = p.StreamDecoder(p.EVALUATOR_MESSAGES)
        while (message := decoder.next_message()) is None:
            data = sock.recv(65536)
            if not data:
                decoder.receive_eof()
                continue
            decoder.receive_data(data)
        return message


def test_binds_loopback_only_even_when_asked_for_all_interfaces(
    managers: Callable[..., ManagerProcess],
) -> None:
    manager = managers("--listen", "0.0.0.0:0", "--tty-idle", "0")
    assert manager.address.startswith("127.0.0.1:"), manager.first_line
    listening = [
        c.laddr
        for c in psutil.Process(manager.proc.pid).net_connections("inet")
        if c.status == psutil.CONN_LISTEN
    ]
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening)
    assert "refusing to listen on 0.0.0.0" in manager.log.read_text()
    reply = connect_and_describe(manager.address, manager.token)
    assert isinstance(reply, p.Capabilities) and "wasm" in reply.capabilities["runtimes"]


def test_unix_socket(managers: Callable[..., ManagerProcess], tmp_path: Path) -> None:
    path = tmp_path / "evaluator.sock"
    manager = managers("--no-tcp", "--socket", str(path), "--tty-idle", "0")
    assert manager.address == str(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o660
    assert isinstance(connect_and_describe(str(path)), p.Capabilities)


def _activated(sock: socket.socket, status: Path, token: Path) -> subprocess.Popen[str]:
    """Start the manager the way systemd would: the socket as fd 3, LISTEN_PID its own pid."""
    wrapper = (
        "import os, sys\n"
        "os.dup2(int(sys.argv[1]), 3)\n"
        "os.environ['LISTEN_PID'] = str(os.getpid()); os.environ['LISTEN_FDS'] = '1'\n"
        "os.execv(sys.argv[2], sys.argv[2:])\n"
    )
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            wrapper,
            str(sock.fileno()),
            command("dcp-evaluator-manager"),
            "serve",
            "--status-file",
            str(status),
            "--token-file",
            str(token),
            "--max-load",
            "1000",
            "--tty-idle",
            "0",
            "--run-on-battery",
        ],
        pass_fds=(sock.fileno(),),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_socket_activation(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        run = _activated(sock, tmp_path / "a.json", tmp_path / "token")
        try:
            assert f"127.0.0.1:{port}" in run.stdout.readline()  # type: ignore[union-attr]
            token = (tmp_path / "token").read_bytes().strip()
            assert isinstance(connect_and_describe(f"127.0.0.1:{port}", token), p.Capabilities)
        finally:
            run.terminate()
            run.communicate(timeout=20)


def test_socket_activation_refuses_a_public_socket(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        run = _activated(sock, tmp_path / "b.json", tmp_path / "token")
        out, err = run.communicate(timeout=20)
    assert run.returncode == 2 and "not loopback" in err


def test_high_load_refuses_new_evaluators_and_says_why(
    managers: Callable[..., ManagerProcess], tmp_path: Path
) -> None:
    loadavg = tmp_path / "loadavg"
    loadavg.write_text("7.50 3.00 1.00 2/300 12345\n")
    manager = managers(
        "--listen",
        "127.0.0.1:0",
        "--max-load",
        "2",
        "--poll",
        "0.1",
        "--loadavg-file",
        str(loadavg),
        "--tty-idle",
        "0",
    )
    reply = connect_and_describe(manager.address, manager.token)
    assert isinstance(reply, p.Error) and reply.code == "machine_busy"
    assert "load_high" in reply.message and "7.50" in reply.message
    status = subprocess.run(
        [command("dcp-evaluator-manager"), "status", "--status-file", str(manager.status_file)],
        capture_output=True,
        text=True,
    )
    assert status.returncode == 3
    assert "load_high: load average 7.50 is above 2 (refuses new evaluators)" in status.stdout
    loadavg.write_text("0.10 0.10 0.10 1/300 12345\n")
    wait_for(lambda: manager.status()["accepting"], 10)
    assert isinstance(connect_and_describe(manager.address, manager.token), p.Capabilities)
    assert manager.status()["refused"] == 1


def test_connection_rate(tmp_path: Path) -> None:
    """The rate limit counts connections by the manager's clock (here the test's own), not by
    how fast this machine happens to be."""
    now = [100.0]
    manager = Manager(
        BusyPolicy([]),
        rate=RateMonitor(2),
        command=evaluator_command(),
        access=Access(group=None),
        clock=lambda: now[0],
    )
    path = str(tmp_path / "m.sock")
    sock = bind_unix(path)
    ready = threading.Event()
    loops: list[asyncio.AbstractEventLoop] = []

    async def serve() -> None:
        loops.append(asyncio.get_running_loop())
        await manager.serve([sock], on_ready=ready.set)

    # asyncio.run ends every connection handler before it closes its loop.
    thread = threading.Thread(target=asyncio.run, args=(serve(),))
    thread.start()
    try:
        assert ready.wait(30)
        replies = [connect_and_describe(path) for _ in range(3)]  # all at the same instant
        assert [type(r).__name__ for r in replies[:2]] == ["Capabilities", "Capabilities"]
        assert isinstance(replies[2], p.Error) and "connection_rate" in replies[2].message
        now[0] += 1.5  # the window moved on
        assert isinstance(connect_and_describe(path), p.Capabilities)
    finally:
        if loops:
            loops[0].call_soon_threadsafe(manager.stop)
        thread.join(30)


def test_operator_signals(managers: Callable[..., ManagerProcess]) -> None:
    manager = managers("--listen", "127.0.0.1:0", "--tty-idle", "0")
    manager.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: not manager.status()["accepting"], 10)
    assert manager.status()["holds"][0]["reason"] == "operator"
    reply = connect_and_describe(manager.address, manager.token)
    assert isinstance(reply, p.Error) and "operator" in reply.message
    manager.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: manager.status()["accepting"], 10)


def _token_config(tmp_path: Path, token_file: Path) -> Path:
    config = tmp_path / "worker.toml"
    config.write_text(f'evaluator_token_file = "{token_file}"\n')
    return config


def test_terminal_use_stops_evaluators_and_the_worker_loses_nothing(
    tmp_path: Path,
    managers: Callable[..., ManagerProcess],
    scheduler: SchedulerProcess,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    tty = tmp_path / "pts0"
    tty.write_text("")
    long_ago = time.time() - 3600
    os.utime(tty, (long_ago, long_ago))
    manager = managers(
        "--listen",
        "127.0.0.1:0",
        "--tty-glob",
        str(tmp_path / "pts*"),
        "--tty-idle",
        "2",
        "--poll",
        "0.2",
    )
    worker = workers(
        scheduler.url,
        make_keystore("w"),
        2,
        "--evaluator",
        f"tcp://{manager.address}",
        "--config",
        str(_token_config(tmp_path, manager.token_file)),
    )
    prefixes = [f"t{i}" for i in range(6)]
    with ComputeClient(scheduler.url, make_keystore("owner").identity) as client:
        job = client.deploy(
            job_file(
                tmp_path, "puzzle", PUZZLE, prefixes, ["19"], "memory_bytes = 33554432", attempts=1
            )
        )
        wait_for(
            lambda: manager.status()["running"] >= 2 and "running slice" in worker.output(), 30
        )
        touched = time.time()
        os.utime(tty, (touched, touched))  # a person types
        wait_for(lambda: manager.status()["preempted"] >= 1, 5)
        assert time.time() - touched < 2  # within the poll interval, give or take a start
        assert manager.status()["holds"][0]["reason"] == "user_active"
        results = list(client.results(job, wait=True, timeout=120))
    # attempts=1: a preempted slice that had been charged an attempt would have failed.
    assert [r.state for r in results] == ["done"] * len(prefixes)
    log = worker.output()
    assert "work held by the evaluator manager" in log and "user_active" in log
    assert worker.stop() == 0
    store = SQLiteStore(scheduler.db)
    assert all(s.attempts == 1 for s in store.slices(job))
    store.close()


def test_hardening_layers() -> None:
    layers = probe_layers(Hardening())
    assert layers["no_new_privileges"] and layers["rlimits"]
    assert layers["network_namespace"], "this kernel should allow a network namespace"
    if os.geteuid() == 0 and _runnable_by_others():
        assert layers["unprivileged_user"]


@pytest.mark.skipif(
    os.geteuid() != 0 or not _runnable_by_others(),
    reason="needs root and an interpreter that other users can run "
    "(here Python lives under /root, mode 0700)",
)
def test_evaluators_run_as_nobody_when_started_as_root() -> None:
    assert probe_layers(Hardening(user="nobody"))["unprivileged_user"]


def test_a_manager_evaluator_is_reused_across_batches(
    managers: Callable[..., ManagerProcess], tmp_path: Path
) -> None:
    path = str(tmp_path / "m.sock")
    manager = managers("--no-tcp", "--socket", path, "--tty-idle", "0", "--ignore-screensaver")
    module = wasmtime.wat2wasm('(module (memory (export "memory") 1) (func (export "_start")))')
    job = p.JobSpec("nop", "wasm", module, hashlib.sha256(module).hexdigest())

    async def three_batches() -> None:
        sandbox = Sandbox(0, endpoint=path, slices_per_evaluator=10)
        await sandbox.describe()
        for batch in range(3):
            outcomes = await sandbox.run_batch(
                job, job.limits, [SliceWork(batch, b""), SliceWork(batch + 3, b"")]
            )
            assert all(not isinstance(o, BaseException) for o in outcomes), outcomes
        await sandbox.stop()

    asyncio.run(three_batches())
    wait_for(lambda: manager.status()["running"] == 0, 10)
    assert manager.status()["started"] == 1  # one connection, one evaluator, for all of it
