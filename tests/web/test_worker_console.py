"""The worker's page in a real headless browser, against a real scheduler and worker: the
page loads with the token, its numbers are the control socket's, its buttons act, and a
request without the token is refused with its reason."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Page, expect

from dcp_worker.config import ConfigError, WorkerConfig
from dcp_worker.earnings import BalanceReader
from dcp_worker.web import read_token, write_token
from scheduler.client import ComputeClient

from ..conftest import Keystore, SchedulerProcess, WorkerProcess, command, wait_for
from ..test_pipeline import ECHO, PUZZLE, counts, job_file
from ..test_policy import admin
from .conftest import SHOTS


def _status(sock: Path) -> dict[str, Any]:
    """The control socket's status, asked over a plain socket (Playwright's sync API holds
    this thread's event loop)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(sock))
        s.sendall(b'{"cmd": "status"}\n')
        with s.makefile("rb") as lines:
            reply: dict[str, Any] = json.loads(lines.readline())["status"]
    return reply


def test_the_worker_page_shows_the_workers_numbers_and_its_buttons_act(
    tmp_path: Path,
    page: Page,
    scheduler: SchedulerProcess,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    owner, worker_key = make_keystore("owner"), make_keystore("worker")
    admin(scheduler.db, "bank", "mint", owner.identity.address, "10")
    state = tmp_path / "worker-state"
    sock = state / "control.sock"
    worker = workers(scheduler.url, worker_key, 2, "--console-port", "0", state_dir=state)
    wait_for(lambda: sock.exists() and _status(sock)["statistics"]["connected"], timeout=60)

    # The token file: readable by the worker's user and group only; never in the log.
    token_file = state / "console.token"
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o640
    token = token_file.read_text().strip()
    url = subprocess.run(
        [command("dcp-worker"), "--state-dir", str(state), "console-url"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    base = _status(sock)["console"]
    assert url == f"{base}?token={token}" and base.startswith("http://127.0.0.1:")

    with ComputeClient(scheduler.url, owner.identity) as client:
        job = client.deploy(
            job_file(tmp_path, "echo", ECHO, [f"d{i}" for i in range(6)], offer=0.01)
        )
        assert [r.state for r in client.results(job, wait=True, timeout=120)] == ["done"] * 6
    lifetime = scheduler_balance(scheduler.url, worker_key.identity.address)
    assert lifetime > 0
    wait_for(
        lambda: (
            _status(sock)["statistics"]["results_accepted"] == 6
            and _status(sock)["earnings"]["lifetime"] == lifetime
        ),
        timeout=60,
    )
    assert token not in worker.output()

    # Loaded with the token: it moves into an HttpOnly, SameSite=Strict cookie and leaves
    # the address.
    page.goto(url)
    assert page.url == base
    (cookie,) = page.context.cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["value"] == token
    snap = json.loads(
        subprocess.run(
            [command("dcp-worker"), "--state-dir", str(state), "status", "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    )
    s = snap["statistics"]
    expect(page.locator("#slices-done")).to_have_text(str(s["slices_done"]))
    expect(page.locator("#slices-failed")).to_have_text(str(s["slices_failed"]))
    expect(page.locator("#earned-session")).to_have_text(f"{s['credits_earned']:.6f}")
    expect(page.locator("#earned-lifetime")).to_have_text(f"{lifetime:.6f}")
    (tally,) = snap["jobs"]
    expect(page.locator(f"#job-{job} .credits")).to_have_text(f"{tally['credits']:.6f}")
    assert tally["accepted"] == 6 and tally["credits"] == s["credits_earned"]
    expect(page.locator("table.history tbody tr")).to_have_count(6)
    expect(page.locator("tr.sandbox")).to_have_count(2)
    api = page.request.get(f"{base}api/status").json()
    assert api["statistics"]["slices_done"] == s["slices_done"]
    assert api["earnings"]["lifetime"] == lifetime
    page.screenshot(path=str(SHOTS / "worker-console-finished.png"), full_page=True)

    # The buttons act: the control socket sees it.
    page.locator("#btn-pause").click()
    wait_for(lambda: _status(sock)["state"] == "paused")
    expect(page.locator("#state")).to_have_text("paused")
    page.locator("#btn-resume").click()
    wait_for(lambda: _status(sock)["state"] != "paused")
    page.locator(f"#job-{job} button").click()
    wait_for(lambda: _status(sock)["paused_jobs"] == [job])
    expect(page.locator(f"#job-{job} button")).to_have_text("Resume job")
    page.locator("#btn-snooze").click()
    wait_for(lambda: _status(sock)["state"] == "snoozed")
    expect(page.locator("#message")).to_have_text("snooze: done")
    page.screenshot(path=str(SHOTS / "worker-console-snoozed.png"), full_page=True)
    page.locator("#btn-resume").click()
    page.locator("#btn-finish").click()
    wait_for(lambda: _status(sock)["finishing"])

    # Without the token, or from another site, every request is refused with its reason.
    with httpx.Client() as plain:
        for path in ("", "api/status", "live", "static/worker.js"):
            refused = plain.get(f"{base}{path}")
            assert refused.status_code == 401
            assert "refused: no console token" in refused.json()["error"]
        wrong = plain.get(f"{base}?token=guess")
        assert wrong.status_code == 401 and "wrong console token" in wrong.json()["error"]
    with httpx.Client(cookies={"dcp_worker_console": token}) as holder:
        forged = holder.post(f"{base}api/resume", headers={"Origin": "http://evil.example"})
        assert forged.status_code == 403 and "cross-site" in forged.json()["error"]
        no_origin = holder.post(f"{base}api/resume")
        assert no_origin.status_code == 403 and "Origin" in no_origin.json()["error"]
        rebound = holder.get(f"{base}api/status", headers={"Host": "evil.example:80"})
        assert rebound.status_code == 421 and "answers to" in rebound.json()["error"]
        bad = page.request.post(
            f"{base}api/snooze",
            data=json.dumps({"seconds": "soon"}),
            headers={"Origin": base.rstrip("/")},
        )
        assert bad.status == 400 and '"seconds": a number' in bad.json()["error"]
        deep = holder.post(
            f"{base}api/snooze",
            content=b'{"seconds": ' + b"[" * 20_000 + b"]" * 20_000 + b"}",
            headers={"Origin": base.rstrip("/")},
        )  # was a 500 from RecursionError in aiohttp's request.json()
        assert deep.status_code == 400 and "nests deeper than 64" in deep.json()["error"]
    assert _status(sock)["finishing"]  # nothing refused acted

    # A snooze ends by itself at its deadline.
    origin = {"Origin": base.rstrip("/")}
    assert page.request.post(f"{base}api/snooze", data='{"seconds": 0.5}', headers=origin).ok
    assert _status(sock)["state"] == "snoozed"
    wait_for(lambda: _status(sock)["state"] not in ("snoozed", "paused"))

    # The same keys from the command line.
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [command("dcp-worker"), "--state-dir", str(state), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert cli("snooze", "1h30m").returncode == 0
    assert _status(sock)["state"] == "snoozed" and _status(sock)["snooze_left"] > 5000
    text = cli("status").stdout
    assert "snoozed" in text and f"lifetime {lifetime:.6f}" in text
    assert cli("resume-job", job).returncode == 0 and _status(sock)["paused_jobs"] == []
    assert cli("pause-job", job).returncode == 0 and _status(sock)["paused_jobs"] == [job]
    assert cli("resume").returncode == 0 and _status(sock)["state"] != "snoozed"
    assert cli("finish").returncode == 0 and _status(sock)["finishing"]
    bad = cli("snooze", "soon")
    assert bad.returncode == 2 and "not a duration" in bad.stderr
    assert worker.stop() == 0


def scheduler_balance(url: str, address: str) -> float:
    with httpx.Client() as client:
        reply = client.get(f"{url}/api/v1/accounts/{address}")
        reply.raise_for_status()
        return float(reply.json()["balance"])


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1", "example.org"])
def test_a_console_off_loopback_is_refused_unless_allowed(host: str) -> None:
    with pytest.raises(ConfigError, match="console_host must be a loopback address"):
        WorkerConfig(console_port=0, console_host=host).validate()
    WorkerConfig(console_port=0, console_host=host, console_allow_remote=True).validate()


def test_lifetime_earnings_of_an_unreachable_scheduler_are_unknown() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    reader = BalanceReader(f"ws://127.0.0.1:{port}", "0x" + "11" * 20)
    assert reader.url == f"http://127.0.0.1:{port}/api/v1/accounts/0x" + "11" * 20

    async def read() -> None:
        async with httpx.AsyncClient(timeout=5) as client:
            await reader.read_once(client)

    # In a thread of its own: the browser's (Playwright's) event loop holds this one.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, read()).result(timeout=30)
    assert reader.balance.value is None and "ConnectError" in reader.balance.error


def test_the_token_file_is_for_the_workers_user_and_group(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        first = write_token(tmp_path / "console.token")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "console.token").st_mode) == 0o640
    second = write_token(tmp_path / "console.token")
    assert first != second and read_token(tmp_path / "console.token") == second
    assert len(second) >= 43  # 256 bits


def test_pause_job_on_the_page_gives_its_queued_slices_back_and_takes_no_more(
    tmp_path: Path,
    page: Page,
    scheduler: SchedulerProcess,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    owner = make_keystore("owner")
    state = tmp_path / "worker-state"
    sock = state / "control.sock"
    workers(
        scheduler.url,
        make_keystore("worker"),
        1,
        "--console-port",
        "0",
        "--prefetch",
        "3",
        state_dir=state,
    )
    wait_for(lambda: sock.exists() and _status(sock)["statistics"]["connected"], timeout=60)
    prefixes = [f"p{i}" for i in range(3)]
    with ComputeClient(scheduler.url, owner.identity) as client:
        job = client.deploy(job_file(tmp_path, "puzzle", PUZZLE, prefixes, ["22"], attempts=1))

        def working() -> bool:
            snap = _status(sock)
            box = snap["sandboxes"][0]
            progress = box["state"] == "working" and box["progress"]
            return bool(progress and progress > 0.2 and snap["statistics"]["queued"])

        wait_for(working, timeout=60)
        base = _status(sock)["console"]
        page.goto(f"{base}?token={(state / 'console.token').read_text().strip()}")
        expect(page.locator("#sandbox-0 progress")).to_have_attribute("max", "100")
        page.screenshot(path=str(SHOTS / "worker-console-working.png"), full_page=True)
        page.locator(f"#job-{job} button").click()
        wait_for(lambda: _status(sock)["paused_jobs"] == [job])

        def given_back() -> bool:
            snap = _status(sock)
            leased = counts(scheduler.db, job).get("leased", 0)
            return (
                snap["statistics"]["queued"] == 0
                and snap["statistics"]["running"] == 0
                and (leased == 0)
            )

        wait_for(given_back, timeout=60)
        ran = _status(sock)["statistics"]["slices_done"]
        assert ran < len(prefixes)  # the rest waits at the scheduler, not taken
        assert counts(scheduler.db, job)["queued"] == len(prefixes) - ran
        expect(page.locator(f"#job-{job} button")).to_have_text("Resume job")
        page.locator(f"#job-{job} button").click()
        results = list(client.results(job, wait=True, timeout=120))
    assert [r.state for r in results] == ["done"] * len(prefixes)
    assert _status(sock)["statistics"]["slices_done"] == len(prefixes)
