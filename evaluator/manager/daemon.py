"""``dcp-evaluator-manager``: starts one evaluator per connection, like inetd, and stops or
refuses them when the machine is busy.

It listens only on a Unix socket and/or loopback TCP (a non-loopback address in the
configuration is replaced by 127.0.0.1, with a warning; a systemd-activated socket that is not
loopback or Unix is refused), and checks who connects (:class:`Access`): on a Unix socket the
peer's credentials (root, the manager's own user, or the group, ``dcp`` by default), on TCP a
secret the client sends first (``dcp-token <token>\n``, the token file's content). A refused
connection gets an ``error`` frame naming why (``peer_not_allowed``, ``token_required``,
``token_invalid``). Each connection gets a fresh, hardened evaluator process whose
stdin/stdout are piped to the connection. While a monitor holds (see :mod:`.monitors`)
new connections get an ``error`` frame ``machine_busy`` naming the reason, and, for the holds
that say so, running evaluators are stopped (TERM, then KILL after a grace) and their
connections get ``evaluator_preempted`` at the next frame boundary: the worker returns the slice
and loses nothing. The state, with its reasons, is written to a status file that
``dcp-evaluator-manager status`` reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import grp
import hmac
import ipaddress
import json
import logging
import os
import pwd
import secrets
import signal
import socket
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dcp_protocol import DcpError, Error, ErrorCode, frame

from ..launch import Hardening, evaluator_command
from .monitors import BusyPolicy, Hold, OperatorMonitor, RateMonitor

__all__ = [
    "Access",
    "Manager",
    "ManagerError",
    "activated_sockets",
    "bind_tcp",
    "bind_unix",
    "read_token",
    "opencl_withheld",
]

log = logging.getLogger("dcp.evaluator.manager")

MACHINE_BUSY = ErrorCode.MACHINE_BUSY.value
PREEMPTED = ErrorCode.EVALUATOR_PREEMPTED.value
_GRACE = 2.0
_REFUSE_LINGER = 5.0
PEER_NOT_ALLOWED = ErrorCode.PEER_NOT_ALLOWED.value
TOKEN_REQUIRED = ErrorCode.TOKEN_REQUIRED.value
TOKEN_INVALID = ErrorCode.TOKEN_INVALID.value
#: What a TCP client sends first: this, the token, a newline.
TOKEN_PREFIX = b"dcp-token "
_TOKEN_SECONDS = 10.0
_TOKEN_MAX = 256
_TOKEN_MIN = 16


class ManagerError(DcpError):
    """The manager cannot start (an address it must not bind, a socket it cannot create)."""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_tcp(listen: str) -> socket.socket:
    """A listening TCP socket on loopback. ``HOST:PORT``; a HOST that is not loopback is
    replaced by 127.0.0.1 (DCP bound every interface when told "localhost": never again)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ManagerError(f"--listen {listen!r}: expected HOST:PORT")
    host = host.strip("[]") or "127.0.0.1"
    if not _is_loopback(host):
        log.warning(
            "refusing to listen on %s: an evaluator manager binds loopback only; "
            "listening on 127.0.0.1",
            host,
        )
        host = "127.0.0.1"
    if host == "localhost":
        host = "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, int(port)))
    except OSError as exc:
        sock.close()
        raise ManagerError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)
    return sock


