"""The systemd units and the packaged configuration: they verify, and what they set is valid."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

from dcp_worker.config import resolve

from .conftest import BIN, ROOT

UNITS = ROOT / "packaging" / "systemd"


def _unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return parser


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_units_verify(tmp_path: Path) -> None:
    # The installed commands live in /usr/bin; here the same units point at this checkout's.
    names = []
    for unit in UNITS.iterdir():
        text = unit.read_text().replace("/usr/bin/", f"{BIN}/")
        (tmp_path / unit.name).write_text(text)
        names.append(str(tmp_path / unit.name))
    out = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *sorted(names)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and out.stderr == "", out.stderr


def test_worker_unit_is_notify_hardened_and_its_settings_are_valid() -> None:
    service = _unit(UNITS / "dcp-worker.service")["Service"]
    assert service["Type"] == "notify" and "WatchdogSec" in service
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "User": "dcp",
        "StateDirectory": "dcp-worker",
        "RuntimeDirectory": "dcp-worker",
    }.items():
        assert service[key] == value, key
    # TimeoutStopSec leaves room for the graceful stop (30 s) and its close.
    assert int(service["TimeoutStopSec"]) > 35
    env = dict(
        line.split("=", 1)
        for line in (UNITS / "dcp-worker.service").read_text().splitlines()
        if line.startswith("Environment=")
        for line in [line.removeprefix("Environment=")]
    )
    socket_path = _unit(UNITS / "dcp-evaluator-manager.socket")["Socket"]["ListenStream"]
    config = resolve(
        [ROOT / "etc" / "dcp-worker.toml"], env=env
    ).config  # every variable is a known key with a valid value
    assert config.evaluator == socket_path
    assert config.output == ("journal",)
    assert str(config.control_path) == "/run/dcp-worker/control.sock"
    assert config.identity == "/etc/dcp-worker/identity.keystore"


def test_manager_socket_is_local_and_for_the_dcp_group() -> None:
    sock = _unit(UNITS / "dcp-evaluator-manager.socket")["Socket"]
    assert sock["ListenStream"].startswith("/")  # a Unix socket, never TCP
    assert (sock["SocketGroup"], sock["SocketMode"]) == ("dcp", "0660")
