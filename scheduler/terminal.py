"""The scheduler and its terminal: a ``serve`` started in the background of an interactive
shell (``dcp-scheduler serve ... &``) must not write over what the foreground draws there
(a worker's dashboard, an editor), so its output goes to a file instead.

The same question as the worker's ``detect`` output mode asks (dcp_worker/logs.py), asked
here of stderr: the scheduler may not import the worker (tests/test_layout.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

__all__ = ["detach_from_terminal", "in_terminal_background", "log_path"]


def in_terminal_background(fd: int = 2) -> bool:
    """Whether ``fd`` is a terminal whose foreground process group is not ours (we were
    started with ``&``, or moved there with ``bg``)."""
    if not os.isatty(fd):
        return False
    try:
        return os.tcgetpgrp(fd) != os.getpgrp()
    except OSError:
        return False


def log_path(db: Path) -> Path:
    """Where a backgrounded ``serve`` writes its logs: beside its database."""
    return db.with_name(db.name + ".log")


def detach_from_terminal(path: Path) -> None:
    """Say once, on stderr, that the logs go to ``path``; then point stderr, and stdout where
    it is a terminal, at ``path`` (appended, mode 0600).

    Raises:
        OSError: ``path`` cannot be opened.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.fchmod(fd, 0o600)
        notice = (
            "dcp-scheduler: in the background of this terminal; its output goes to "
            f"{path.resolve()}\n"
        )
        sys.stdout.flush()
        sys.stderr.flush()
        # A background write to a terminal with ``stty tostop`` stops the writer (SIGTTOU)
        # unless the signal is ignored: ignored, the one notice is written and we go on.
        previous = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        try:
            with contextlib.suppress(OSError):
                os.write(2, notice.encode())
        finally:
            signal.signal(signal.SIGTTOU, previous)
        for target in (1, 2):
            if os.isatty(target):
                os.dup2(fd, target)
    finally:
        os.close(fd)