def bind_unix(path: str, group: str | None = None) -> socket.socket:
    """A listening Unix socket at ``path``, mode 0660, owned by ``group`` when that group
    exists (a stale socket file is replaced)."""
    target = Path(path)
    if target.is_socket():
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(path)
            except OSError:
                target.unlink()  # stale: nobody listens there
            else:
                raise ManagerError(f"{path}: another process listens on this socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o660)
        gid = _group_id(group)
        if gid is not None:
            os.chown(path, -1, gid)
    except OSError as exc:
        sock.close()
        raise ManagerError(f"cannot create the socket {path}: {exc.strerror}") from None
    sock.listen(128)
    return sock


def _group_id(group: str | None) -> int | None:
    if not group:
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        return None


def read_token(path: Path, group: str | None = None) -> bytes:
    """The TCP secret in ``path``; a missing file is created with a random one (mode 0640,
    group ``group`` when it exists, so the workers of that group can read it).

    Raises:
        ManagerError: the file is readable or writable by others, unreadable, or too short.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ManagerError(f"cannot create the token file {path}: {exc.strerror}") from None
    else:
        with os.fdopen(fd, "w") as out:
            os.fchmod(out.fileno(), 0o640)  # whatever the umask: its group's workers read it
            out.write(secrets.token_hex(32) + "\n")
        gid = _group_id(group)
        if gid is not None:
            os.chown(path, -1, gid)
        log.warning("created the token file %s: TCP clients must send its content", path)
    try:
        mode = os.stat(path).st_mode
        token = path.read_bytes().strip()
    except OSError as exc:
        raise ManagerError(f"cannot read the token file {path}: {exc.strerror}") from None
    if mode & 0o007:
        raise ManagerError(
            f"the token file {path} is open to other users (mode {mode & 0o777:o}); "
            "it must be readable only by its owner and group (chmod 0640)"
        )
    if not _TOKEN_MIN <= len(token) <= _TOKEN_MAX:
        raise ManagerError(
            f"the token in {path} must be {_TOKEN_MIN} to {_TOKEN_MAX} characters long"
        )
    return token


def opencl_withheld(hardening: Hardening, opencl_as_root: bool) -> str | None:
    """Why evaluators of this manager must not offer OpenCL, or None: a kernel is native code
    in the evaluator process, so not as root (unless the operator says so)."""
    if opencl_as_root or os.geteuid() != 0 or hardening.target_ids() is not None:
        return None
    return (
        "evaluators would run OpenCL kernels as root (no unprivileged account to drop to); "
        "dcp-evaluator-manager --opencl-as-root overrides"
    )


@dataclass(frozen=True)
class Access:
    """Who may connect. Unix socket: root, the manager's user and members of ``group``
    (SO_PEERCRED; a group that does not exist admits nobody else). TCP: whoever sends
    ``token`` first; None refuses every TCP client."""

    group: str | None = "dcp"
    token: bytes | None = None

    def peer_refusal(self, sock: socket.socket) -> str | None:
        """Why the Unix peer on ``sock`` may not connect, or None."""
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", creds)
        if uid in (0, os.getuid()):
            return None
        allowed = _group_id(self.group)
        if allowed is not None:
            if gid == allowed:
                return None
            with contextlib.suppress(KeyError):
                if pwd.getpwuid(uid).pw_name in grp.getgrgid(allowed).gr_mem:
                    return None
        return (
            f"uid {uid} (pid {pid}) is not root, the manager's user or a member of group "
            f"{self.group or '(none)'}"
        )

    async def token_refusal(self, reader: asyncio.StreamReader) -> tuple[str, str] | None:
        """Read the client's token line; (code, why) when it is missing or wrong."""
        if self.token is None:
            return TOKEN_REQUIRED, "this manager has no token for TCP clients"
        try:
            async with asyncio.timeout(_TOKEN_SECONDS):
                prefix = await reader.readexactly(len(TOKEN_PREFIX))
                if prefix != TOKEN_PREFIX:
                    return TOKEN_REQUIRED, "a TCP client must send 'dcp-token <token>' first"
                line = b""
                while not line.endswith(b"\n"):
                    line += await reader.readexactly(1)
                    if len(line) > _TOKEN_MAX + 1:
                        return TOKEN_INVALID, "the token is wrong"
        except (TimeoutError, asyncio.IncompleteReadError):
            return TOKEN_REQUIRED, "a TCP client must send 'dcp-token <token>' first"
        if not hmac.compare_digest(line.strip(), self.token):
            return TOKEN_INVALID, "the token is wrong"
        return None


def activated_sockets() -> list[socket.socket]:
    """Sockets passed by systemd socket activation (LISTEN_FDS), each checked to be loopback
    or Unix.

    Raises:
        ManagerError: a passed socket listens elsewhere.
    """
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = int(os.environ.get("LISTEN_FDS", "0"))
    sockets = []
    for fd in range(3, 3 + count):
        sock = socket.socket(fileno=fd)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            host = sock.getsockname()[0]
            if not _is_loopback(host):
                raise ManagerError(f"the activated socket on {host} is not loopback; refusing it")
        sockets.append(sock)
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    return sockets


class _FrameBoundary:
    """Follows length-prefixed frames in a byte stream, to know when a frame may be injected."""

    def __init__(self) -> None:
        self._header = b""
        self._remaining = 0

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._remaining:
                step = min(self._remaining, len(view))
                self._remaining -= step
                view = view[step:]
                continue
            need = 4 - len(self._header)
            self._header += bytes(view[:need])
            view = view[need:]
            if len(self._header) == 4:
                (self._remaining,) = struct.unpack(">I", self._header)
                self._header = b""

    @property
    def at_boundary(self) -> bool:
        return not self._remaining and not self._header


@dataclass(eq=False)  # identity semantics: connections live in a set
class _Connection:
    proc: asyncio.subprocess.Process
    writer: asyncio.StreamWriter
    boundary: _FrameBoundary = field(default_factory=_FrameBoundary)
    preempted: Hold | None = None
    stopped: bool = False  # SIGSTOPped by the throttle


@dataclass
class Counters:
    started: int = 0
    refused: int = 0
    preempted: int = 0
    #: Connections refused for who they are (peer credentials, token).
    unauthorized: int = 0


class Manager:
    def __init__(
        self,
        policy: BusyPolicy,
        rate: RateMonitor | None = None,
        hardening: Hardening | None = None,
        status_path: Path | None = None,
        poll_seconds: float = 3.0,
        throttle: float = 1.0,
        command: list[str] | None = None,
        access: Access | None = None,
        opencl_as_root: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``clock`` is what the policies read (terminal idle times are wall-clock times);
        tests pass their own instead of depending on how fast the machine is."""
        self.policy = policy
        self.clock = clock
        self.rate = rate
        self.hardening = hardening or Hardening()
        self.status_path = status_path
        self.poll_seconds = poll_seconds
        self.throttle = throttle
        self.access = access or Access()
        #: Why evaluators offer no OpenCL (None: they may).
        self.opencl_withheld = opencl_withheld(self.hardening, opencl_as_root)
        self.command = command or evaluator_command(
            withhold_opencl=self.opencl_withheld, runs_as=self.hardening.runs_as()
        )
        self.operator = next((m for m in policy.monitors if isinstance(m, OperatorMonitor)), None)
        self.holds: list[Hold] = []
        self.counters = Counters()
        self.listening: list[str] = []
        self._connections: set[_Connection] = set()
        self._stop = asyncio.Event()
        self._polls: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ running

    async def serve(
        self, sockets: list[socket.socket], on_ready: Callable[[], None] | None = None
    ) -> None:
        """Serve on pre-bound ``sockets`` until :meth:`stop`; ``on_ready`` is called once
        connections are being accepted and the status file is written."""
        servers = []
        for sock in sockets:
            if sock.family == socket.AF_UNIX:
                server = await asyncio.start_unix_server(self._on_connection, sock=sock)
            else:
                server = await asyncio.start_server(self._on_connection, sock=sock)
            servers.append(server)
            name = sock.getsockname()
            self.listening.append(name if isinstance(name, str) else f"{name[0]}:{name[1]}")
        log.info("listening on %s", ", ".join(self.listening))
        if self.opencl_withheld is not None:
            log.warning("OpenCL is not offered: %s", self.opencl_withheld)
        self.holds = self.policy.holds(self.clock())
        self._write_status()
        if on_ready is not None:
            on_ready()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._poll_forever())
                if self.throttle < 1.0:
                    tg.create_task(self._throttle_forever())
                await self._stop.wait()
                raise _Stopped
        except* _Stopped:
            pass
        finally:
            for server in servers:
                server.close()
            for conn in list(self._connections):
                await self._kill(conn)
            if self.status_path is not None:
                with contextlib.suppress(OSError):
                    self.status_path.unlink()

    def stop(self) -> None:
        self._stop.set()

    def operator_toggle(self) -> None:
        if self.operator is not None:
            self.operator.toggle()
            self._poll_now()

    def operator_kick(self) -> None:
        if self.operator is not None:
            self.operator.kick()
            self._poll_now()

    def _poll_now(self) -> None:
        # Kept until done: the loop holds tasks weakly, and a failure must be logged.
        task = asyncio.get_running_loop().create_task(self._poll_once())
        self._polls.add(task)
        task.add_done_callback(self._poll_done)

    def _poll_done(self, task: asyncio.Task[None]) -> None:
        self._polls.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a poll of the machine failed", exc_info=task.exception())

    async def _poll_forever(self) -> None:
        while True:
            await self._poll_once()
            await asyncio.sleep(self.poll_seconds)

    async def _poll_once(self) -> None:
        holds = self.policy.holds(self.clock())
        if [h.reason for h in holds] != [h.reason for h in self.holds]:
            if holds:
                log.warning("work held: %s", "; ".join(h.detail for h in holds))
            else:
                log.info("work resumes: nothing holds it")
        self.holds = holds
        kill = next((h for h in holds if h.kill), None)
        if kill is not None and self._connections:
            log.warning("stopping %d evaluator(s): %s", len(self._connections), kill.detail)
            for conn in list(self._connections):
                conn.preempted = kill
                self.counters.preempted += 1
                await self._kill(conn)
        self._write_status()

    async def _throttle_forever(self) -> None:
        """Duty cycle: evaluators run ``throttle`` of each second and are stopped the rest."""
        while True:
            await asyncio.sleep(self.throttle)
            for conn in self._connections:
                with contextlib.suppress(ProcessLookupError):
                    conn.proc.send_signal(signal.SIGSTOP)
                    conn.stopped = True
            await asyncio.sleep(1.0 - self.throttle)
            for conn in self._connections:
                with contextlib.suppress(ProcessLookupError):
                    conn.proc.send_signal(signal.SIGCONT)
                    conn.stopped = False

    # ------------------------------------------------------------------ connections

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        why = await self._access_refusal(reader, writer)
        if why is not None:
            code, message = why
            self.counters.unauthorized += 1
            log.warning("refused a connection: %s %s", code, message)
            await _refuse(reader, writer, code, message)
            self._write_status()
            return
        now = self.clock()
        hold = self.holds[0] if self.holds else None
        if hold is None and self.rate is not None:
            hold = self.rate.record(now)
        if hold is not None:
            self.counters.refused += 1
            log.info("refused an evaluator: %s", hold.detail)
            await _refuse(reader, writer, MACHINE_BUSY, f"{hold.reason}: {hold.detail}")
            self._write_status()
            return
        ids = self.hardening.target_ids()
        workdir = Path(os.environ.get("TMPDIR", "/tmp"))
        proc = await asyncio.create_subprocess_exec(
            *self.command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            env={},
            cwd=str(workdir) if ids else "/",
            close_fds=True,
            preexec_fn=functools.partial(self.hardening.preexec, os.getpid()),
            start_new_session=True,
        )
        conn = _Connection(proc, writer)
        self._connections.add(conn)
        self.counters.started += 1
        self._write_status()
        try:
            async with asyncio.TaskGroup() as tg:
                to_evaluator = tg.create_task(self._pump_in(reader, proc))
                await self._pump_out(proc, conn)
                to_evaluator.cancel()
        finally:
            self._connections.discard(conn)
            await self._kill(conn)
            if conn.preempted is not None and conn.boundary.at_boundary:
                with contextlib.suppress(OSError, RuntimeError):
                    writer.write(
                        frame(
                            Error(
                                re=None,
                                code=PREEMPTED,
                                message=f"{conn.preempted.reason}: {conn.preempted.detail}",
                            )
                        )
                    )
                    await writer.drain()
            writer.close()
            self._write_status()

    async def _access_refusal(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[str, str] | None:
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_UNIX:
            why = self.access.peer_refusal(sock)
            return None if why is None else (PEER_NOT_ALLOWED, why)
        return await self.access.token_refusal(reader)

    async def _pump_in(
        self, reader: asyncio.StreamReader, proc: asyncio.subprocess.Process
    ) -> None:
        assert proc.stdin is not None
        try:
            while chunk := await reader.read(1 << 16):
                proc.stdin.write(chunk)
                await proc.stdin.drain()
        except (ConnectionError, OSError):
            pass
        # The worker hung up: the evaluator goes too.
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()

    async def _pump_out(self, proc: asyncio.subprocess.Process, conn: _Connection) -> None:
        assert proc.stdout is not None
        try:
            while chunk := await proc.stdout.read(1 << 16):
                conn.boundary.feed(chunk)
                conn.writer.write(chunk)
                await conn.writer.drain()
        except (ConnectionError, OSError):
            pass

    async def _kill(self, conn: _Connection) -> None:
        proc = conn.proc
        if proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            if conn.stopped:
                proc.send_signal(signal.SIGCONT)
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), _GRACE)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, object]:
        return {
            "pid": os.getpid(),
            "listening": self.listening,
            "accepting": not self.holds,
            "holds": [asdict(h) for h in self.holds],
            "running": len(self._connections),
            "opencl_withheld": self.opencl_withheld,
            **asdict(self.counters),
            "updated": time.time(),
        }

    def _write_status(self) -> None:
        if self.status_path is None:
            return
        # A fresh file of our own (O_EXCL, random name), renamed over the status file: the
        # default lives in /tmp, where a fixed temporary name could be a planted symlink.
        directory, name = self.status_path.parent, self.status_path.name
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
        except OSError as exc:
            log.warning("cannot write the status file %s: %s", self.status_path, exc)
            return
        try:
            with os.fdopen(fd, "w") as out:
                os.fchmod(out.fileno(), 0o644)  # status and reasons: for anyone to read
                out.write(json.dumps(self.status()))
            os.replace(tmp, self.status_path)
        except OSError as exc:
            log.warning("cannot write the status file %s: %s", self.status_path, exc)
            with contextlib.suppress(OSError):
                os.unlink(tmp)


class _Stopped(Exception):
    pass


async def _refuse(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, code: str, message: str
) -> None:
    """Answer a connection with one ``error`` frame (``re`` null: it is about the connection)
    and end it. The client's requests are read and dropped until it hangs up (at most
    _REFUSE_LINGER s): closing with unread input would send a TCP reset, which can destroy
    the error frame before the client reads it."""
    try:
        writer.write(frame(Error(re=None, code=code, message=message)))
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(_REFUSE_LINGER):
            while await reader.read(1 << 16):
                pass
    except (OSError, TimeoutError):
        pass
    finally:
        writer.close()
