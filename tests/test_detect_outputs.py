"""`-o detect` picks the dashboard only for a worker in its terminal's foreground: one started
in the background (`dcp-worker ... &`, as the README does) was stopped by the terminal."""

from __future__ import annotations

import os
import pty
import sys

import pytest

from dcp_worker.logs import detect_outputs


def _detect_on_a_terminal(background: bool) -> str:
    """What ``detect`` picks in a process whose stdin and stdout are a terminal, in its
    foreground process group or (``background``) another one."""
    pid, fd = pty.fork()
    if pid == 0:  # a session leader with the pty as its terminal, in the foreground
        try:
            # pytest captures sys.stdin and sys.stdout: look at the real descriptors.
            sys.stdin = open(0, closefd=False)
            sys.stdout = open(1, "w", closefd=False)
            if background:
                child = os.fork()
                if child:
                    os.waitpid(child, 0)
                    os._exit(0)
                os.setpgid(0, 0)  # a job of its own, not the terminal's foreground one
            print("detect:", ",".join(detect_outputs(("detect",), env={})), flush=True)
        finally:
            os._exit(0)
    out = b""
    while True:
        try:
            chunk = os.read(fd, 1024)
        except OSError:  # the terminal closed: the child is done
            break
        if not chunk:
            break
        out += chunk
    os.waitpid(pid, 0)
    os.close(fd)
    line = next(x for x in out.decode().splitlines() if x.startswith("detect:"))
    return line.removeprefix("detect: ").strip()


@pytest.mark.parametrize(("background", "expected"), [(False, "dashboard"), (True, "console")])
def test_the_dashboard_only_in_the_foreground(background: bool, expected: str) -> None:
    assert _detect_on_a_terminal(background) == expected
