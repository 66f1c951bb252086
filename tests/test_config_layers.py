"""Layered configuration: every value's origin, errors with file and line, DCP's options."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from dcp_worker.cli import _parse_cores
from dcp_worker.config import ConfigError, resolve, system_config_files

from .conftest import command


def test_layers_win_in_order_and_say_where_from(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    (etc / "conf.d").mkdir(parents=True)
    (etc / "dcp-worker.toml").write_text(
        '# the site\nscheduler = "http://sched.example:8500"\nsandboxes = 3\nprefetch = 1\n'
    )
    (etc / "conf.d" / "20-late.toml").write_text("prefetch = 2\n")
    (etc / "conf.d" / "10-early.toml").write_text("prefetch = 9\ngrace_seconds = 20.0\n")
    user = tmp_path / "user.toml"
    user.write_text("\n\nsandboxes = 4\n[min_wage]\ncpu_hour = 1.5\n")
    files = [*system_config_files(etc), user]
    assert [f.name for f in files] == [
        "dcp-worker.toml",
        "10-early.toml",
        "20-late.toml",
        "user.toml",
    ]
    resolved = resolve(
        files,
        {"max_sandboxes": 2, "prefetch": None},
        env={"DCP_WORKER_GRACE_SECONDS": "12.5", "DCP_WORKER_JOB_IDS": "a, b", "HOME": "/x"},
    )
    c, o = resolved.config, resolved.origins
    assert c.scheduler == "http://sched.example:8500"
    assert o["scheduler"] == f"{etc / 'dcp-worker.toml'}:2"
    assert (c.sandboxes, o["sandboxes"]) == (4, f"{user}:3")
    assert (c.prefetch, o["prefetch"]) == (2, f"{etc / 'conf.d' / '20-late.toml'}:1")
    assert (c.grace_seconds, o["grace_seconds"]) == (12.5, "environment DCP_WORKER_GRACE_SECONDS")
    assert c.job_ids == ("a", "b")
    assert (c.max_sandboxes, o["max_sandboxes"]) == (2, "command line --max-sandboxes")
    assert c.effective_sandboxes == 2  # --max-sandboxes caps --sandboxes, as in DCP
    assert (c.min_wage.cpu_hour, o["min_wage"]) == (1.5, f"{user}:4")
    assert o["state_dir"] == "default"
    text = resolved.describe()
    assert f'scheduler = "http://sched.example:8500"  # {etc / "dcp-worker.toml"}:2' in text
    assert "grace_seconds = 12.5  # environment DCP_WORKER_GRACE_SECONDS" in text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "sandboxes = 2\n\nsandboxs = 3\n",
            r"w\.toml:3: unknown key 'sandboxs' \(did you mean 'sandboxes'\?\)",
        ),
        ("scheduler = 'x'\ngrace_seconds = 'soon'\n", r"w\.toml:2: grace_seconds must be a number"),
        ("output = ['console', 'carrier-pigeon']\n", r"w\.toml:1: output must be a list of"),
        ("metrics = '0.0.0.0:9101'\n", r"w\.toml:1: metrics must be HOST:PORT on loopback"),
        ("[min_wage]\ncpu_hour = 'lots'\n", r"w\.toml:1: min_wage: wages are numbers"),
        ("sandboxes = \n", r"w\.toml: .*line 1"),
    ],
)
def test_a_bad_file_names_its_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "w.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        resolve([path])


def test_bad_environment_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="environment DCP_WORKER_SANDBOX: no configuration key"):
        resolve(env={"DCP_WORKER_SANDBOX": "2"})
    with pytest.raises(ConfigError, match="environment DCP_WORKER_SANDBOXES: cannot read 'two'"):
        resolve(env={"DCP_WORKER_SANDBOXES": "two"})
    c = resolve(env={"DCP_WORKER_LEAVE_PUBLIC_GROUP": "yes", "DCP_WORKER_MIN_WAGE": "2,,0.5"})
    assert c.config.leave_public_group and c.config.min_wage.mb_in == 0.5


def test_cores_as_dcp_means_them() -> None:
    assert _parse_cores("7,1") == (7, 1)  # DCP 3.3 made this 0 CPU cores (NaN)
    assert _parse_cores("7") == (7, None)
    assert _parse_cores(",1") == (None, 1)
    assert _parse_cores("7,") == (7, None)
    assert _parse_cores("2,0") == (2, 0)
    for bad in ("", ",", "x", "0", "7,-1", "7,1,2"):
        with pytest.raises(ConfigError, match="--cores"):
            _parse_cores(bad)


def _worker(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [command("dcp-worker"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )


def test_show_config_explains_every_value(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "dcp-worker.toml").write_text('scheduler = "http://site:1"\n')
    home = tmp_path / "home"
    (home / "dcp-worker").mkdir(parents=True)
    (home / "dcp-worker" / "dcp-worker.toml").write_text("# mine\nprefetch = 7\n")
    env = {
        "DCP_WORKER_SYSTEM_CONFIG": str(etc),
        "XDG_CONFIG_HOME": str(home),
        "DCP_WORKER_SANDBOXES": "5",
    }
    out = _worker("--show-config", "-c", ",2", "--join", "lab,s3cret", env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert f'scheduler = "http://site:1"  # {etc / "dcp-worker.toml"}:1' in lines
    assert f"prefetch = 7  # {home / 'dcp-worker' / 'dcp-worker.toml'}:2" in lines
    assert "sandboxes = 5  # environment DCP_WORKER_SANDBOXES" in lines
    assert "opencl_slots = 2  # command line --cores" in lines
    assert 'join_secret = "(set; not shown)"' in lines and "s3cret" not in out.stdout
    assert "grace_seconds = 30.0  # default" in lines
    # A typo in the user's file: exit 2, the file and the line.
    (home / "dcp-worker" / "dcp-worker.toml").write_text("prefetch = 7\ngrace_second = 3\n")
    out = _worker("--show-config", env=env)
    assert out.returncode == 2
    assert f"{home / 'dcp-worker' / 'dcp-worker.toml'}:2: unknown key 'grace_second'" in out.stderr
    out = _worker("--show-config", "--cores", "7,x", env=env)
    assert out.returncode == 2 and "--cores '7,x'" in out.stderr


def test_scheduler_takes_one_url_or_a_list_in_every_layer(tmp_path: Path) -> None:
    """Replicas: a list in a file, commas in the variable, the option repeated; one URL stays
    a string (and reads back as one); a bad entry of several is named by its place."""
    path = tmp_path / "w.toml"
    path.write_text('\nscheduler = ["http://a:8500", "wss://b"]\n')
    resolved = resolve([path])
    assert resolved.config.schedulers == ("http://a:8500", "wss://b")
    assert resolved.config.scheduler == "http://a:8500"  # where a connection starts
    assert resolved.origins["scheduler"] == f"{path}:2"
    assert f'scheduler = ["http://a:8500", "wss://b"]  # {path}:2' in resolved.describe()
    env = {"DCP_WORKER_SCHEDULER": "http://c:1, http://d:2"}
    resolved = resolve([path], env=env)
    assert resolved.config.schedulers == ("http://c:1", "http://d:2")
    assert resolved.origins["scheduler"] == "environment DCP_WORKER_SCHEDULER"
    resolved = resolve([path], {"scheduler": ("http://e:3",)}, env=env)
    assert resolved.config.schedulers == ("http://e:3",)
    assert 'scheduler = "http://e:3"  # command line --scheduler' in resolved.describe()

    path.write_text('scheduler = ["http://a:8500", "gopher://b", "http://c"]\n')
    with pytest.raises(
        ConfigError, match=r"w\.toml:1: scheduler must be .*'gopher://b' \(entry 2 of 3\)"
    ):
        resolve([path])
    path.write_text("scheduler = []\n")
    with pytest.raises(ConfigError, match=r"w\.toml:1: scheduler needs at least one URL"):
        resolve([path])
    path.write_text("scheduler = [8500]\n")
    with pytest.raises(ConfigError, match=r"w\.toml:1: scheduler must be a string or a list"):
        resolve([path])
    with pytest.raises(ConfigError, match="environment DCP_WORKER_SCHEDULER: scheduler needs"):
        resolve([], env={"DCP_WORKER_SCHEDULER": " , "})


def test_scheduler_option_repeats_on_the_command_line(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            command("dcp-worker"),
            *("--scheduler", "http://a:1", "--scheduler", "http://b:2", "--show-config"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert 'scheduler = ["http://a:1", "http://b:2"]  # command line --scheduler' in out.stdout
    out = subprocess.run(
        [command("dcp-worker"), "--scheduler", "http://a:1", "--scheduler", "ftp://b"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "command line --scheduler: scheduler must be" in out.stderr
    assert "'ftp://b' (entry 2 of 2)" in out.stderr
