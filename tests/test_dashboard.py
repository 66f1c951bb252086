"""The Textual dashboard, headless (Textual's own test driver), against real workers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from textual.widgets import DataTable, TabbedContent

from dcp_worker.config import load_config
from dcp_worker.control import ControlClient
from dcp_worker.dashboard import PassphraseScreen, WorkerDashboard, progress_text
from dcp_worker.logs import setup_logging
from scheduler.client import ComputeClient, SliceResult

from .conftest import PASSPHRASE, Keystore, SchedulerProcess, WorkerProcess, wait_for
from .screenshots import SHOTS
from .test_pipeline import ECHO, PUZZLE, job_file


async def _until(predicate: Callable[[], bool], pilot, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met"
        await pilot.pause(0.1)


def test_in_process_dashboard_asks_the_passphrase_shows_progress_and_stops(
    tmp_path: Path,
    scheduler: SchedulerProcess,
    make_keystore: Callable[[str], Keystore],
) -> None:
    keystore = make_keystore("w")
    owner = make_keystore("owner")
    config = load_config(
        None,
        {
            "scheduler": scheduler.url,
            "identity": str(keystore.path),
            "state_dir": str(tmp_path / "state"),
            "sandboxes": 2,
            "output": ("dashboard",),
        },
    )
    logsetup = setup_logging(config, ("dashboard",), 1)
    app = WorkerDashboard(config, logsetup)

    async def drive() -> tuple[int | None, list[SliceResult]]:
        async with app.run_test(size=(140, 40)) as pilot:
            assert isinstance(app.screen, PassphraseScreen)
            await pilot.press(*"wrong", "enter")
            await _until(
                lambda: "wrong passphrase" in str(app.screen.query_one("#error").render()), pilot
            )
            await pilot.press(*PASSPHRASE.decode(), "enter")
            await _until(lambda: "(connected)" in app.status_text, pilot)
            assert keystore.identity.address in app.status_text
            with ComputeClient(scheduler.url, owner.identity) as client:
                job = await asyncio.to_thread(
                    client.deploy,
                    job_file(tmp_path, "puzzle", PUZZLE, ["p0", "p1"], ["22"], attempts=1),
                )
                await _until(lambda: "puzzle #" in str(app._rows[0].label.render()), pilot)
                await pilot.press("s")  # graceful stop: running slices finish and are delivered
                await _until(lambda: app.return_code is not None, pilot, 60)
                results = await asyncio.to_thread(lambda: list(client.results(job)))
            assert "stopping" in app.status_text
        return app.return_code, results

    code, results = asyncio.run(drive())
    assert code == 0
    # Whatever was running when the stop came was delivered, nothing was dropped.
    assert sum(r.state == "done" for r in results) >= 1
    assert all(r.state in ("done", "queued") for r in results)


def test_attach_shows_a_running_worker_and_sends_keys(
    tmp_path: Path,
    scheduler: SchedulerProcess,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    keystore = make_keystore("w")
    state = tmp_path / "worker-state"
    worker = workers(scheduler.url, keystore, 2, state_dir=state)
    wait_for(lambda: "connected to" in worker.output(), 30)
    with ComputeClient(scheduler.url, make_keystore("owner").identity) as client:
        client.deploy(job_file(tmp_path, "echo", ECHO, [f"v{i}" for i in range(50)]))
    app = WorkerDashboard(attach=state / "control.sock")

    async def status() -> str:
        async with ControlClient(state / "control.sock") as c:
            return str((await c.call("status"))["status"]["state"])

    async def drive() -> tuple[int | None, str]:
        async with app.run_test(size=(140, 40)) as pilot:
            await _until(lambda: keystore.identity.address in app.status_text, pilot)
            await _until(lambda: "slices done 50" in app.status_text, pilot)
            await _until(lambda: "connected to" in str(app.query_one("#log").lines), pilot)
            await pilot.press("ctrl+p")  # no command palette: Textual's, not the worker's
            assert not any(type(screen).__name__ == "CommandPalette" for screen in app.screen_stack)
            await pilot.press("p")
            state_after = await status()
            await pilot.press("q")  # detach: the worker goes on
        return app.return_code, state_after

    code, state_after = asyncio.run(drive())
    assert (code, state_after) == (0, "paused")
    assert worker.proc.poll() is None
    assert worker.stop() == 0


def test_the_log_pane_wraps_long_lines_at_its_width_and_loses_nothing() -> None:
    """RichLog wraps at ``min_width`` (78 by default) when its pane is narrower: the end of
    every wrapped line was cut off ("[Er" + "Connect call failed": "rno 111] " lost)."""
    from rich.markup import escape
    from textual.app import App, ComposeResult
    from textual.widgets import RichLog

    from dcp_worker.dashboard import log_pane

    line = (
        "cannot connect to ws://127.0.0.1:8500/worker: [Errno 111] Connect call failed "
        "('127.0.0.1', 8500); retrying in 1.0 s"
    )

    class Pane(App[None]):
        def compose(self) -> ComposeResult:
            yield log_pane()

    async def run() -> None:
        app = Pane()
        async with app.run_test(size=(50, 12)) as pilot:
            logview = app.query_one(RichLog)
            await _until(lambda: logview.scrollable_content_region.width > 0, pilot)
            logview.write(escape(line))
            await _until(lambda: len(logview.lines) > 1, pilot)
            width = logview.scrollable_content_region.width
            shown = [strip.text.rstrip() for strip in logview.lines]
            assert all(len(text) <= width for text in shown), (width, shown)
            assert "".join(shown).replace(" ", "") == line.replace(" ", "")

    asyncio.run(run())


class SnapshotSource:
    """A fixed snapshot, as a worker's would be, and the commands the dashboard sent."""

    def __init__(self, snap: dict[str, Any]) -> None:
        self.snap = snap
        self.sent: list[tuple[str, dict[str, Any]]] = []

    async def status(self) -> dict[str, Any]:
        return self.snap

    async def logs(self, after: int) -> list[tuple[int, str, str]]:
        return []

    async def command(self, cmd: str, **args: Any) -> None:
        self.sent.append((cmd, args))


