"""The control socket's client, and the attached dashboard's exit status, against a real
control server on a Unix socket."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dcp_worker.control import ControlClient, ControlError, ControlServer
from dcp_worker.durations import parse_duration
from dcp_worker.logs import RecentLogs

REPO = Path(__file__).parent.parent


def _status() -> dict[str, Any]:
    return {"state": "working"}


def test_calls_from_many_coroutines_at_once_each_get_their_reply(tmp_path: Path) -> None:
    paused: list[str] = []

    async def main() -> list[dict[str, Any]]:
        server = ControlServer(
            tmp_path / "c.sock", _status, {"pause": lambda: paused.append("p")}, RecentLogs()
        )
        await server.start()
        try:
            async with ControlClient(tmp_path / "c.sock") as client:
                calls = [
                    client.call("status") if i % 2 else client.call("pause") for i in range(20)
                ]
                return await asyncio.gather(*calls)
        finally:
            await server.close()

    replies = asyncio.run(main())
    assert replies == [
        {"ok": True, "status": {"state": "working"}} if i % 2 else {"ok": True} for i in range(20)
    ]
    assert paused == ["p"] * 10


@pytest.fixture
def control_server(tmp_path: Path) -> Iterator[Callable[[Callable[[], dict[str, Any]]], Path]]:
    loops: list[tuple[asyncio.AbstractEventLoop, threading.Thread, asyncio.Event]] = []

    def start(status: Callable[[], dict[str, Any]]) -> Path:
        path = tmp_path / f"s{len(loops)}.sock"
        ready = threading.Event()
        loop = asyncio.new_event_loop()
        stop = asyncio.Event()

        async def serve() -> None:
            server = ControlServer(path, status, {}, RecentLogs())
            await server.start()
            ready.set()
            await stop.wait()
            await server.close()

        thread = threading.Thread(target=loop.run_until_complete, args=(serve(),))
        thread.start()
        assert ready.wait(10)
        loops.append((loop, thread, stop))
        return path

    yield start
    for loop, thread, stop in loops:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


def test_a_failing_attached_dashboard_exits_non_zero(
    control_server: Callable[[Callable[[], dict[str, Any]]], Path],
) -> None:
    # A worker of another version, say: its status lacks what the dashboard shows.
    path = control_server(lambda: {"state": "working"})
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from dcp_worker.dashboard import "
            f"attach_dashboard; sys.exit(attach_dashboard(Path({str(path)!r}), headless=True))",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert "KeyError" in run.stdout + run.stderr


def test_commands_with_arguments_refuse_bad_ones_with_the_reason(tmp_path: Path) -> None:
    snoozed: list[float] = []

    def snooze(request: dict[str, Any]) -> None:
        seconds = request.get("seconds")
        if not isinstance(seconds, int | float):
            raise ValueError('"seconds": a number')
        snoozed.append(float(seconds))

    async def main() -> list[dict[str, Any]]:
        server = ControlServer(tmp_path / "c.sock", _status, {}, RecentLogs(), {"snooze": snooze})
        await server.start()
        try:
            async with ControlClient(tmp_path / "c.sock") as client:
                replies = [await client.call("snooze", seconds=1800)]
                for bad in ({"seconds": "soon"}, {}):
                    try:
                        await client.call("snooze", **bad)
                    except ControlError as exc:
                        replies.append({"error": str(exc)})
                try:
                    await client.call("nap")
                except ControlError as exc:
                    replies.append({"error": str(exc)})
                return replies
        finally:
            await server.close()

    replies = asyncio.run(main())
    assert replies[0] == {"ok": True} and snoozed == [1800.0]
    assert replies[1] == replies[2] == {"error": 'snooze: "seconds": a number'}
    assert "known: logs, snooze, status" in replies[3]["error"]


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90.0), ("90s", 90.0), ("30m", 1800.0), ("1h30m", 5400.0)]
)
def test_snooze_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "soon", "m5", "-5m"])
def test_snooze_refuses_what_is_not_a_duration(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)
