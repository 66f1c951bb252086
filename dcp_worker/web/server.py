"""The worker's page over HTTP (aiohttp): server-rendered, refreshed by a little script.

Routes (all behind :class:`~dcp_worker.web.auth.ConsoleAuth`)::

    GET  /                 the page (jinja2, from the supervisor's snapshot)
    GET  /live             the page's live part alone (the script swaps it in every second)
    GET  /api/status       the snapshot as JSON: the same object as ``dcp-worker status --json``
    GET  /api/logs?after=N recent log lines after sequence number N
    POST /api/{action}     pause, resume, finish, stop; snooze {"seconds"}; pause_job /
                           resume_job {"job"}
    GET  /static/...       the script and the style sheet
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import jinja2
from aiohttp import web

from dcp_protocol import nesting

from ..config import ConfigError
from ..durations import duration
from ..levels import NOTICE
from ..logs import RecentLogs
from .auth import COOKIE, ConsoleAuth, write_token

if TYPE_CHECKING:
    from ..supervisor import Supervisor

__all__ = ["ConsoleServer"]

log = logging.getLogger("dcp.worker.console")
HERE = Path(__file__).parent
#: The page loads its own script and style sheet only; nothing inline runs.
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)
_LOG_LINES = 200


def _clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


def _duration(seconds: float | None) -> str:
    return "" if seconds is None else duration(seconds, tenths_below=10)


class ConsoleServer:
    """Serves the page for one supervisor on ``host:port`` (port 0: any free one)."""

    def __init__(
        self,
        supervisor: Supervisor,
        recent: RecentLogs,
        host: str,
        port: int,
        token_path: Path,
        stall_seconds: float = 30.0,
    ) -> None:
        self.supervisor = supervisor
        self.recent = recent
        self.host = host
        self.port = port
        self.token_path = token_path
        self.stall_seconds = stall_seconds
        self.url = ""
        self._auth: ConsoleAuth | None = None
        self._env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self._env.filters["clock"] = _clock
        self._env.filters["duration"] = _duration
        app = web.Application(middlewares=[self._guard])
        app.router.add_get("/", self._page)
        app.router.add_get("/live", self._live)
        app.router.add_get("/api/status", self._status)
        app.router.add_get("/api/logs", self._logs)
        app.router.add_post("/api/{action}", self._act)
        app.router.add_static("/static", HERE / "static", follow_symlinks=False)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)

    async def start(self) -> None:
        """Write a new token, then listen.

        Raises:
            ConfigError: the address cannot be listened on, or the token file not written.
        """
        try:
            token = write_token(self.token_path)
        except OSError as exc:
            raise ConfigError(f"console: cannot write {self.token_path}: {exc.strerror}") from None
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise ConfigError(f"console {self.host}:{self.port}: cannot listen: {why}") from None
        port = int(self._runner.addresses[0][1])  # the one taken, when 0 asked for any
        name = f"[{self.host}]" if ":" in self.host else self.host
        hosts = {f"{name}:{port}"}
        if self.host in ("127.0.0.1", "::1", "localhost"):
            hosts |= {f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"}
        self._auth = ConsoleAuth(token, frozenset(hosts))
        self.port = port
        self.url = f"http://{name}:{port}/"
        log.log(
            NOTICE,
            "the worker's page is at %s (dcp-worker console-url prints it with its token)",
            self.url,
        )

    async def close(self) -> None:
        await self._runner.cleanup()

    # ------------------------------------------------------------------ authorization

    @web.middleware
    async def _guard(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        auth = self._auth
        assert auth is not None
        why = auth.host_refusal(request.headers.get("Host"))
        if why is not None:
            return _refuse(421, why)
        if request.method == "GET" and request.path == "/" and "token" in request.query:
            # The address console-url printed: the token moves into a cookie and out of the
            # address bar (and of the history and any Referer).
            if not auth.url_token_ok(request.query["token"]):
                return _refuse(401, "refused: wrong console token in the address")
            response = web.Response(status=303, headers={"Location": "/"})
            response.set_cookie(
                COOKIE, auth.token, httponly=True, samesite="Strict", path="/", secure=False
            )
            return _secure(response)
        why = auth.token_refusal(request.cookies.get(COOKIE))
        if why is not None:
            return _refuse(401, why)
        if request.method not in ("GET", "HEAD"):
            why = auth.origin_refusal(request.headers.get("Origin"), request.host)
            if why is not None:
                return _refuse(403, why)
        return _secure(await handler(request))

    # ------------------------------------------------------------------ pages

    def _context(self) -> dict[str, Any]:
        snap = self.supervisor.snapshot()
        return {
            "snap": snap,
            "s": snap["statistics"],
            "stall": self.stall_seconds,
            "logs": self.recent.after(0)[-_LOG_LINES:][::-1],  # the newest first
        }

    async def _page(self, _request: web.Request) -> web.StreamResponse:
        html = self._env.get_template("worker.html").render(self._context())
        return web.Response(text=html, content_type="text/html")

    async def _live(self, _request: web.Request) -> web.StreamResponse:
        html = self._env.get_template("worker_live.html").render(self._context())
        return web.Response(text=html, content_type="text/html")

    async def _status(self, _request: web.Request) -> web.StreamResponse:
        return web.json_response(self.supervisor.snapshot())

    async def _logs(self, request: web.Request) -> web.StreamResponse:
        try:
            after = int(request.query.get("after", "0"))
        except ValueError:
            return _refuse(400, "refused: after is a sequence number")
        return web.json_response({"logs": self.recent.after(after)})

    async def _act(self, request: web.Request) -> web.StreamResponse:
        action = request.match_info["action"]
        sup = self.supervisor
        plain = sup.actions()
        try:
            body = nesting.loads(await request.read()) if request.can_read_body else {}
        except nesting.NestingTooDeep as exc:
            return _refuse(400, f"refused: the body {exc}")
        except ValueError:
            return _refuse(400, "refused: the body is not JSON")
        if not isinstance(body, dict):
            return _refuse(400, "refused: the body is not a JSON object")
        commands = sup.commands()
        if action in plain:
            plain[action]()
        elif action in commands:
            try:
                commands[action](body)
            except ValueError as exc:
                return _refuse(400, f"refused: {action}: {exc}")
        else:
            known = ", ".join(sorted([*plain, *commands]))
            return _refuse(404, f"refused: no action {action!r} (known: {known})")
        log.warning("console: %s", action)
        return web.json_response({"ok": True})


def _refuse(status: int, why: str) -> web.Response:
    return _secure(web.json_response({"ok": False, "error": why}, status=status))


_R = TypeVar("_R", bound=web.StreamResponse)


def _secure(response: _R) -> _R:
    response.headers["Content-Security-Policy"] = _CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-store"
    return response
