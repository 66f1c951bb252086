"""systemd integration: ``Type=notify`` readiness, STATUS lines and the watchdog.

Through systemd-python's :func:`systemd.daemon.notify` (sd_notify), only when systemd gave us a
``NOTIFY_SOCKET``. READY=1 is sent once the worker is connected to its scheduler (so ``systemctl
start`` returns when it can work), STATUS= whenever the one-line summary changes, WATCHDOG=1 at
half the ``WatchdogSec`` interval from the event loop itself (a stuck loop stops the pings and
systemd restarts the service), STOPPING=1 on a stop.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["Notifier", "status_line"]

log = logging.getLogger("dcp.worker.service")


def status_line(snapshot: Mapping[str, Any]) -> str:
    s = snapshot["statistics"]
    return (
        f"{snapshot['state']}: {s['running']} running, {s['slices_done']} done, "
        f"{s['slices_failed']} failed, {s['outbox']} to deliver, "
        f"{s['credits_earned']:.6f} credits"
    )


class Notifier:
    def __init__(self, env: Mapping[str, str] = os.environ) -> None:
        self.enabled = bool(env.get("NOTIFY_SOCKET"))
        self.watchdog: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if self.enabled and usec.isdigit() and int(usec) > 0 and pid in ("", str(os.getpid())):
            self.watchdog = int(usec) / 1e6
        self._notify: Callable[[str], Any] | None = None
        if self.enabled:
            try:
                from systemd import daemon
            except ImportError:
                log.warning(
                    "NOTIFY_SOCKET is set but systemd-python is not installed: "
                    "no readiness notification (pip install 'dcp-worker[systemd]')"
                )
                self.enabled = False
            else:
                self._notify = daemon.notify

    def send(self, *lines: str) -> None:
        if self._notify is not None:
            self._notify("\n".join(lines))

    async def run(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        """Until cancelled: READY once connected, STATUS on change, WATCHDOG pings."""
        if not self.enabled:
            return
        ready = False
        last = ""
        period = min(1.0, self.watchdog / 2) if self.watchdog else 1.0
        while True:
            snap = snapshot()
            line = status_line(snap)
            out = []
            if not ready and snap["statistics"]["connected"]:
                ready = True
                out.append("READY=1")
            if line != last:
                last = line
                out.append(f"STATUS={line}")
            if self.watchdog:
                out.append("WATCHDOG=1")
            if out:
                self.send(*out)
            await asyncio.sleep(period)
