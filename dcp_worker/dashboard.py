"""The terminal dashboard (Textual): sandboxes with progress bars, a status pane, the log.

Two ways in, one UI:

* ``dcp-worker -o dashboard`` (chosen by ``detect`` on a terminal outside systemd) runs the
  worker inside the dashboard's event loop; the keystore passphrase is asked inside the UI
  when no ``passphrase_file`` is configured.
* ``dcp-worker dashboard --attach`` shows a running worker (a service, say) through its control
  socket; ``q`` detaches and leaves it running.

Keys: ``p`` pause fetching, ``r`` resume, ``f`` finish (let held slices end, then pause),
``z`` snooze 30 minutes, ``j`` pause or resume the job highlighted in the Jobs tab, ``s``
graceful stop (also Ctrl+C), ``x`` immediate stop, ``q`` leave (attached: detach; otherwise a
graceful stop). Tabs: the log, the history of finished and failed slices, the jobs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Protocol

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import (
    DataTable,
    Footer,
    Header,
    Input,
    Label,
    ProgressBar,
    RichLog,
    Static,
    TabbedContent,
    TabPane,
)

from dcp_keys import identity as idmod

from .config import WorkerConfig
from .control import ControlClient, ControlError
from .durations import duration
from .logs import LogSetup, RecentLogs

__all__ = ["WorkerDashboard", "attach_dashboard", "run_dashboard"]

log = logging.getLogger("dcp.worker.dashboard")
REFRESH = 0.25
#: A slice whose progress has not moved for this long is shown as stalled, not as slow.
STALL_SECONDS = 30.0
SNOOZE_SECONDS = 30 * 60.0


def progress_text(box: dict[str, Any], stall: float = STALL_SECONDS) -> str:
    """What a sandbox's bar says beside it: percentage, elapsed time and ETA; a slice whose
    progress stopped moving says for how long (a stuck slice is told from a slow one)."""
    if box["state"] != "working":
        return "idle"
    progress = box.get("progress")
    pct = "  ?%" if progress is None else f"{100 * progress:3.0f}%"
    parts = [pct, duration(box["elapsed"])]
    since = box.get("since_progress")
    if since is not None and since >= stall:
        parts.append(f"no progress for {duration(since)}")
    elif box.get("eta") is not None:
        parts.append(f"ETA {duration(box['eta'])}")
    return "  ".join(parts)


def credits(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.6f}"


class Source(Protocol):
    """Where the dashboard reads state and sends commands."""

    async def status(self) -> dict[str, Any]: ...
    async def logs(self, after: int) -> list[tuple[int, str, str]]: ...
    async def command(self, cmd: str, **args: Any) -> None: ...


class LocalSource:
    def __init__(self, supervisor: Any, recent: RecentLogs) -> None:
        self.supervisor = supervisor
        self.recent = recent

    async def status(self) -> dict[str, Any]:
        snap: dict[str, Any] = self.supervisor.snapshot()
        return snap

    async def logs(self, after: int) -> list[tuple[int, str, str]]:
        return self.recent.after(after)

    async def command(self, cmd: str, **args: Any) -> None:
        getattr(self.supervisor, cmd)(*args.values())


class RemoteSource:
    def __init__(self, client: ControlClient) -> None:
        self.client = client

    async def status(self) -> dict[str, Any]:
        snap: dict[str, Any] = (await self.client.call("status"))["status"]
        return snap

    async def logs(self, after: int) -> list[tuple[int, str, str]]:
        rows = (await self.client.call("logs", after=after))["logs"]
        return [(int(seq), str(level), str(line)) for seq, level, line in rows]

    async def command(self, cmd: str, **args: Any) -> None:
        await self.client.call(cmd, **args)


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
    # The bar's empty part is drawn in a grey that shows on the panel (Textual's default,
    # $surface on the panel's background, was colour 234 on 233: an idle bar was invisible).
    DEFAULT_CSS = """
    SandboxRow { height: 1; }
    SandboxRow .name { width: 22; }
    SandboxRow .detail { width: 1fr; padding-left: 1; }
    SandboxRow .stalled { color: $warning; text-style: bold; }
    SandboxRow Bar { width: 20; }
    SandboxRow Bar > .bar--bar { background: $foreground 25%; }
    SandboxRow Bar > .bar--indeterminate { color: $secondary; background: $foreground 25%; }
    SandboxRow Bar > .bar--complete { background: $foreground 25%; }
    """

    def __init__(self, index: int) -> None:
        super().__init__(id=f"sandbox-{index}")
        self.label = Label(f"{index:>2} idle", classes="name")
        self.bar = ProgressBar(total=100, show_eta=False, show_percentage=False)
        self.detail = Label("idle", classes="detail")

    def compose(self) -> ComposeResult:
        yield self.label
        yield self.bar
        yield self.detail

    def show(self, box: dict[str, Any]) -> None:
        text = progress_text(box)
        self.detail.update(text)
        self.detail.set_class("no progress" in text, "stalled")
        if box["state"] != "working":
            self.label.update(f"{box['index']:>2} idle")
            self.bar.update(total=100, progress=0)
            return
        name = (box.get("job_name") or box["job"])[:16]
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
    #sandboxes { width: 3fr; border: round $primary; }
    #panes { width: 2fr; }
    #log { border: round $primary; }
    #status { height: auto; border: round $primary; padding: 0 1; }
    """
    BINDINGS = [
        Binding("p", "pause", "Pause fetching"),
        Binding("r", "resume", "Resume"),
        Binding("f", "finish", "Finish, then pause"),
        Binding("z", "snooze", "Snooze 30 min"),
        Binding("j", "toggle_job", "Pause/resume job"),
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
        source: Source | None = None,
    ) -> None:
        super().__init__()
        #: A source given here is shown as it is (no worker is started or attached).
        self._given = source
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
        self._jobs: list[dict[str, Any]] = []
        self._history_top: tuple[Any, ...] | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="top"):
            yield VerticalScroll(id="sandboxes")
            with TabbedContent(id="panes"):
                with TabPane("Log", id="tab-log"):
                    yield log_pane()
                with TabPane("History", id="tab-history"):
                    yield DataTable(id="history", cursor_type="row", zebra_stripes=True)
                with TabPane("Jobs", id="tab-jobs"):
                    yield DataTable(id="jobs", cursor_type="row", zebra_stripes=True)
        yield Static("starting...", id="status")
        yield Footer()

    async def on_mount(self) -> None:
        self.query_one("#sandboxes").border_title = "Sandboxes"
        self.query_one("#log").border_title = "Log"
        self.query_one("#status").border_title = "Worker status"
        self.query_one("#history", DataTable).add_columns(
            "ended", "job", "slice", "took", "outcome", "credit"
        )
        self.query_one("#jobs", DataTable).add_columns(
            "job", "id", "done", "failed", "ok", "refused", "credits", "new work"
        )
        if self._given is not None:
            self.source = self._given
            await self._refresh()
            self.set_interval(REFRESH, self._refresh)
            return
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
        if not self.is_running or not self.query("#status"):
            return  # the app is closing: its widgets went while the snapshot was read
        self._show_sandboxes(snap["sandboxes"])
        self._show_status(snap)
        self._show_history(snap.get("history", []))
        self._show_jobs(snap.get("jobs", []))
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
            f"credits this run {s['credits_earned']:.6f}    lifetime "
            f"{credits(snap.get('earnings', {}).get('lifetime'))}    rate "
            f"{snap['slices_per_minute']} slices/min"
            + (f"\nheld: {s['held_reason']}" if s["held_reason"] else "")
            + (
                f"\nsnoozed: {duration(snap['snooze_left'])} left"
                if snap.get("snooze_left") is not None
                else ""
            )
            + (
                f"\nno new work from: {', '.join(snap['paused_jobs'])}"
                if snap.get("paused_jobs")
                else ""
            )
        )
        self.status_text = text
        self.query_one("#status", Static).update(text)

    def _show_history(self, history: list[dict[str, Any]]) -> None:
        table = self.query_one("#history", DataTable)
        top = tuple(history[0].values()) if history else None
        if top == self._history_top and table.row_count == len(history):
            return  # unchanged: keep the cursor where the reader left it
        self._history_top = top
        table.clear()
        for r in history:
            ended = time.strftime("%H:%M:%S", time.localtime(r["ended"]))
            outcome = r["outcome"] + (f" ({r['code']})" if r["code"] else "")
            table.add_row(
                ended,
                r["job_name"] or r["job"][:12],
                str(r["slice"]),
                duration(r["ended"] - r["started"]),
                outcome,
                f"{r['credit']:.6f}" if r["outcome"] == "accepted" else "",
            )

    def _show_jobs(self, jobs: list[dict[str, Any]]) -> None:
        table = self.query_one("#jobs", DataTable)
        rows = [
            (
                j["name"] or "-",
                j["job"][:8],
                str(j["done"]),
                str(j["failed"]),
                str(j["accepted"]),
                str(j["refused"]),
                f"{j['credits']:.6f}",
                "paused" if j["paused"] else "yes",
            )
            for j in jobs
        ]
        if [tuple(r) for r in self._jobs_rows()] == rows:
            return
        self._jobs = jobs
        cursor = table.cursor_row
        table.clear()
        for row in rows:
            table.add_row(*row)
        if rows:
            table.move_cursor(row=min(cursor, len(rows) - 1))

    def _jobs_rows(self) -> list[tuple[str, ...]]:
        table = self.query_one("#jobs", DataTable)
        return [tuple(str(c) for c in table.get_row_at(i)) for i in range(table.row_count)]

    async def _command(self, cmd: str, **args: Any) -> None:
        if self.source is None:
            return
        try:
            await self.source.command(cmd, **args)
        except (ControlError, ValueError) as exc:
            self.notify(str(exc), title=cmd, severity="error")
        await self._refresh()

    async def action_finish(self) -> None:
        await self._command("finish")

    async def action_snooze(self) -> None:
        await self._command("snooze", seconds=SNOOZE_SECONDS)

    async def action_toggle_job(self) -> None:
        """Pause (or resume) the job highlighted in the Jobs tab."""
        table = self.query_one("#jobs", DataTable)
        if not self._jobs or table.cursor_row >= len(self._jobs):
            self.notify("no job to pause yet (see the Jobs tab)", severity="warning")
            return
        job = self._jobs[table.cursor_row]
        await self._command("resume_job" if job["paused"] else "pause_job", job=job["job"])

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
