"""A scheduler subprocess on loopback: the embedded default of ``make demo``, and a fixture for
tests and benchmarks.

    with LocalScheduler(Path("scheduler.db")) as local:
        client = ComputeClient(local.url, identity)
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path
from types import TracebackType

__all__ = ["LocalScheduler"]


class LocalScheduler:
    """Start ``dcp-scheduler serve`` and learn its URL from the first line it prints.

    Args:
        db: the database: a SQLite file, or a PostgreSQL URL.
        extra: more ``serve`` options (e.g. ``--lease-timeout 5``).
        listen: HOST:PORT; port 0 (the default) picks a free port.
        log: where its logs go (verbose); None discards them.
        state_dir: ``serve --state-dir`` (the console token; for PostgreSQL, by default the
            log's directory).
    """

    def __init__(
        self,
        db: Path | str,
        *extra: str,
        listen: str = "127.0.0.1:0",
        log: Path | None = None,
        state_dir: Path | None = None,
    ) -> None:
        self.db = db
        self.log = log
        verbose = ["-v"] if log is not None else []
        if state_dir is None and log is not None and str(db).startswith("postgres"):
            state_dir = log.parent
        if state_dir is not None:
            extra = ("--state-dir", str(state_dir), *extra)
        with open(log or "/dev/null", "a") as sink:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "scheduler",
                    *verbose,
                    "serve",
                    "--db",
                    str(db),
                    "--listen",
                    listen,
                    *extra,
                ],
                stdout=subprocess.PIPE,
                stderr=sink,
                text=True,
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.search(r"listening on (\S+)", line)
        if not match:
            self.proc.kill()
            self.proc.wait()
            self.proc.stdout.close()
            detail = log.read_text()[-2000:] if log is not None else ""
            raise RuntimeError(f"the scheduler did not start: {line.strip()!r} {detail}")
        self.url: str = match.group(1)
        self.ws_url = self.url.replace("http://", "ws://") + "/worker"

    def stop(self, timeout: float = 15.0) -> int:
        """SIGINT, then SIGKILL after ``timeout``; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode

    def __enter__(self) -> LocalScheduler:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
