"""Who may use dcp-evaluator-manager: Unix peers by credentials (root, its user, its group),
TCP clients by a secret token; and no OpenCL from evaluators that would run it as root."""

from __future__ import annotations

import hashlib
import json
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import dcp_protocol as p
from evaluator.launch import Hardening
from scheduler.client import ComputeClient

from .conftest import Keystore, SchedulerProcess, WorkerProcess, command, wait_for
from .test_manager import ManagerProcess, connect_and_describe, managers  # noqa: F401
from .test_opencl import OPENCL
from .test_pipeline import counts

NOBODY = 65534

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to setuid to nobody")


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory other users can reach (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="dcp-access-"))
    path.chmod(0o755)
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


def describe_as_nobody(path: str, gid: int = NOBODY) -> str:
    """Connect to ``path`` from a forked child running as uid 65534: the reply's type and
    code, or the error connecting."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        outcome = "?"
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(NOBODY)
            reply = connect_and_describe(path)
            outcome = f"{reply.type} {getattr(reply, 'code', '')}".strip()
        except OSError as exc:
            outcome = type(exc).__name__
        finally:
            os.write(write, outcome.encode())
            os._exit(0)
    os.close(write)
    try:
        ready, _, _ = select.select([read], [], [], 30)
        assert ready, "the child did not answer within 30 s"
        return os.read(read, 1000).decode()
    finally:
        os.close(read)
        os.waitpid(pid, 0)


@needs_root
def test_unix_socket_refuses_other_users_by_mode_and_by_credentials(
    managers: Callable[..., ManagerProcess],  # noqa: F811
    open_dir: Path,
) -> None:
    path = str(open_dir / "m.sock")
    manager = managers("--socket", path, "--group", "", "--tty-idle", "0")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    assert describe_as_nobody(path) == "PermissionError"  # the mode keeps it out
    os.chmod(path, 0o666)  # an operator loosens the mode: the credentials still count
    assert describe_as_nobody(path) == "error peer_not_allowed"
    wait_for(lambda: manager.status()["unauthorized"] == 1, 10)
    assert "uid 65534" in manager.log.read_text()
    assert isinstance(connect_and_describe(path), p.Capabilities)  # root may


@needs_root
def test_unix_socket_admits_members_of_its_group(
    managers: Callable[..., ManagerProcess],  # noqa: F811
    open_dir: Path,
) -> None:
    path = str(open_dir / "m.sock")
    managers("--socket", path, "--group", "nogroup", "--tty-idle", "0")
    assert os.stat(path).st_gid == NOBODY  # nogroup
    assert describe_as_nobody(path, gid=NOBODY) == "capabilities"


def test_tcp_needs_the_secret(
    managers: Callable[..., ManagerProcess],  # noqa: F811
) -> None:
    manager = managers("--listen", "127.0.0.1:0", "--tty-idle", "0")
    assert manager.address.startswith("127.0.0.1:"), manager.first_line
    assert stat.S_IMODE(manager.token_file.stat().st_mode) == 0o640
    assert manager.token is not None and len(manager.token) >= 32
    reply = connect_and_describe(manager.address)
    assert isinstance(reply, p.Error) and reply.code == "token_required"
    reply = connect_and_describe(manager.address, b"0" * len(manager.token))
    assert isinstance(reply, p.Error) and reply.code == "token_invalid"
    assert isinstance(connect_and_describe(manager.address, manager.token), p.Capabilities)
    status = manager.status()
    assert status["started"] == 1
    wait_for(lambda: manager.status()["unauthorized"] == 2, 10)


def test_tcp_without_a_private_token_file_does_not_start(tmp_path: Path) -> None:
    def serve(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [command("dcp-evaluator-manager"), "serve", "--socket", str(tmp_path / "s"), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    out = serve("--listen", "127.0.0.1:0")
    assert out.returncode == 2 and "--listen needs --token-file" in out.stderr
    token = tmp_path / "token"
    token.write_text("a" * 40)
    token.chmod(0o644)
    out = serve("--listen", "127.0.0.1:0", "--token-file", str(token))
    assert out.returncode == 2 and "open to other users" in out.stderr


@pytest.mark.skipif(
    os.geteuid() != 0 or Hardening().target_ids() is not None,
    reason="needs evaluators that would run as root (root, and no account they can drop to)",
)
def test_a_root_manager_offers_no_opencl_unless_told(
    managers: Callable[..., ManagerProcess],  # noqa: F811
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "m.sock")
    manager = managers("--socket", path, "--tty-idle", "0")
    reply = connect_and_describe(path)
    assert isinstance(reply, p.Capabilities)
    assert "opencl" not in reply.capabilities["runtimes"]
    assert "as root" in reply.capabilities["withheld"]["opencl"]
    assert "OpenCL is not offered" in manager.log.read_text()
    # Asking for it anyway is refused by the evaluator itself.
    source = b"__kernel void k(__global float *x) { x[0] = 1; }"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(path)
        sock.settimeout(20)
        sha = hashlib.sha256(source).hexdigest()
        sock.sendall(p.frame(p.Assign(id=1, job="j", runtime="opencl", sha256=sha, module=source)))
        decoder = p.StreamDecoder(p.EVALUATOR_MESSAGES)
        while (message := decoder.next_message()) is None:
            decoder.receive_data(sock.recv(65536))
    assert isinstance(message, p.Error) and message.code == "unsupported_runtime"
    opted = managers("--socket", str(tmp_path / "n.sock"), "--opencl-as-root", "--tty-idle", "0")
    reply = connect_and_describe(str(tmp_path / "n.sock"))
    assert isinstance(reply, p.Capabilities) and "withheld" not in reply.capabilities
    assert "OpenCL is not offered" not in opted.log.read_text()


def test_a_worker_behind_a_manager_keeps_its_own_opencl_rule(
    managers: Callable[..., ManagerProcess],  # noqa: F811
    tmp_path: Path,
    scheduler: SchedulerProcess,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    """A manager told --opencl-as-root offers OpenCL from root evaluators; a worker whose own
    configuration does not allow that still offers only wasm, and runs no kernel."""
    if os.geteuid() != 0 or Hardening().target_ids() is not None:
        pytest.skip("needs evaluators that run as root (no account to drop to)")
    path = str(tmp_path / "m.sock")
    managers("--socket", path, "--opencl-as-root", "--tty-idle", "0")
    reply = connect_and_describe(path)
    assert isinstance(reply, p.Capabilities) and "opencl" in reply.capabilities["runtimes"]
    assert reply.capabilities["uid"] == 0
    worker = workers(scheduler.url, make_keystore("w"), 1, "--evaluator", path)
    with ComputeClient(scheduler.url, make_keystore("owner").identity) as client:
        job = client.deploy(OPENCL / "matmul.toml")
        wait_for(lambda: "OpenCL is not offered" in worker.output(), 30)
        wait_for(lambda: "requirement_unmet" in worker.output(), 30)
        assert counts(scheduler.db, job) == {"queued": 4}
    assert worker.stop() == 0
    assert "running slice" not in worker.output()


def test_the_status_file_is_never_written_through_a_planted_link(
    managers: Callable[..., ManagerProcess],  # noqa: F811
    tmp_path: Path,
) -> None:
    """The default status file lives in /tmp: a temporary file beside it with a fixed name
    could be another user's symlink to a file of root's."""
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    victim = tmp_path / "victim"
    victim.write_text("root's own file\n")
    status = shared / "manager.json"
    for name in ("manager.tmp", "manager.json.tmp", ".manager.json.tmp"):
        (shared / name).symlink_to(victim)
    manager = managers(
        "--socket", str(tmp_path / "m.sock"), "--status-file", str(status), "--tty-idle", "0"
    )
    wait_for(lambda: status.exists() and not status.is_symlink(), 30)
    assert victim.read_text() == "root's own file\n"
    assert stat.S_IMODE(status.stat().st_mode) == 0o644
    assert json.loads(status.read_text())["pid"] == manager.proc.pid


def test_the_worker_refuses_a_socket_served_by_another_user(tmp_path: Path) -> None:
    """A worker reaching evaluators by a path (a default in /tmp, say) checks who serves it:
    another user's fake manager would see every slice and could answer anything."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to serve the socket as another user")
    import asyncio

    from evaluator.client import Sandbox, SliceFailure

    shared = Path(tempfile.mkdtemp())  # pytest's own directories are root's alone
    shared.chmod(0o1777)
    path = shared / "fake-manager.sock"
    ready_r, ready_w = os.pipe()
    pid = os.fork()  # the interpreter lives under /root: nobody could not exec it again
    if pid == 0:
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            listener = socket.socket(socket.AF_UNIX)
            listener.bind(str(path))
            listener.listen()
            os.chmod(path, 0o666)
            os.write(ready_w, b"1")
            while True:
                listener.accept()[0].recv(1)
        finally:
            os._exit(1)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"1"

        async def describe() -> str:
            sandbox = Sandbox(0, None, 10, endpoint=str(path))
            try:
                await sandbox.describe()
            except SliceFailure as exc:
                return exc.message
            finally:
                await sandbox.stop()
            return "described"

        message = asyncio.run(describe())
    finally:
        os.close(ready_r)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        shutil.rmtree(shared, ignore_errors=True)
    assert f"is served by uid {NOBODY}" in message
