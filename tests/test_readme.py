"""The README's "Using it by hand", typed as written into an interactive shell on a
pseudo-terminal, from the checkout, with a HOME of its own: every command must work, the job's
results come back, the worker says it is connected, and nothing is stopped by the terminal."""

from __future__ import annotations

import os
import re
import shutil
import socket
from pathlib import Path

import pexpect
import pytest

from .conftest import ROOT

PROMPT = "README-PROMPT> "


def _commands() -> list[str]:
    """The shell block of "Using it by hand", one entry per command (continued lines joined
    with their newlines, as a user types them); comment-only lines are dropped."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Using it by hand", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    commands, current = [], ""
    for line in block.splitlines():
        if not current and line.strip().startswith("#"):
            continue
        current += line + "\n"
        if not line.endswith("\\"):
            commands.append(current)
            current = ""
    return commands


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.timeout(600)
def test_the_readme_by_hand_runs_as_typed_in_an_interactive_shell(tmp_path: Path) -> None:
    if not _port_free(8500):
        pytest.fail("port 8500, which the README uses, is taken on this machine")
    home = tmp_path / "home"
    home.mkdir()
    env = {
        "HOME": str(home),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "TERM": "xterm",
        "TMPDIR": str(tmp_path),
        "PS1": PROMPT,
        "PS2": "",
        "LANG": "C.UTF-8",
    }
    bash = shutil.which("bash")
    assert bash is not None
    shell = pexpect.spawn(
        bash,
        ["--norc", "--noprofile", "-i"],
        cwd=str(ROOT),
        env=env,
        encoding="utf-8",
        codec_errors="replace",
        dimensions=(50, 160),
        timeout=300,
    )
    transcript: list[str] = []
    try:
        shell.expect_exact(PROMPT)
        for command in _commands():
            shell.send(command)
            shell.expect_exact(PROMPT)
            transcript.append(command + shell.before)
        shell.sendline("echo README-JOBS $(jobs | wc -l)")
        shell.expect(r"README-JOBS (\d+)")
        jobs_left = int(shell.match.group(1))
    finally:
        out = "".join(transcript)
        (tmp_path / "transcript.txt").write_text(out)
        shell.close(force=True)
    assert "Stopped" not in out, out[-3000:]
    assert "command not found" not in out and "No such file" not in out, out[-3000:]
    results = re.findall(r'\{"slice": ?\d+', out)
    assert len(results) == 12, out[-3000:]  # the hash puzzle's 12 results, in slice order
    assert "connected to http://127.0.0.1:8500" in out, out[-3000:]
    assert jobs_left == 0, out[-3000:]  # the worker and the scheduler ended
