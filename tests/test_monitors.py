"""Busy-machine monitors, fed readings directly."""

from __future__ import annotations

from pathlib import Path

import pytest

from evaluator.manager.monitors import (
    BatteryMonitor,
    BusyPolicy,
    CpuMonitor,
    ExclusiveProgramMonitor,
    Hold,
    HoursMonitor,
    LoadMonitor,
    OperatorMonitor,
    RateMonitor,
    ScreensaverMonitor,
    TtyMonitor,
    on_battery,
    parse_screensaver_reply,
    parse_window,
)


def test_load() -> None:
    assert LoadMonitor(2.0, lambda: 1.5).check(0) is None
    hold = LoadMonitor(2.0, lambda: 3.25).check(0)
    assert hold == Hold("load_high", "load average 3.25 is above 2", False)


def test_rate() -> None:
    rate = RateMonitor(2)
    assert rate.record(10.0) is None and rate.record(10.1) is None
    hold = rate.record(10.2)
    assert hold is not None and hold.reason == "connection_rate" and not hold.kill
    assert rate.record(11.5) is None  # a second later the window has moved on


def test_tty_idle_timeout() -> None:
    tty = TtyMonitor(30, lambda: [("/dev/pts/0", 100.0), ("/dev/pts/1", 50.0)])
    hold = tty.check(110.0)
    assert hold is not None and hold.reason == "user_active" and hold.kill
    assert "/dev/pts/0" in hold.detail
    assert tty.check(131.0) is None


def test_operator_toggle_and_kick() -> None:
    op = OperatorMonitor()
    assert op.check(0) is None
    op.toggle()
    assert op.check(0).reason == "operator"  # type: ignore[union-attr]
    op.toggle()
    op.kick()
    assert op.check(0).reason == "operator_kick"  # type: ignore[union-attr]
    assert op.check(0) is None  # one shot


def test_battery(tmp_path: Path) -> None:
    def supply(name: str, kind: str, online: str) -> None:
        (tmp_path / name).mkdir()
        (tmp_path / name / "type").write_text(kind + "\n")
        (tmp_path / name / "online").write_text(online + "\n")

    assert not on_battery(str(tmp_path))  # a desktop with no supplies listed
    supply("AC", "Mains", "0")
    supply("BAT0", "Battery", "1")
    assert on_battery(str(tmp_path))
    (tmp_path / "AC" / "online").write_text("1\n")
    assert not on_battery(str(tmp_path))
    assert BatteryMonitor(lambda: True).check(0).reason == "on_battery"  # type: ignore[union-attr]


def test_exclusive_programs() -> None:
    monitor = ExclusiveProgramMonitor(frozenset({"steam", "zoom"}), lambda: {"bash", "zoom"})
    assert monitor.check(0) == Hold("exclusive_program", "zoom is running", True)
    assert ExclusiveProgramMonitor(frozenset({"steam"}), lambda: {"bash"}).check(0) is None


@pytest.mark.parametrize(
    ("window", "minute", "inside"),
    [
        ("09:00-17:00", 9 * 60, True),
        ("09:00-17:00", 17 * 60, False),
        ("22:00-07:00", 23 * 60, True),
        ("22:00-07:00", 3 * 60, True),
        ("22:00-07:00", 12 * 60, False),
    ],
)
def test_hours(window: str, minute: int, inside: bool) -> None:
    monitor = HoursMonitor((parse_window(window),), clock=lambda now: minute)
    assert (monitor.check(0) is None) == inside


@pytest.mark.parametrize(
    "bad", ["9-", "nine-ten", "25:00-26:00", "0900", "09:75-10:00", "09:-5-10:00", "-1:00-2:00"]
)
def test_bad_windows(bad: str) -> None:
    with pytest.raises(ValueError, match="is not (HH:MM-HH:MM|a time of day)"):
        parse_window(bad)


def test_cpu_hysteresis() -> None:
    readings = iter([40.0, 80.0, 60.0, 30.0, 20.0, 60.0])
    cpu = CpuMonitor(busy=70, resume=25, read=lambda: next(readings))
    states = [cpu.check(0) is not None for _ in range(6)]
    # Holds above 70, keeps holding until below 25, then needs above 70 again.
    assert states == [False, True, True, True, False, False]


def test_policy_collects_holds_and_survives_failing_readings() -> None:
    def broken() -> float:
        raise OSError("no /proc")

    policy = BusyPolicy([LoadMonitor(1, broken), LoadMonitor(1, lambda: 5.0), OperatorMonitor()])
    assert [h.reason for h in policy.holds(0)] == ["load_high"]


def test_screensaver() -> None:
    assert parse_screensaver_reply("   boolean true\n") is True
    assert parse_screensaver_reply("   boolean false\n") is False
    assert parse_screensaver_reply("") is None
    assert ScreensaverMonitor(lambda: True).check(0) is None  # screensaver on: work runs
    assert ScreensaverMonitor(lambda: None).check(0) is None  # no session bus
    hold = ScreensaverMonitor(lambda: False).check(0)
    assert hold is not None and hold.reason == "desktop_active" and hold.kill
