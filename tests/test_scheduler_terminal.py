"""``dcp-scheduler serve`` and its terminal (issue 16): in the background of an interactive
shell it writes nothing over the terminal but one notice, its output going to a file beside
its database (0600); in the foreground it logs to the terminal as before. Typed into a real
interactive bash on a pseudo-terminal, as tests/test_readme.py does."""

from __future__ import annotations

import os
import shutil
import stat
import sys
from pathlib import Path

import pexpect
import pytest

from .conftest import BIN, ROOT, wait_for

PROMPT = "TERMINAL-PROMPT> "

pytestmark = pytest.mark.timeout(120)

#: Opens a worker session, reads its hello, closes it.
SESSION = (
    "import asyncio, sys, websockets\n"
    "async def main():\n"
    "    async with websockets.connect(sys.argv[1]) as ws:\n"
    "        await ws.recv()\n"
    "asyncio.run(main())"
)


def _shell(tmp_path: Path) -> pexpect.spawn:
    bash = shutil.which("bash")
    assert bash is not None
    env = {
        "HOME": str(tmp_path),
        "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "TERM": "xterm",
        "PS1": PROMPT,
        "PS2": "",
        "LANG": "C.UTF-8",
    }
    shell = pexpect.spawn(
        bash,
        ["--norc", "--noprofile", "-i"],
        cwd=str(tmp_path),
        env=env,
        encoding="utf-8",
        codec_errors="replace",
        dimensions=(50, 160),
        timeout=60,
    )
    shell.expect_exact(PROMPT)
    return shell


def test_a_backgrounded_serve_writes_its_output_to_a_file_not_the_terminal(
    tmp_path: Path,
) -> None:
    log = tmp_path / "scheduler.db.log"
    shell = _shell(tmp_path)
    transcript = ""
    try:
        # stty tostop: a background write to the terminal would stop the scheduler.
        serve = "dcp-scheduler -v serve --db scheduler.db --listen 127.0.0.1:0"
        shell.sendline(f"stty tostop; {serve} &")
        shell.expect_exact("its output goes to " + str(log))
        transcript += shell.before + shell.after
        wait_for(lambda: log.exists() and "web console:" in log.read_text())
        url = log.read_text().split("listening on ", 1)[1].split()[0]
        # A worker session that opens and closes makes the scheduler log (at -v): to the
        # file, not over the terminal.
        ws = url.replace("http://", "ws://") + "/worker"
        shell.sendline(f"{sys.executable} -c '{SESSION}' {ws}")
        shell.expect_exact(PROMPT)
        shell.sendline("echo TERMINAL-JOBS $(jobs -s | wc -l) stopped")
        shell.expect(r"TERMINAL-JOBS (\d+) stopped")
        stopped = int(shell.match.group(1))
        transcript += shell.before
        shell.sendline("kill -INT %1; wait %1; echo TERMINAL-EXIT $?")
        shell.expect(r"TERMINAL-EXIT (\d+)")
        transcript += shell.before
        status = int(shell.match.group(1))
    finally:
        shell.close(force=True)
    assert stopped == 0 and "Stopped" not in transcript, transcript
    assert status == 0, transcript
    written = log.read_text()
    assert "listening on" in written and "dcp.scheduler INFO" in written
    assert "listening on" not in transcript and "dcp.scheduler" not in transcript, transcript
    assert transcript.count("its output goes to") == 1
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


def test_a_foreground_serve_logs_to_its_terminal(tmp_path: Path) -> None:
    shell = _shell(tmp_path)
    try:
        shell.sendline("dcp-scheduler -v serve --db scheduler.db --listen 127.0.0.1:0")
        shell.expect(r"listening on (http://\S+)")
        shell.sendintr()
        shell.expect_exact(PROMPT)
        output = shell.before
    finally:
        shell.close(force=True)
    assert "its output goes to" not in output
    assert not (tmp_path / "scheduler.db.log").exists()
    assert ROOT.exists()
