"""The admin commands on either backend: `db upgrade` and `db status`, `--db` from the
environment or a config file, and `serve` refusing a database of an older schema unless asked
to upgrade it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from scheduler.store.migrations import LATEST

from .conftest import SchedulerProcess, command
from .test_replicas_store import at_version_4


def scheduler_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [command("dcp-scheduler"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=60,
    )


def test_db_upgrade_brings_an_older_database_to_the_latest_schema(db: str) -> None:
    at_version_4(db)
    status = scheduler_cli("db", "status", "--db", db)
    assert status.returncode == 1 and "dcp-scheduler db upgrade" in status.stderr
    upgraded = scheduler_cli("db", "upgrade", "--db", db)
    assert upgraded.returncode == 0, upgraded.stderr
    assert "applied 5: an index of leased slices by deadline" in upgraded.stdout
    assert f"schema {LATEST} (latest {LATEST})" in upgraded.stdout
    again = scheduler_cli("db", "upgrade", "--db", db)
    assert "applied" not in again.stdout  # nothing left to apply
    assert scheduler_cli("db", "status", "--db", db).returncode == 0


def test_serve_refuses_an_older_schema_unless_asked_to_upgrade(db: str, tmp_path: Path) -> None:
    at_version_4(db)
    state = str(tmp_path / "state")
    refused = scheduler_cli("serve", "--db", db, "--listen", "127.0.0.1:0", "--state-dir", state)
    assert refused.returncode != 0
    assert "run `dcp-scheduler db upgrade" in refused.stderr
    assert "Traceback" not in refused.stderr
    served = SchedulerProcess(db, "--upgrade", log=tmp_path / "serve.log")
    try:
        assert "applied schema 5" in (tmp_path / "serve.log").read_text()
    finally:
        served.stop()


def test_db_from_the_environment_or_a_config_file(db: str, tmp_path: Path) -> None:
    scheduler_cli("db", "upgrade", "--db", db)
    address = "0x" + "ab" * 20
    minted = scheduler_cli("bank", "mint", address, "3", env={"DCP_SCHEDULER_DB": db})
    assert minted.returncode == 0, minted.stderr
    config = tmp_path / "scheduler.toml"
    config.write_text(f'db = "{db}"\n')
    balance = scheduler_cli("--config", str(config), "bank", "balance", address)
    assert balance.returncode == 0 and "3.000000" in balance.stdout, balance
    # The environment wins over the file, the command line over both.
    elsewhere = str(tmp_path / "missing.db")
    shadowed = scheduler_cli(
        "--config", str(config), "bank", "balance", address, env={"DCP_SCHEDULER_DB": elsewhere}
    )
    assert shadowed.returncode == 2 and "no database file" in shadowed.stderr
    explicit = scheduler_cli(
        "--config",
        str(config),
        "bank",
        "balance",
        "--db",
        db,
        address,
        env={"DCP_SCHEDULER_DB": elsewhere},
    )
    assert explicit.returncode == 0 and "3.000000" in explicit.stdout


def test_a_config_file_with_an_unknown_key_is_refused_by_name(tmp_path: Path) -> None:
    config = tmp_path / "scheduler.toml"
    config.write_text('db = "x.db"\nleese_timeout = 3\n')
    out = scheduler_cli("--config", str(config), "jobs", "list")
    assert out.returncode == 2
    assert "leese_timeout: not an option of any dcp-scheduler command" in out.stderr
