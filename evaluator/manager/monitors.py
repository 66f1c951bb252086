"""Busy-machine monitors: small units fed by injectable readings, each naming its reason.

A monitor's :meth:`check` returns a :class:`Hold` while the machine should not run work, or
None. ``kill`` holds (a person is here, on battery, an exclusive program, outside the allowed
hours, other programs busy, the operator) stop running evaluators; the others (load, connection
rate) only refuse new ones. The manager (:mod:`.daemon`) polls them; tests feed them
readings directly.
"""

from __future__ import annotations

import glob
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "Hold",
    "LoadMonitor",
    "RateMonitor",
    "TtyMonitor",
    "OperatorMonitor",
    "BatteryMonitor",
    "ExclusiveProgramMonitor",
    "HoursMonitor",
    "CpuMonitor",
    "ScreensaverMonitor",
    "BusyPolicy",
]


@dataclass(frozen=True)
class Hold:
    """Why work is held. ``reason`` is a stable code; ``detail`` is for people."""

    reason: str
    detail: str
    kill: bool


def read_loadavg(path: str = "/proc/loadavg") -> float:
    with open(path) as fh:
        return float(fh.read().split()[0])


@dataclass
class LoadMonitor:
    """Refuse new evaluators while the 1-minute load average is above ``limit``."""

    limit: float
    read: Callable[[], float] = read_loadavg

    def check(self, now: float) -> Hold | None:
        load = self.read()
        if load > self.limit:
            return Hold("load_high", f"load average {load:.2f} is above {self.limit:g}", False)
        return None


@dataclass
class RateMonitor:
    """Refuse connections arriving faster than ``per_second`` (over a sliding second)."""

    per_second: float
    _times: deque[float] = field(default_factory=deque)

    def record(self, now: float) -> Hold | None:
        """Count a connection at ``now``; a Hold if it is one too many."""
        while self._times and now - self._times[0] > 1.0:
            self._times.popleft()
        if len(self._times) >= self.per_second:
            return Hold(
                "connection_rate",
                f"more than {self.per_second:g} evaluators requested per second",
                False,
            )
        self._times.append(now)
        return None


def pts_atimes(pattern: str = "/dev/pts/[0-9]*") -> Iterable[tuple[str, float]]:
    for path in glob.glob(pattern):
        try:
            yield path, os.stat(path).st_atime
        except OSError:
            continue


@dataclass
class TtyMonitor:
    """A person is at a terminal: some terminal's atime is within ``idle_seconds`` (DCP: 30 s
    polled every 3 s). Reading the atime of /dev/pts devices needs no privileges."""

    idle_seconds: float = 30.0
    read: Callable[[], Iterable[tuple[str, float]]] = pts_atimes

    def check(self, now: float) -> Hold | None:
        for path, atime in self.read():
            age = now - atime
            if age < self.idle_seconds:
                return Hold(
                    "user_active", f"terminal {path} was used {max(age, 0):.0f} s ago", True
                )
        return None


@dataclass
class OperatorMonitor:
    """The operator's hold: :meth:`toggle` (SIGUSR1) holds or releases; :meth:`kick`
    (SIGUSR2) stops running evaluators once without holding."""

    held: bool = False
    _kick: bool = False

    def toggle(self) -> None:
        self.held = not self.held

    def kick(self) -> None:
        self._kick = True

    def check(self, now: float) -> Hold | None:
        if self.held:
            return Hold("operator", "held by the operator (SIGUSR1 releases)", True)
        if self._kick:
            self._kick = False
            return Hold("operator_kick", "stopped once by the operator (SIGUSR2)", True)
        return None


def on_battery(root: str = "/sys/class/power_supply") -> bool:
    """True when a mains supply exists and none is online (BOINC's 'on batteries')."""
    mains = []
    for entry in glob.glob(os.path.join(root, "*")):
        try:
            kind = Path(entry, "type").read_text().strip()
            if kind == "Mains":
                mains.append(Path(entry, "online").read_text().strip() == "1")
        except OSError:
            continue
    return bool(mains) and not any(mains)


@dataclass
class BatteryMonitor:
    read: Callable[[], bool] = on_battery

    def check(self, now: float) -> Hold | None:
        if self.read():
            return Hold("on_battery", "the machine runs on battery", True)
        return None


def running_programs() -> set[str]:
    import psutil

    names = set()
    for proc in psutil.process_iter(["name"]):
        name = proc.info.get("name")
        if name:
            names.add(name)
    return names


