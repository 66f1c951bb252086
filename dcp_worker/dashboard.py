"""The terminal dashboard (Textual): sandboxes with progress bars, a status pane, the log.

Two ways in, one UI:

* ``dcp-worker -o dashboard`` (chosen by ``detect`` on a terminal outside systemd) runs the
  worker inside the dashboard's event loop; the keystore passphrase is asked inside the UI
  when no ``passphrase_file`` is configured.
* ``dcp-worker dashboard --attach`` shows a running worker (a service, say) through its control
  socket; ``q`` detaches and leaves it running.

Keys: ``p`` pause fetching, ``r`` resume, ``s`` graceful stop (also Ctrl+C), ``x`` immediate
stop, ``q`` leave (attached: detach; otherwise a graceful stop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import Any, Protocol

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Footer, Header, Input, Label, ProgressBar, RichLog, Static

from dcp_keys import identity as idmod

from .config import WorkerConfig
from .control import ControlClient, ControlError
from .logs import LogSetup, RecentLogs

__all__ = ["WorkerDashboard", "attach_dashboard", "run_dashboard"]

log = logging.getLogger("dcp.worker.dashboard")
REFRESH = 0.25


class Source(Protocol):
    """Where the dashboard reads state and sends commands."""

    async def status(self) -> dict[str, Any]: ...
    async def logs(self, after: int) -> list[tuple[int, str, str]]: ...
    async def command(self, cmd: str) -> None: ...


class LocalSource:
    def __init__(self, supervisor: Any, recent: RecentLogs) -> None:
        self.supervisor = supervisor
        self.recent = recent

    async def status(self) -> dict[str, Any]:
        snap: dict[str, Any] = self.supervisor.snapshot()
        return snap

    async def logs(self, after: int) -> list[tuple[int, str, str]]:
        return self.recent.after(after)

    async def command(self, cmd: str) -> None:
        getattr(self.supervisor, cmd)()


class RemoteSource:
    def __init__(self, client: ControlClient) -> None:
        self.client = client

    async def status(self) -> dict[str, Any]:
        snap: dict[str, Any] = (await self.client.call("status"))["status"]
        return snap

    async def logs(self, after: int) -> list[tuple[int, str, str]]:
        rows = (await self.client.call("logs", after=after))["logs"]
        return [(int(seq), str(level), str(line)) for seq, level, line in rows]

    async def command(self, cmd: str) -> None:
        await self.client.call(cmd)


class PassphraseScreen(ModalScreen[bytes]):
    """Asks for the keystore passphrase; dismissed with it once it decrypts the keystore."""

    CSS = """
    PassphraseScreen { align: center middle; }
    #box { width: 72; height: auto; border: round $accent; padding: 1 2; }
    #error { color: $error; }
    """

    def __init__(self, keystore: str) -> None:
        super().__init__()
        self.keystore = keystore

    def compose(self) -> ComposeResult:
        with Vertical(id="box"):
            yield Label(f"Passphrase for {self.keystore}")
            yield Input(password=True, id="passphrase")
            yield Label("", id="error")

    async def on_input_submitted(self, event: Input.Submitted) -> None:
        passphrase = event.value.encode()
        event.input.value = ""
        error = self.query_one("#error", Label)
        error.update("decrypting...")
        try:
            identity = await asyncio.to_thread(_unlock, self.keystore, passphrase)
        except idmod.WalletError as exc:
            error.update(str(exc))
            return
        self.app.identity = identity  # type: ignore[attr-defined]
        self.dismiss(passphrase)


def log_pane() -> RichLog:
    """The log pane. ``min_width=1``: lines wrap at the pane's width; RichLog's default (78)
    wrapped them at 78 columns in a narrower pane, and cut off the end of each wrapped line."""
    return RichLog(id="log", wrap=True, markup=True, max_lines=2000, min_width=1)


class SandboxRow(Horizontal):
    DEFAULT_CSS = """
    SandboxRow { height: 1; }
    SandboxRow Label { width: 34; }
    """

    def __init__(self, index: int) -> None:
        super().__init__(id=f"sandbox-{index}")
        self.label = Label(f"{index:>2} idle")
        self.bar = ProgressBar(total=100, show_eta=False)

    def compose(self) -> ComposeResult:
        yield self.label
        yield self.bar

    def show(self, box: dict[str, Any]) -> None:
        if box["state"] != "working":
            self.label.update(f"{box['index']:>2} idle")
            self.bar.update(total=100, progress=0)
            return
        name = (box.get("job_name") or box["job"])[:18]
        self.label.update(f"{box['index']:>2} {name} #{box['slice']}")
        if box.get("progress") is None:
            self.bar.update(total=None)  # indeterminate until the work reports progress
        else:
            self.bar.update(total=100, progress=100 * box["progress"])


class WorkerDashboard(App[int]):
    TITLE = "dcp-worker"
    #: Textual's command palette (ctrl+p, and its hint in the footer) offers Textual's own
    #: commands (themes, screenshots, quit), none of the worker's: the keys below are ours.
    ENABLE_COMMAND_PALETTE = False
    CSS = """
    #top { height: 1fr; }
    #sandboxes { width: 1fr; border: round $primary; }
    #log { width: 1fr; border: round $primary; }
    #status { height: auto; border: round $primary; padding: 0 1; }
    """
    BINDINGS = [
        Binding("p", "pause", "Pause fetching"),
        Binding("r", "resume", "Resume"),
        Binding("s", "stop", "Graceful stop"),
        Binding("ctrl+c", "stop", "Graceful stop", show=False, priority=True),
        Binding("x", "stop_now", "Stop now"),
        Binding("q", "leave", "Quit"),
    ]

    def __init__(
        self,
        config: WorkerConfig | None = None,
        logsetup: LogSetup | None = None,
        attach: Path | None = None,
        identity: idmod.Identity | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.logsetup = logsetup
        self.attach = attach
        self.identity = identity
        self.source: Source | None = None
        self.supervisor: Any = None
        self.exit_code = 0
        self._log_seq = 0
        self._rows: list[SandboxRow] = []
        self.status_text = ""
        self.exit_message = ""

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="top"):
            yield VerticalScroll(id="sandboxes")
            yield log_pane()
        yield Static("starting...", id="status")
        yield Footer()

    async def on_mount(self) -> None:
        self.query_one("#sandboxes").border_title = "Sandboxes"
        self.query_one("#log").border_title = "Log"
        self.query_one("#status").border_title = "Worker status"
        if self.attach is not None:
            self.sub_title = f"attached to {self.attach}"
            self.run_worker(self._attached(self.attach), exclusive=True)
            return
        assert self.config is not None
        if self.identity is None and not self.config.passphrase_file:
            self.push_screen(PassphraseScreen(self.config.identity), self._unlocked)
            return
        self.run_worker(self._local(), exclusive=True)

    def _unlocked(self, _passphrase: bytes | None) -> None:
        self.run_worker(self._local(), exclusive=True)

    async def _local(self) -> None:
        from .outbox import OutboxError
        from .runtime import EXIT_CONFIG, EXIT_IDENTITY, serve
        from .supervisor import Supervisor

        assert self.config is not None and self.logsetup is not None
        if self.identity is None:
            try:
                self.identity = await asyncio.to_thread(
                    _unlock, self.config.identity, None, self.config.passphrase_file
                )
            except idmod.WalletError as exc:
                self._fail(str(exc), EXIT_IDENTITY)
                return
        try:
            self.supervisor = Supervisor(self.config, self.identity)
        except (OutboxError, ValueError) as exc:
            self._fail(str(exc), EXIT_CONFIG)
            return
        self.sub_title = self.identity.address
        self.source = LocalSource(self.supervisor, self.logsetup.recent)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGQUIT):
            loop.add_signal_handler(
                sig, self.supervisor.stop if sig == signal.SIGTERM else self.supervisor.stop_now
            )
        self.set_interval(REFRESH, self._refresh)
        code = await serve(self.supervisor, self.logsetup, signals=False)
        await self._refresh()
        self.exit(code)

    async def _attached(self, path: Path) -> None:
        try:
            async with ControlClient(path) as client:
                self.source = RemoteSource(client)
                while True:
                    await self._refresh()
                    await asyncio.sleep(REFRESH)
        except ControlError as exc:
            self._fail(f"{exc}", 2 if self.status_text == "" else 0)

    def _fail(self, message: str, code: int) -> None:
        self.exit_message = message
        self.exit(code)

    async def _refresh(self) -> None:
        if self.source is None:
            return
        snap = await self.source.status()
        self._show_sandboxes(snap["sandboxes"])
        self._show_status(snap)
        logview = self.query_one("#log", RichLog)
        for seq, level, line in await self.source.logs(self._log_seq):
            self._log_seq = seq
            style = {"ERROR": "red", "CRITICAL": "bold red", "WARNING": "yellow"}.get(level, "")
            logview.write(f"[{style}]{_escape(line)}[/]" if style else _escape(line))

    def _show_sandboxes(self, boxes: list[dict[str, Any]]) -> None:
        pane = self.query_one("#sandboxes", VerticalScroll)
        while len(self._rows) < len(boxes):
            row = SandboxRow(len(self._rows))
            self._rows.append(row)
            pane.mount(row)
        pane.border_title = f"Sandboxes ({len(boxes)})"
        for row, box in zip(self._rows, boxes, strict=False):
            if row.is_mounted:
                row.show(box)

    def _show_status(self, snap: dict[str, Any]) -> None:
        s = snap["statistics"]
        groups = ", ".join(snap["groups"]) or "none"
        text = (
            f"[b]{snap['state']}[/b]    scheduler {snap['scheduler']} "
            f"({'connected' if s['connected'] else 'not connected'})\n"
            f"identity {snap['identity']}    paid to {snap['payment_address']}\n"
            f"groups {groups}; public group {'yes' if snap['public_group'] else 'no'}\n"
            f"slices done {s['slices_done']}, failed {s['slices_failed']}, declined "
            f"{s['slices_declined']}; running {s['running']}, queued {s['queued']}; "
            f"to deliver {s['outbox']}\n"
            f"credits earned {s['credits_earned']:.6f}    rate "
            f"{snap['slices_per_minute']} slices/min"
            + (f"\nheld: {s['held_reason']}" if s["held_reason"] else "")
        )
        self.status_text = text
        self.query_one("#status", Static).update(text)

    async def _command(self, cmd: str) -> None:
        if self.source is None:
            return
        with contextlib.suppress(ControlError):
            await self.source.command(cmd)
        await self._refresh()

    async def action_pause(self) -> None:
        await self._command("pause")

    async def action_resume(self) -> None:
        await self._command("resume")

    async def action_stop(self) -> None:
        await self._command("stop")

    async def action_stop_now(self) -> None:
        await self._command("stop_now")

    async def action_leave(self) -> None:
        if self.attach is not None:
            self.exit(0)
        else:
            await self._command("stop")


def _unlock(keystore: str, passphrase: bytes | None, passphrase_file: str = "") -> idmod.Identity:
    if passphrase is None:
        passphrase = idmod.read_passphrase_file(os.path.expanduser(passphrase_file))
    return idmod.load_keystore(os.path.expanduser(keystore), passphrase)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


#: Exit status of a dashboard that failed (Textual printed the traceback).
EXIT_DASHBOARD_FAILED = 1


def _exit_code(app: WorkerDashboard, code: int | None) -> int:
    """The app's own code (the worker's, or 0 on detach); non-zero when the app crashed,
    where Textual leaves the code None but sets its return_code."""
    if app.return_code:
        return EXIT_DASHBOARD_FAILED
    return code if code is not None else 0


def run_dashboard(config: WorkerConfig, logsetup: LogSetup) -> int:
    """Run a worker inside the dashboard; returns the worker's exit code."""
    logsetup.remove_console()
    app = WorkerDashboard(config, logsetup)
    code = app.run()
    if app.exit_message:
        print(f"dcp-worker: {app.exit_message}")
    print(app.status_text.replace("[b]", "").replace("[/b]", ""))
    return _exit_code(app, code)


def attach_dashboard(path: Path, headless: bool = False) -> int:
    """Show a running worker; returns 0 on detach, 2 when it cannot be reached, 1 when the
    dashboard failed. ``headless`` runs it without a terminal (tests)."""
    app = WorkerDashboard(attach=path)
    code = app.run(headless=headless)
    if app.exit_message:
        print(f"dcp-worker: {app.exit_message}")
    return _exit_code(app, code)
