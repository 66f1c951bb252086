"""The local control socket of a running worker: status, logs, pause, resume, stop.

A Unix stream socket (``control_socket``, default ``state_dir/control.sock``), mode 0660 so
that the worker's own user and group may use it and nobody else; it is never on the network.
One JSON object per line each way::

    -> {"cmd": "status"}                 <- {"ok": true, "status": {...}}
    -> {"cmd": "logs", "after": 17}      <- {"ok": true, "logs": [[18, "WARNING", "..."], ...]}
    -> {"cmd": "pause"} / "resume" / "finish" / "stop" / "stop_now"   <- {"ok": true}
    -> {"cmd": "pause_job", "job": "0a1b..."} / "resume_job"           <- {"ok": true}
    -> {"cmd": "snooze", "seconds": 1800}                              <- {"ok": true}
    -> anything else                     <- {"ok": false, "error": "why"}

``dcp-worker status`` and ``dcp-worker dashboard --attach`` are its clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dcp_protocol import DcpError, nesting

from .logs import RecentLogs

__all__ = ["ControlError", "ControlServer", "ControlClient", "MAX_LINE"]

log = logging.getLogger("dcp.worker.control")
MAX_LINE = 1 << 20


class ControlError(DcpError):
    """The control socket cannot be reached, or it refused a command."""


class ControlServer:
    """Serves the commands of :mod:`dcp_worker.control` for one supervisor."""

    def __init__(
        self,
        path: Path,
        status: Callable[[], dict[str, Any]],
        actions: dict[str, Callable[[], None]],
        recent: RecentLogs,
        commands: dict[str, Callable[[dict[str, Any]], None]] | None = None,
    ) -> None:
        self.path = path
        self._status = status
        self._actions = actions
        #: Commands that take arguments (the request object); a ValueError is the refusal.
        self._commands = commands or {}
        self._recent = recent
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        """Listen; a stale socket file (no one answering) is replaced, a live one is not.

        Raises:
            ControlError: another process answers on the path, or it cannot be created.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            if not stat.S_ISSOCK(self.path.lstat().st_mode):
                raise ControlError(f"{self.path} exists and is not a socket")
            if _answers(self.path):
                raise ControlError(f"another worker answers on {self.path}")
            self.path.unlink()
        old = os.umask(0o117)  # created 0660: no window where others may connect
        try:
            with _reachable(self.path) as name:
                self._server = await asyncio.start_unix_server(
                    self._serve, path=name, limit=MAX_LINE
                )
        except OSError as exc:
            raise ControlError(f"cannot listen on {self.path}: {exc.strerror}") from None
        finally:
            os.umask(old)
        os.chmod(self.path, 0o660)
        log.info("control socket %s", self.path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                writer.write(json.dumps(self._answer(line)).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, ValueError, asyncio.LimitOverrunError):
            pass  # a client that went away or sent a line too long
        finally:
            writer.close()

    def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = nesting.loads(line)
            cmd = request["cmd"]
        except nesting.NestingTooDeep as exc:
            return {"ok": False, "error": f"refused: the line {exc}"}
        except (ValueError, TypeError, KeyError):
            return {"ok": False, "error": 'expected a JSON object with "cmd"'}
        if cmd == "status":
            return {"ok": True, "status": self._status()}
        if cmd == "logs":
            after = request.get("after", 0)
            if not isinstance(after, int):
                return {"ok": False, "error": "after: an integer"}
            return {"ok": True, "logs": self._recent.after(after)}
        command = self._commands.get(cmd) if isinstance(cmd, str) else None
        if command is not None:
            try:
                command(request)
            except ValueError as exc:
                return {"ok": False, "error": f"{cmd}: {exc}"}
            log.warning("control socket: %s", cmd)
            return {"ok": True}
        action = self._actions.get(cmd) if isinstance(cmd, str) else None
        if action is None:
            known = ", ".join(sorted(["status", "logs", *self._actions, *self._commands]))
            return {"ok": False, "error": f"unknown command {cmd!r} (known: {known})"}
        log.warning("control socket: %s", cmd)
        action()
        return {"ok": True}


_SUN_PATH = 100  # sockaddr_un holds 108 bytes


@contextlib.contextmanager
def _reachable(path: Path) -> Iterator[str]:
    """A name for ``path`` that fits a Unix socket address: deep state directories (systemd's,
    pytest's) exceed 108 bytes, so a long path goes through its directory's descriptor."""
    if len(os.fsencode(path)) <= _SUN_PATH:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s, _reachable(path) as name:
        s.settimeout(1.0)
        try:
            s.connect(name)
        except OSError:
            return False
        return True


class ControlClient:
    """An asyncio client of a worker's control socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        # One request at a time on the connection: the dashboard's refresh and a key press
        # may call at once, and replies come back in order on one stream.
        self._turn = asyncio.Lock()

    async def __aenter__(self) -> ControlClient:
        try:
            with _reachable(self.path) as name:
                self._reader, self._writer = await asyncio.open_unix_connection(
                    name, limit=MAX_LINE
                )
        except FileNotFoundError:
            raise ControlError(f"no worker control socket at {self.path}") from None
        except PermissionError:
            raise ControlError(
                f"{self.path}: permission denied (run as the worker's user or group)"
            ) from None
        except OSError as exc:
            raise ControlError(f"no worker answers on {self.path}: {exc.strerror}") from None
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._writer is not None:
            self._writer.close()

    async def call(self, cmd: str, **args: Any) -> dict[str, Any]:
        assert self._reader is not None and self._writer is not None
        try:
            async with self._turn:
                self._writer.write(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
                await self._writer.drain()
                line = await self._reader.readline()
        except (ConnectionError, ValueError) as exc:
            raise ControlError(f"the worker closed its control socket: {exc}") from None
        if not line:
            raise ControlError("the worker closed its control socket")
        try:
            reply = nesting.loads(line)
        except ValueError as exc:  # NestingTooDeep included
            raise ControlError(f"the worker's reply is not JSON: {exc}") from None
        if not isinstance(reply, dict):
            raise ControlError("the worker's reply is not a JSON object")
        if not reply.get("ok"):
            raise ControlError(str(reply.get("error")))
        return reply