@dataclass
class ExclusiveProgramMonitor:
    """Hold while any of ``names`` runs (a game, a video call: BOINC's exclusive apps)."""

    names: frozenset[str]
    read: Callable[[], set[str]] = running_programs

    def check(self, now: float) -> Hold | None:
        found = sorted(self.names & self.read())
        if found:
            return Hold("exclusive_program", f"{found[0]} is running", True)
        return None


def parse_window(text: str) -> tuple[int, int]:
    """``HH:MM-HH:MM`` as minutes of the day; the window may wrap past midnight.

    Raises:
        ValueError: not a window.
    """
    start, sep, end = text.partition("-")
    if not sep:
        raise ValueError(f"{text!r} is not HH:MM-HH:MM")

    def minutes(hhmm: str) -> int:
        hh, _, mm = hhmm.strip().partition(":")
        if not (hh.isdigit() and (mm == "" or mm.isdigit())):
            raise ValueError(f"{hhmm!r} is not a time of day")
        hours, mins = int(hh), int(mm or 0)
        value = hours * 60 + mins
        if mins > 59 or not 0 <= value <= 24 * 60:
            raise ValueError(f"{hhmm!r} is not a time of day")
        return value

    return minutes(start), minutes(end)


@dataclass
class HoursMonitor:
    """Run only within the given windows of local time (BOINC's time-of-day preferences)."""

    windows: tuple[tuple[int, int], ...]
    clock: Callable[[float], int] = lambda now: (lambda t: t.tm_hour * 60 + t.tm_min)(
        time.localtime(now)
    )

    def check(self, now: float) -> Hold | None:
        minute = self.clock(now)
        for start, end in self.windows:
            inside = start <= minute < end if start <= end else minute >= start or minute < end
            if inside:
                return None
        return Hold("outside_hours", "outside the hours this machine lends", True)


def screensaver_active() -> bool | None:
    """Whether the desktop's screensaver is on, asked over the session D-Bus
    (org.freedesktop.ScreenSaver.GetActive); None where there is no session bus or no
    screensaver service."""
    import shutil
    import subprocess

    if not os.environ.get("DBUS_SESSION_BUS_ADDRESS") or shutil.which("dbus-send") is None:
        return None
    try:
        out = subprocess.run(
            [
                "dbus-send",
                "--session",
                "--print-reply=literal",
                "--reply-timeout=1000",
                "--dest=org.freedesktop.ScreenSaver",
                "/org/freedesktop/ScreenSaver",
                "org.freedesktop.ScreenSaver.GetActive",
            ],
            capture_output=True,
            text=True,
            timeout=3,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_screensaver_reply(out.stdout) if out.returncode == 0 else None


def parse_screensaver_reply(text: str) -> bool | None:
    words = text.split()
    if "boolean" in words and words.index("boolean") + 1 < len(words):
        return words[words.index("boolean") + 1] == "true"
    return None


@dataclass
class ScreensaverMonitor:
    """On a desktop, a person is here while the screensaver is off (DCP stops work when it
    turns off). No session bus or no screensaver service: no hold."""

    read: Callable[[], bool | None] = screensaver_active

    def check(self, now: float) -> Hold | None:
        if self.read() is False:
            return Hold("desktop_active", "the screensaver is off: someone uses the desktop", True)
        return None


def other_cpu_percent() -> float:
    """CPU use of the whole machine, in percent of all cores (since the last call)."""
    import psutil

    return float(psutil.cpu_percent(interval=None))


@dataclass
class CpuMonitor:
    """Hold while other programs use more than ``busy`` percent of the CPU; resume only when
    they use less than ``resume`` percent (hysteresis: no flapping around one threshold).
    ``read`` returns the CPU use of everything but our evaluators."""

    busy: float
    resume: float
    read: Callable[[], float] = other_cpu_percent
    _holding: bool = False

    def check(self, now: float) -> Hold | None:
        use = self.read()
        if self._holding and use < self.resume:
            self._holding = False
        elif not self._holding and use > self.busy:
            self._holding = True
        if self._holding:
            return Hold("cpu_busy", f"other programs use {use:.0f}% of the CPU", True)
        return None


@dataclass
class BusyPolicy:
    """When the machine is too busy for evaluators: every monitor, polled together (not to be
    confused with the job policy of dcp_protocol.policy: who may run what, at what price)."""

    monitors: list[
        LoadMonitor
        | TtyMonitor
        | OperatorMonitor
        | BatteryMonitor
        | ExclusiveProgramMonitor
        | HoursMonitor
        | CpuMonitor
    ]

    def holds(self, now: float) -> list[Hold]:
        found = []
        for monitor in self.monitors:
            try:
                hold = monitor.check(now)
            except OSError as exc:  # a reading that fails must not hold or crash the manager
                hold = None
                del exc
            if hold is not None:
                found.append(hold)
        return found