def _snapshot() -> dict[str, Any]:
    now = time.time()
    box = {"state": "working", "job": "ab" * 16, "job_name": "puzzle", "slice": 3}
    return {
        "state": "working",
        "scheduler": "http://127.0.0.1:8500",
        "identity": "0x" + "11" * 20,
        "payment_address": "0x" + "22" * 20,
        "groups": [],
        "public_group": True,
        "slices_per_minute": 12,
        "statistics": {
            "connected": True,
            "slices_done": 7,
            "slices_failed": 1,
            "slices_declined": 0,
            "running": 2,
            "queued": 0,
            "outbox": 0,
            "credits_earned": 0.07,
            "held_reason": "",
        },
        "sandboxes": [
            {**box, "index": 0, "progress": 0.5, "elapsed": 20.0, "eta": 20.0, "since_progress": 1},
            {
                **box,
                "index": 1,
                "progress": 0.99,
                "elapsed": 300.0,
                "eta": 3.0,
                "since_progress": 95,
            },
            {"index": 2, "state": "idle"},
        ],
        "earnings": {"session": 0.07, "lifetime": 0.21, "lifetime_error": ""},
        "snooze_left": None,
        "paused_jobs": [],
        "jobs": [
            {
                "job": "ab" * 16,
                "name": "puzzle",
                "done": 7,
                "failed": 1,
                "accepted": 7,
                "refused": 0,
                "credits": 0.07,
                "paused": False,
            },
        ],
        "history": [
            {
                "job": "ab" * 16,
                "job_name": "puzzle",
                "slice": 2,
                "started": now - 30,
                "ended": now - 10,
                "outcome": "accepted",
                "code": "",
                "credit": 0.01,
            },
            {
                "job": "ab" * 16,
                "job_name": "puzzle",
                "slice": 1,
                "started": now - 40,
                "ended": now - 30,
                "outcome": "failed",
                "code": "wasm_trap",
                "credit": 0.0,
            },
        ],
    }


def test_progress_text_tells_a_stuck_slice_from_a_slow_one() -> None:
    box = {"state": "working", "progress": 0.99, "elapsed": 300.0, "eta": 3.0}
    assert progress_text({**box, "since_progress": 2.0}) == " 99%  5m00s  ETA 3s"
    assert progress_text({**box, "since_progress": 95.0}) == " 99%  5m00s  no progress for 1m35s"
    assert progress_text({"state": "working", "progress": None, "elapsed": 5.0}) == "  ?%  5s"
    assert progress_text({"state": "idle"}) == "idle"


def test_dashboard_shows_bars_earnings_history_jobs_and_sends_the_new_keys() -> None:
    source = SnapshotSource(_snapshot())
    app = WorkerDashboard(source=source)

    async def drive() -> None:
        async with app.run_test(size=(150, 36)) as pilot:
            await _until(lambda: "lifetime 0.210000" in app.status_text, pilot)
            assert "credits this run 0.070000" in app.status_text

            def details() -> list[str]:
                return [str(label.render()) for label in app.query(".detail")]

            await _until(lambda: details()[0] != "idle", pilot)
            assert details() == [" 50%  20s  ETA 20s", " 99%  5m00s  no progress for 1m35s", "idle"]
            assert [w.has_class("stalled") for w in app.query(".detail")] == [False, True, False]
            shown = {key for key, b in app.active_bindings.items() if b.binding.show}
            assert {"f", "z", "j"} <= shown
            app.query_one("#panes", TabbedContent).active = "tab-history"
            await pilot.pause()
            history = app.query_one("#history", DataTable)
            assert history.row_count == 2
            assert history.get_row_at(1)[4] == "failed (wasm_trap)"
            app.save_screenshot("worker-dashboard-history.svg", str(SHOTS))
            app.query_one("#panes", TabbedContent).active = "tab-jobs"
            await pilot.pause()
            assert app.query_one("#jobs", DataTable).get_row_at(0)[6] == "0.070000"
            await pilot.press("j", "f", "z")
            app.save_screenshot("worker-dashboard-jobs.svg", str(SHOTS))
            app.query_one("#panes", TabbedContent).active = "tab-log"
            await pilot.pause()
            app.save_screenshot("worker-dashboard.svg", str(SHOTS))

    asyncio.run(drive())
    assert source.sent == [
        ("pause_job", {"job": "ab" * 16}),
        ("finish", {}),
        ("snooze", {"seconds": 1800.0}),
    ]


def test_the_dashboard_says_why_the_evaluator_manager_holds_work() -> None:
    """A worker behind a manager that holds work shows the manager's reason (issue 13 item
    10): in the status pane, as the control socket's snapshot gives it."""
    snap = _snapshot()
    snap["state"] = "held"
    snap["statistics"]["held_reason"] = "machine_busy: the CPU is 93% busy (limit 80%)"
    app = WorkerDashboard(source=SnapshotSource(snap))

    async def drive() -> None:
        async with app.run_test(size=(150, 36)) as pilot:
            await _until(lambda: "held: machine_busy" in app.status_text, pilot)
            assert "held: machine_busy: the CPU is 93% busy (limit 80%)" in app.status_text

    asyncio.run(drive())
