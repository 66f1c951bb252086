"""``make cluster`` (examples/cluster.py): PostgreSQL, two replicas, two workers that know both,
the hash-puzzle job, run to the end, interrupted with Ctrl-C, and killed then cleaned up with
``--stop``: every result verified, and nothing left running in each case."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests import postgres

from .conftest import EXAMPLES

SCRIPT = EXAMPLES / "cluster.py"
EXIT_NO_POSTGRES = 2  # examples/cluster.py's
EXIT_INTERRUPTED = 130


def _start(work: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), "--quick", "--dir", str(work)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _read_until(proc: subprocess.Popen[str], marker: str) -> str:
    """The script's output up to the line holding ``marker`` (or to its end)."""
    assert proc.stdout is not None
    out = ""
    for line in proc.stdout:
        out += line
        if marker in line:
            break
    if marker not in out:
        _skip_without_postgres(proc.wait(), out)
    return out


def _skip_without_postgres(rc: int, out: str) -> None:
    if rc == EXIT_NO_POSTGRES:
        if postgres.required():
            pytest.fail(f"DCP_REQUIRE_POSTGRES is set, but {out.strip()}")
        pytest.skip(out.strip().splitlines()[-1])


def _pids(out: str) -> list[int]:
    return [int(pid) for pid in re.findall(r"^   (?:worker|replica)-\d  .*?pid (\d+)", out, re.M)]


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet reaped by init, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _postgres_data(out: str) -> Path:
    match = re.search(r"data (\S+)", out)
    assert match, out
    return Path(match.group(1))


def _assert_all_stopped(out: str, work: Path) -> None:
    pids = _pids(out)
    assert len(pids) == 4, out
    assert [pid for pid in pids if _running(pid)] == [], out
    data = _postgres_data(out)
    data = data if data.is_absolute() else work.parent / data
    assert not (data / "postmaster.pid").exists(), out
    assert not (work / "running.json").exists(), out


#: How every run stops: the workers first, gracefully (0), then the replicas, then PostgreSQL.
IN_ORDER = [
    ("worker-1", "exited 0"),
    ("worker-2", "exited 0"),
    ("replica-1", "exited 0"),
    ("replica-2", "exited 0"),
    ("PostgreSQL", "stopped"),
]


def _stops(out: str) -> list[tuple[str, str]]:
    return re.findall(r"^   (worker-\d|replica-\d|PostgreSQL) (exited \d+|stopped)", out, re.M)


@pytest.mark.timeout(120)
def test_make_cluster_runs_the_job_on_two_replicas_and_stops_everything(tmp_path: Path) -> None:
    work = tmp_path / "cluster"
    proc = _start(work)
    out, _ = proc.communicate(timeout=100)
    _skip_without_postgres(proc.returncode, out)
    assert proc.returncode == 0, out
    assert "12/12 puzzle results verified" in out, out
    assert out.count(" ok\n") == 12, out
    urls = re.findall(r"replica-\d  (http://127\.0\.0\.1:\d+)", out)
    assert len(urls) == 2, out
    # Each worker was given the other replica first: each replica served one of them.
    connected = re.findall(r"^   worker-\d earned [\d.]+ credits, connected to (\S+)$", out, re.M)
    assert connected == urls, out
    assert _stops(out) == IN_ORDER, out
    _assert_all_stopped(out, work)


@pytest.mark.timeout(120)
def test_ctrl_c_stops_the_workers_then_the_replicas_then_postgres(tmp_path: Path) -> None:
    work = tmp_path / "cluster"
    proc = _start(work)
    out = _read_until(proc, "results, in slice order")
    proc.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C sends to the script
    rest, _ = proc.communicate(timeout=100)
    out += rest
    assert proc.returncode == EXIT_INTERRUPTED, out
    assert "interrupted: everything stopped" in out, out
    # The workers stop gracefully (0: their outboxes flushed) while both replicas still run.
    assert _stops(out) == IN_ORDER, out
    _assert_all_stopped(out, work)


@pytest.mark.timeout(120)
def test_cluster_stop_stops_what_a_killed_run_left_running(tmp_path: Path) -> None:
    work = tmp_path / "cluster"
    proc = _start(work)
    out = _read_until(proc, "results, in slice order")
    proc.kill()  # no cleanup at all: the workers, replicas and PostgreSQL go on
    proc.communicate(timeout=30)
    assert (work / "running.json").exists()
    data = _postgres_data(out)
    data = data if data.is_absolute() else work.parent / data
    assert (data / "postmaster.pid").exists()
    assert all(_running(pid) for pid in _pids(out)), out
    stop = subprocess.run(
        [sys.executable, str(SCRIPT), "--dir", str(work), "--stop"],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert "PostgreSQL stopped" in stop.stdout, stop.stdout
    _assert_all_stopped(out, work)
    again = subprocess.run(
        [sys.executable, str(SCRIPT), "--dir", str(work), "--stop"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert again.returncode == 0 and "nothing left running" in again.stdout


def test_a_directory_that_is_not_a_clusters_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine\n")
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 3, out.stdout + out.stderr  # EXIT_USAGE: nothing started
    assert "not empty and not a cluster's" in out.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
