"""The commands as subprocesses: exit codes and messages for bad input."""

from __future__ import annotations

import signal
import socket
import subprocess
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from dcp_worker.config import DEFAULTS, KEYS, ConfigError, load_config

from .conftest import ROOT, Keystore, SchedulerProcess, WorkerProcess, command, wait_for


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60)


def test_shipped_defaults_match_the_code() -> None:
    path = ROOT / "dcp_worker" / "defaults.toml"
    assert set(tomllib.loads(path.read_text())) == set(KEYS)
    assert load_config(path, {}) == DEFAULTS


def test_config_errors_name_the_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "w.toml"
    path.write_text("sandboxes = 2\ncolour = 'blue'\n")
    with pytest.raises(ConfigError, match=r"w\.toml:2: unknown key 'colour'"):
        load_config(path, {})
    path.write_text("sandboxes = 'two'\n")
    with pytest.raises(ConfigError, match=r"w\.toml:1: sandboxes must be an integer"):
        load_config(path, {})
    path.write_text("sandboxes = \n")
    with pytest.raises(ConfigError, match=r"line 1"):
        load_config(path, {})
    path.write_text("sandboxes = 3\nprefetch = 5\n")
    config = load_config(path, {"sandboxes": 4, "prefetch": None})
    assert (config.sandboxes, config.prefetch) == (4, 5)


def test_worker_exit_codes(tmp_path: Path, make_keystore: Callable[[str], Keystore]) -> None:
    keystore = make_keystore("w")
    bad = tmp_path / "bad.toml"
    bad.write_text("nonsense = 1\n")
    out = run(command("dcp-worker"), "--config", str(bad))
    assert out.returncode == 2 and "unknown key" in out.stderr
    out = run(command("dcp-worker"), "--scheduler", "http://127.0.0.1:1")
    assert out.returncode == 2 and "identity" in out.stderr
    wrong = tmp_path / "wrong.pass"
    wrong.write_text("wrong\n")
    out = run(
        command("dcp-worker"), "--identity", str(keystore.path), "--passphrase-file", str(wrong)
    )
    assert out.returncode == 3 and "wrong passphrase" in out.stderr
    assert "Traceback" not in out.stderr


