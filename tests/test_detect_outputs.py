"""`-o detect` picks the dashboard only for a worker in its terminal's foreground: one started
in the background (`dcp-worker ... &`, as the README does) was stopped by the terminal."""

from __future__ import annotations

import os
import pty
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from dcp_worker.logs import JOURNAL_SOCKET, detect_outputs

from .conftest import Keystore, command


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


def test_detect_under_systemd_is_the_journal_where_journald_listens(tmp_path: Path) -> None:
    unit = {"INVOCATION_ID": "0123456789abcdef"}
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as journald:
        journald.bind(str(tmp_path / "socket"))
        assert detect_outputs(("detect",), unit, True, str(tmp_path / "socket")) == ("journal",)
    # No journald (a container's systemd, say): the unit's stderr, wherever it goes.
    assert detect_outputs(("detect",), unit, True, str(tmp_path / "none")) == ("console",)
    assert detect_outputs(("detect",), {}, False, str(tmp_path / "socket")) == ("console",)


@pytest.mark.skipif(os.path.exists(JOURNAL_SOCKET), reason="journald listens on this machine")
def test_journal_output_without_journald_is_an_error_at_start(
    tmp_path: Path, make_keystore: Callable[[str], Keystore]
) -> None:
    """As syslog to a socket nobody reads: exit 2 naming why, before anything starts (the
    journal's sender dropped every line without a word)."""
    keystore = make_keystore("w")
    out = subprocess.run(
        [
            command("dcp-worker"),
            "-o",
            "journal",
            "--identity",
            str(keystore.path),
            "--passphrase-file",
            str(keystore.passphrase_file),
            "--scheduler",
            "http://127.0.0.1:9",
            "--state-dir",
            str(tmp_path / "state"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2, out.stderr
    assert f"output journal: no journald listens on {JOURNAL_SOCKET}" in out.stderr
    assert not (tmp_path / "state").exists()
