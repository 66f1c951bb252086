"""Running the worker as operators do: control socket and `dcp-worker status`, sd_notify
against a socket the test owns, logs to several outputs at once, Prometheus metrics."""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dcp_worker.logs import Rfc5424Formatter
from scheduler.client import ComputeClient

from .conftest import Keystore, SchedulerProcess, WorkerProcess, command, wait_for
from .test_pipeline import ECHO, PUZZLE, job_file


def ctl(sock: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [command("dcp-worker"), *args, "--socket", str(sock)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def _lines(sock: socket.socket, n: int) -> list[bytes]:
    data = b""
    while data.count(b"\n") < n:
        chunk = sock.recv(65536)
        assert chunk, "the control socket closed early"
        data += chunk
    return data.split(b"\n")[:n]


def test_control_socket_status_pause_resume_stop(
    tmp_path: Path,
    scheduler: SchedulerProcess,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    keystore = make_keystore("w")
    state = tmp_path / "state-with-a-rather-long-name" / ("deep" * 20)  # > 108 bytes
    # JSON frames: the checks below read the frames in the wire log (-vv), which shows a
    # MessagePack frame as hex, cut in its middle.
    worker = workers(
        scheduler.url, keystore, 2, state_dir=state, env={"DCP_WORKER_JSON_FRAMES": "1"}
    )
    sock = state / "control.sock"
    wait_for(lambda: "connected to" in worker.output(), 30)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o660
    out = ctl(sock, "status")
    assert out.returncode == 0, out.stderr
    assert keystore.identity.address in out.stdout and "(connected)" in out.stdout
    snap = json.loads(ctl(sock, "status", "--json").stdout)
    assert snap["statistics"]["connected"] and len(snap["sandboxes"]) == 2

    assert ctl(sock, "pause").returncode == 0
    assert json.loads(ctl(sock, "status", "--json").stdout)["state"] == "paused"
    with ComputeClient(scheduler.url, make_keystore("owner").identity) as client:
        job = client.deploy(job_file(tmp_path, "echo", ECHO, ["a", "b"]))

        def while_paused() -> str:
            log = worker.output()
            start = log.index("paused: no new slices until resumed\n")
            end = log.find("WARNING resumed\n", start)
            return log[start : end if end >= 0 else len(log)]

        # The long poll parked before the pause ends: woken by the deploy, its slices go
        # straight back (or, had it just expired, it came back empty). Either way the
        # worker's last chance to take the job while paused has passed.
        wait_for(
            lambda: (
                '"status":"returned 2"' in while_paused()
                or re.search(r'< TEXT \'\{"type":"work","re":\d+,"slices":\[\]', while_paused())
                is not None
            ),
            30,
        )
        assert client.status(job)["counts"] == {"queued": 2}
        assert ctl(sock, "resume").returncode == 0
        assert [r.state for r in client.results(job, wait=True, timeout=30)] == ["done"] * 2
    paused = while_paused()
    assert "resumed" not in paused.partition("\n")[2]  # the window ends at the resume
    # Nothing fetched, nothing ran while paused.
    assert '> TEXT \'{"type":"fetch"' not in paused and "running slice" not in paused

    # Someone else's lines: clear refusals, and the socket keeps serving.
    directory = os.open(sock.parent, os.O_PATH)
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(f"/proc/self/fd/{directory}/control.sock")
            s.sendall(b'{"cmd": "format-disk"}\nnot json\n{"cmd": "status"}\n')
            replies = [json.loads(line) for line in _lines(s, 3)]
    finally:
        os.close(directory)
    assert "unknown command 'format-disk'" in replies[0]["error"]
    assert replies[1] == {"ok": False, "error": 'expected a JSON object with "cmd"'}
    assert replies[2]["ok"] and replies[2]["status"]["state"] == "fetching"

    assert ctl(sock, "stop").returncode == 0
    assert worker.proc.wait(30) == 0
    assert not sock.exists()
    out = ctl(sock, "status")
    assert out.returncode == 2 and "no worker control socket" in out.stderr


def test_stale_socket_is_replaced_and_a_live_one_is_not(
    tmp_path: Path,
    scheduler: SchedulerProcess,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    keystore = make_keystore("w")
    shared = tmp_path / "ctl.sock"
    first = workers(scheduler.url, keystore, 1, "--control-socket", str(shared))
    wait_for(lambda: "connected to" in first.output(), 30)
    second = workers(
        scheduler.url,
        make_keystore("w2"),
        1,
        "--control-socket",
        str(shared),
        state_dir=tmp_path / "other-state",
    )
    assert second.proc.wait(30) == 2
    assert f"another worker answers on {shared}" in second.output()
    first.proc.kill()  # leaves the socket file behind
    first.proc.wait()
    assert shared.exists()
    third = workers(scheduler.url, keystore, 1, "--control-socket", str(shared))
    wait_for(lambda: "connected to" in third.output(), 30)
    assert ctl(shared, "status").returncode == 0
    assert third.stop() == 0


def test_sd_notify_ready_status_watchdog_stopping(
    tmp_path: Path,
    scheduler: SchedulerProcess,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
    monkeypatch,  # type: ignore[no-untyped-def]
) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sd:
        sd.bind(str(path))
        sd.settimeout(30)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.setenv("WATCHDOG_USEC", "400000")
        worker = workers(scheduler.url, make_keystore("w"), 1)
        messages: list[str] = []
        while not any("READY=1" in m for m in messages):
            messages.append(sd.recv(4096).decode())
        ready = next(m for m in messages if "READY=1" in m)
        assert "connected to" in worker.output()  # READY only once connected
        # READY comes with the first status line: the worker's state and its counts.
        assert re.search(r"^STATUS=(fetching|working): \d+ running, \d+ done", ready, re.M), ready
        pings = time.monotonic()
        watchdogs = 0
        while time.monotonic() - pings < 1.0:
            watchdogs += sd.recv(4096).decode().count("WATCHDOG=1")
        assert watchdogs >= 3  # every 0.2 s: half of WatchdogSec
        worker.proc.send_signal(signal.SIGTERM)
        rest = []
        while not any("STOPPING=1" in m for m in rest):
            rest.append(sd.recv(4096).decode())
        assert worker.proc.wait(30) == 0


def test_logs_go_to_several_outputs_and_logfile_reopens_on_sighup(
    tmp_path: Path,
    scheduler: SchedulerProcess,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(30)
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    tcp.settimeout(30)
    logfile = tmp_path / "w.log"
    worker = workers(
        scheduler.url,
        make_keystore("w"),
        1,
        "-o",
        "logfile,syslog",
        "--logfile",
        str(logfile),
        "--syslog-transport",
        "udp",
        "--syslog-address",
        f"127.0.0.1:{udp.getsockname()[1]}",
        "--syslog-facility",
        "local3",
    )
    wait_for(lambda: logfile.exists() and "connected to" in logfile.read_text(), 30)
    assert "connected to" in worker.output()  # the console (-o console from the fixture) too
    datagram = b""
    while b"connected to" not in datagram:
        datagram = udp.recv(65536)
    # <PRI> = facility local3 (19) * 8 + notice (5), then RFC 5424's header.
    message = rfc5424(datagram)
    assert (message["pri"], message["procid"]) == (157, worker.proc.pid), datagram
    # logrotate: move the file away, SIGHUP, and the worker writes a new one.
    logfile.rename(tmp_path / "w.log.1")
    worker.proc.send_signal(signal.SIGHUP)
    wait_for(logfile.exists, 10)  # reopened under its name
    worker.proc.send_signal(signal.SIGINT)
    assert worker.proc.wait(30) == 0
    assert "graceful stop" in logfile.read_text()
    assert "graceful stop" not in (tmp_path / "w.log.1").read_text()
    udp.close()
    tcp.close()


_RFC5424 = re.compile(
    rb"<(?P<pri>\d{1,3})>1 (?P<time>\S+) (?P<host>\S+) (?P<app>\S+) (?P<procid>\d+) "
    rb"(?P<msgid>\S+) (?P<sd>-|\[.*?\]) (?P<msg>.*)",
    re.DOTALL,
)


def rfc5424(message: bytes) -> dict[str, Any]:
    """An RFC 5424 message's fields (it fails the test if the message is not one)."""
    match = _RFC5424.fullmatch(message)
    assert match is not None, message
    fields: dict[str, Any] = {k: v.decode() for k, v in match.groupdict().items()}
    fields["pri"], fields["procid"] = int(fields["pri"]), int(fields["procid"])
    fields["time"] = datetime.datetime.fromisoformat(fields["time"])
    return fields


def _worker_logging_to_syslog(
    tmp_path: Path, keystore: Keystore, *syslog: str
) -> subprocess.Popen[bytes]:
    """A worker that cannot reach its scheduler (at :9), so it logs its retries."""
    return subprocess.Popen(
        [
            command("dcp-worker"),
            *("-o", "syslog", "--syslog-facility", "local3", *syslog),
            *("--identity", str(keystore.path), "--passphrase-file", str(keystore.passphrase_file)),
            *("--scheduler", "http://127.0.0.1:9", "--state-dir", str(tmp_path / "s")),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_syslog_messages_carry_their_time_and_host(
    tmp_path: Path, make_keystore: Callable[[str], Keystore]
) -> None:
    """Over UDP a collector elsewhere gets RFC 5424 (time, host, app, pid), no NUL; the local
    socket gets syslog(3)'s local form, which journald and rsyslog read there."""
    keystore = make_keystore("w")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        udp.settimeout(30)
        before = datetime.datetime.now(datetime.UTC)
        proc = _worker_logging_to_syslog(
            tmp_path,
            keystore,
            *(
                "--syslog-transport",
                "udp",
                "--syslog-address",
                f"127.0.0.1:{udp.getsockname()[1]}",
            ),
        )
        try:
            datagram = b""
            while b"retrying in" not in datagram:
                datagram = udp.recv(65536)
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(30)
    message = rfc5424(datagram)
    assert message["pri"] == 19 * 8 + 4  # local3, warning
    assert before - datetime.timedelta(seconds=1) <= message["time"]
    assert message["time"] <= datetime.datetime.now(datetime.UTC)
    assert message["time"].utcoffset() == datetime.timedelta(0)
    assert message["host"] == socket.gethostname()
    assert (message["app"], message["procid"]) == ("dcp-worker", proc.pid)
    assert (message["msgid"], message["sd"]) == ("-", "-")
    assert message["msg"].startswith("cannot connect to ws://127.0.0.1:9/worker")
    assert not datagram.endswith(b"\x00")

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as local:
        local.bind(str(tmp_path / "log"))
        local.settimeout(30)
        proc = _worker_logging_to_syslog(
            tmp_path, keystore, "--syslog-address", str(tmp_path / "log")
        )
        try:
            datagram = b""
            while b"retrying in" not in datagram:
                datagram = local.recv(65536)
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(30)
    match = re.fullmatch(
        rb"<156>(?P<stamp>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d) dcp-worker\[(?P<pid>\d+)\]: "
        rb"cannot connect to .*retrying in [\d.]+ s",
        datagram,
    )
    assert match is not None, datagram  # and no NUL at the end
    assert int(match["pid"]) == proc.pid
    time.strptime(match["stamp"].decode(), "%b %d %H:%M:%S")  # English month, as syslog(3)


def test_rfc5424_over_a_stream_is_one_line_a_message() -> None:
    """TCP frames messages by newlines (RFC 6587): a traceback must not become many."""
    formatter = Rfc5424Formatter("a host\x7f", lines=True)
    record = logging.LogRecord("dcp.worker", logging.ERROR, __file__, 1, "two\nlines", None, None)
    line = formatter.format(record)
    assert line.endswith("two#012lines\n") and line.count("\n") == 1
    assert rfc5424(b"<11>" + line[:-1].encode())["host"] == "ahost"
    assert rfc5424(b"<11>" + Rfc5424Formatter("").format(record).encode())["host"] == "-"


def test_syslog_over_tcp_and_a_missing_socket_is_a_clear_error(
    tmp_path: Path, make_keystore: Callable[[str], Keystore]
) -> None:
    keystore = make_keystore("w")
    base = [
        command("dcp-worker"),
        "--identity",
        str(keystore.path),
        "--passphrase-file",
        str(keystore.passphrase_file),
        "--scheduler",
        "http://127.0.0.1:9",
        "--state-dir",
        str(tmp_path / "s"),
    ]
    out = subprocess.run(
        [*base, "-o", "syslog", "--syslog-address", str(tmp_path / "no-such-log")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2 and f"syslog unix {tmp_path / 'no-such-log'}" in out.stderr
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(30)
        proc = subprocess.Popen(
            [
                *base,
                "-o",
                "syslog",
                "--syslog-transport",
                "tcp",
                "--syslog-address",
                f"127.0.0.1:{server.getsockname()[1]}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            conn, _ = server.accept()
            conn.settimeout(30)
            data = b""
            while b"retrying" not in data:  # the scheduler at :9 is unreachable
                data += conn.recv(65536)
            line = data.split(b"\n")[0]
            assert rfc5424(line)["app"] == "dcp-worker" and b"\x00" not in data, data
            conn.close()
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(30)


def test_prometheus_metrics_on_loopback(
    tmp_path: Path,
    scheduler: SchedulerProcess,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = workers(scheduler.url, make_keystore("w"), 2, "--metrics", f"127.0.0.1:{port}")
    with ComputeClient(scheduler.url, make_keystore("owner").identity) as client:
        echo = client.deploy(job_file(tmp_path, "echo", ECHO, ["a", "b", "c"]))
        slow = client.deploy(
            job_file(tmp_path, "slow", PUZZLE, ["a"], ["60"], "wall_seconds = 0.3", attempts=1)
        )
        for job in (echo, slow):
            list(client.results(job, wait=True, timeout=60))
    wait_for(lambda: "metrics at" in worker.output(), 10)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'dcp_worker_slices_total{outcome="done"} 3.0' in text, text
    assert 'dcp_worker_slices_total{outcome="failed"} 1.0' in text
    assert 'dcp_worker_errors_total{event="slice_failed",reason="wasm_timeout"} 1.0' in text
    assert 'dcp_worker_sandboxes{state="idle"} 2.0' in text
    assert "dcp_worker_fetch_seconds_count" in text and "dcp_worker_connected 1.0" in text
    assert worker.stop() == 0


def _can_unshare_mounts() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=10)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_unshare_mounts(), reason="needs root and mount namespaces")
def test_journal_output_has_structured_fields(
    tmp_path: Path,
    scheduler: SchedulerProcess,
    make_keystore: Callable[[str], Keystore],
) -> None:
    """The worker runs in its own mount namespace where /run/systemd/journal is a directory
    of the test's: its journal socket is a datagram socket the test reads (journald's native
    protocol, KEY=value lines)."""
    journal = tmp_path / "journal"
    journal.mkdir()
    keystore = make_keystore("w")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(journal / "socket"))
        sock.settimeout(30)
        script = (
            "mount -t tmpfs none /run && mkdir -p /run/systemd/journal && "
            f'mount --bind {journal} /run/systemd/journal && exec "$@"'
        )
        proc = subprocess.Popen(
            [
                "unshare",
                "-m",
                "sh",
                "-c",
                script,
                "sh",
                command("dcp-worker"),
                "-v",
                "-o",
                "journal",
                "--scheduler",
                scheduler.url,
                "--identity",
                str(keystore.path),
                "--passphrase-file",
                str(keystore.passphrase_file),
                "--state-dir",
                str(tmp_path / "state"),
                "--sandboxes",
                "1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            entries = []
            with ComputeClient(scheduler.url, make_keystore("owner").identity) as client:
                client.deploy(
                    job_file(
                        tmp_path, "slow", PUZZLE, ["a"], ["60"], "wall_seconds = 0.3", attempts=1
                    )
                )
                while not any(b"DCP_CODE=wasm_timeout" in e for e in entries):
                    entries.append(sock.recv(1 << 16))
        finally:
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    connected = next(e for e in entries if b"connected to" in e).split(b"\n")
    assert b"SYSLOG_IDENTIFIER=dcp-worker" in connected and b"PRIORITY=5" in connected  # notice
    failed = next(e for e in entries if b"DCP_CODE=wasm_timeout" in e).split(b"\n")
    assert b"PRIORITY=4" in failed and b"DCP_SLICE=0" in failed
    assert any(line.startswith(b"DCP_JOB=") for line in failed)


def test_subcommands_find_the_socket_of_the_state_dir_given_to_the_group(
    tmp_path: Path, make_keystore: Callable[[str], Keystore], workers: Callable[..., WorkerProcess]
) -> None:
    """``dcp-worker --state-dir DIR status`` asks the worker whose state dir is DIR (its
    socket is DIR/control.sock), as ``--control-socket`` or the environment would say."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: the worker retries, its socket serves
    state = tmp_path / "elsewhere"
    worker = workers(f"http://127.0.0.1:{port}", make_keystore("w"), 1, state_dir=state)
    wait_for((state / "control.sock").exists, 30)

    def group(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [command("dcp-worker"), *args],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, **(env or {})},
        )

    out = group("--state-dir", str(state), "status")
    assert out.returncode == 0, out.stderr
    assert "(not connected)" in out.stdout
    assert group("--control-socket", str(state / "control.sock"), "pause").returncode == 0
    snap = json.loads(group("--state-dir", str(state), "status", "--json").stdout)
    assert snap["state"] == "paused"
    out = group("status", "--json", env={"DCP_WORKER_STATE_DIR": str(state)})
    assert out.returncode == 0 and json.loads(out.stdout)["state"] == "paused"
    out = group("--state-dir", str(tmp_path / "nobody-here"), "status")
    assert out.returncode == 2 and str(tmp_path / "nobody-here" / "control.sock") in out.stderr
    assert group("--state-dir", str(state), "stop").returncode == 0
    assert worker.proc.wait(30) == 0


def test_a_metrics_address_in_use_is_a_configuration_error(
    tmp_path: Path, make_keystore: Callable[[str], Keystore]
) -> None:
    """One rule for the listeners the configuration asks for (the control socket, metrics):
    one that cannot be opened stops the start, exit 2, naming the address and why, and
    nothing of the worker stays (it served on, without its metrics, having logged an error)."""
    keystore = make_keystore("w")
    state = tmp_path / "state"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        out = subprocess.run(
            [
                command("dcp-worker"),
                "-o",
                "console",
                "--identity",
                str(keystore.path),
                "--passphrase-file",
                str(keystore.passphrase_file),
                "--scheduler",
                "http://127.0.0.1:9",
                "--state-dir",
                str(state),
                "--metrics",
                listen,
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert out.returncode == 2, out.stderr
    assert f"dcp-worker: metrics {listen}: cannot listen: Address already in use" in out.stderr
    assert "retrying" not in out.stderr  # no session was tried
    assert not (state / "control.sock").exists()  # the control socket closed again


def test_the_default_verbosity_shows_the_worker_working_not_every_slice(
    tmp_path: Path, scheduler: SchedulerProcess, make_keystore: Callable[[str], Keystore]
) -> None:
    """Without -v a volunteer sees the connection (scheduler and session), the first work and
    the first accepted result, at level NOTICE; twenty slices add no line of their own."""
    keystore = make_keystore("w")
    log = tmp_path / "console.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                command("dcp-worker"),
                *("-o", "console", "--scheduler", scheduler.url, "--sandboxes", "2"),
                *(
                    "--identity",
                    str(keystore.path),
                    "--passphrase-file",
                    str(keystore.passphrase_file),
                ),
                *("--state-dir", str(tmp_path / "state")),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for(lambda: "connected to" in log.read_text(), 30)
            with ComputeClient(scheduler.url, make_keystore("owner").identity) as client:
                values = [f"v{i}" for i in range(20)]
                job = client.deploy(job_file(tmp_path, "echo", ECHO, values))
                results = client.results(job, wait=True, timeout=60)
                assert [r.state for r in results] == ["done"] * 20
            wait_for(lambda: "first result accepted" in log.read_text(), 30)
        finally:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(30) == 0
    lines = log.read_text().splitlines()
    notices = [line for line in lines if " NOTICE " in line]
    connected = next(line for line in notices if "connected to" in line)
    assert f"connected to {scheduler.url} (session " in connected
    assert keystore.identity.address in connected
    assert sum("first work: " in line and f"of job echo ({job})" in line for line in notices) == 1
    assert sum("first result accepted: slice " in line for line in notices) == 1
    assert not [line for line in lines if " INFO " in line or " DEBUG " in line]
    assert len(lines) < 12, lines  # not one per slice