def test_worker_keeps_retrying_an_unreachable_scheduler_and_stops_on_sigint(
    tmp_path: Path, make_keystore: Callable[[str], Keystore], workers: Callable[..., WorkerProcess]
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    worker = workers(f"http://127.0.0.1:{port}", make_keystore("w"), 1)
    wait_for(lambda: worker.output().count("retrying in") >= 2, 30)
    assert worker.stop(signal.SIGINT) == 0
    assert "cannot connect" in worker.output()


def test_two_workers_cannot_share_an_outbox(
    tmp_path: Path,
    scheduler: SchedulerProcess,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    keystore = make_keystore("w")
    state = tmp_path / "shared"
    first = workers(scheduler.url, keystore, 1, state_dir=state)
    wait_for(lambda: "connected to" in first.output(), 30)
    second = workers(scheduler.url, keystore, 1, state_dir=state)
    assert second.proc.wait(30) == 2
    assert "in use by another worker" in second.output()
    assert first.stop() == 0


def test_admin_commands(
    tmp_path: Path, scheduler: SchedulerProcess, make_keystore: Callable[[str], Keystore]
) -> None:
    from scheduler.client import ComputeClient

    from .test_pipeline import ECHO, job_file

    with ComputeClient(scheduler.url, make_keystore("owner").identity) as client:
        job = client.deploy(job_file(tmp_path, "echo", ECHO, ["a", "b"]))
    db = str(scheduler.db)
    listed = run(command("dcp-scheduler"), "jobs", "list", "--db", db)
    assert job in listed.stdout and "queued=2" in listed.stdout
    shown = run(command("dcp-scheduler"), "jobs", "show", "--db", db, job)
    assert shown.stdout.count("queued") == 2
    assert run(command("dcp-scheduler"), "jobs", "cancel", "--db", db, job).returncode == 0
    assert "cancelled" in run(command("dcp-scheduler"), "jobs", "list", "--db", db).stdout
    assert run(command("dcp-scheduler"), "jobs", "reset", "--db", db, job).returncode == 0
    assert run(command("dcp-scheduler"), "jobs", "remove", "--db", db, job).returncode == 0
    missing = run(command("dcp-scheduler"), "jobs", "show", "--db", db, job)
    assert missing.returncode == 3 and "no job" in missing.stderr


def test_scheduler_refuses_a_taken_port(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = run(
            command("dcp-scheduler"),
            "serve",
            "--db",
            str(tmp_path / "s.db"),
            "--listen",
            f"127.0.0.1:{port}",
        )
    assert out.returncode == 1 and "cannot listen" in out.stderr


@pytest.mark.parametrize(
    "name", ["dcp-worker", "dcp-wallet", "dcp-compute", "dcp-scheduler", "dcp-evaluator-start"]
)
def test_every_command_has_help(name: str) -> None:
    out = run(command(name), "--help")
    assert out.returncode == 0 and "usage" in out.stdout.lower()


@pytest.mark.parametrize(
    ("offer", "message"),
    [
        ("-1", "offer must be a number"),
        ('"ten"', "offer must be a number"),
        ("nan", "offer must be a number"),
        ("inf", "offer must be a number"),
        ("true", "offer must be a number"),
        ("1e12", "offer must be a number"),
    ],
)
def test_bad_offers_are_named(tmp_path: Path, offer: str, message: str) -> None:
    from scheduler.jobdoc import JobFileError, load_job_file

    path = tmp_path / "job.toml"
    path.write_text(f'module = "{ROOT / "examples" / "echo" / "echo.wasm"}"\noffer = {offer}\n')
    with pytest.raises(JobFileError, match=message):
        load_job_file(path)


def test_worker_policy_options(tmp_path: Path) -> None:
    from dcp_worker.cli import _policy_overrides

    o = _policy_overrides(
        {
            "join": ("lab,s3cret", "ops,gh1-" + "ab" * 32),
            "job_ids": ("j",),
            "job_owners": (),
            "min_wage": "10,0,0.5",
        }
    )
    config = load_config(None, o)
    assert config.group_hashes()["ops"] == "ab" * 32
    assert set(config.group_hashes()) == {"lab", "ops"}
    assert (config.job_ids, config.job_owners) == (("j",), ())
    assert (config.min_wage.cpu_hour, config.min_wage.mb_in, config.min_wage.mb_out) == (10, 0.5, 0)
    for bad in ("lab", "lab,", "lab,gh1-xyz"):
        with pytest.raises(ConfigError):
            _policy_overrides({"join": (bad,), "job_ids": (), "job_owners": (), "min_wage": None})
    with pytest.raises(ConfigError, match="numbers"):
        _policy_overrides({"join": (), "job_ids": (), "job_owners": (), "min_wage": "x"})
    path = tmp_path / "w.toml"
    path.write_text('[[groups]]\njoin_key = "lab"\n')
    with pytest.raises(ConfigError, match="join_secret or a join_hash"):
        load_config(path, {})


def test_a_scheduler_url_of_another_scheme_is_a_configuration_error(
    tmp_path: Path, make_keystore: Callable[[str], Keystore]
) -> None:
    """Found when the configuration is resolved (exit 2, naming the key and where it was set),
    not when the first connection fails (it was exit 4, "refused")."""
    keystore = make_keystore("w")
    worker = [
        command("dcp-worker"),
        "-o",
        "console",
        "--identity",
        str(keystore.path),
        "--passphrase-file",
        str(keystore.passphrase_file),
        "--state-dir",
        str(tmp_path / "state"),
    ]
    out = run(*worker, "--scheduler", "ftp://x")
    assert out.returncode == 2, out.stderr
    assert "command line --scheduler: scheduler must be an http://" in out.stderr
    assert "'ftp://x'" in out.stderr and "refused" not in out.stderr
    assert not (tmp_path / "state").exists()  # nothing started: no outbox was made
    config = tmp_path / "w.toml"
    config.write_text('\nscheduler = "gopher://sched.example"\n')
    out = run(*worker, "--config", str(config))
    assert out.returncode == 2 and f"{config}:2: scheduler must be" in out.stderr
    for good in ("http://h:1", "https://h", "ws://h:1/worker", "wss://h", "h:8500"):
        assert load_config(None, {"scheduler": good}).scheduler == good
    for bad in ("ftp://x", "http://", "file:///tmp/s", "http://[::1"):
        with pytest.raises(ConfigError, match="scheduler must be"):
            load_config(None, {"scheduler": bad})


def test_zero_sandboxes_means_auto_on_the_command_line_as_in_the_file(tmp_path: Path) -> None:
    """``sandboxes = 0`` (90% of the cores) and ``max_sandboxes = 0`` (no cap) are accepted in
    a file, and so is ``prefetch = -1`` (auto); the options take the same values with the same
    meaning."""
    out = run(
        command("dcp-worker"),
        *("--sandboxes", "0", "--max-sandboxes", "0", "--prefetch", "-1", "--show-config"),
    )
    assert out.returncode == 0, out.stderr
    assert "sandboxes = 0  # command line --sandboxes/--cores" in out.stdout
    assert "max_sandboxes = 0  # command line --max-sandboxes" in out.stdout
    assert load_config(None, {"sandboxes": 0}).effective_sandboxes >= 1
    assert "prefetch = -1  # command line --prefetch" in out.stdout
    help_text = " ".join(run(command("dcp-worker"), "--help").stdout.split())
    assert "0: 90% of the CPU cores" in help_text and "0: no cap" in help_text
    assert "-1: auto" in help_text
    out = run(command("dcp-worker"), "--sandboxes", "-1", "--show-config")
    assert out.returncode == 2 and "--sandboxes" in out.stderr
