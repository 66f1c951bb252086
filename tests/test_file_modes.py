"""Files our processes create are theirs alone (0600), whatever the directory's mode or the
umask they were started with: the outbox and its SQLite side files hold signed results, the
scheduler's database holds owners' code, data and results."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dcp_protocol import Metrics
from dcp_worker.outbox import Outbox, PendingResult
from scheduler.client import ComputeClient
from scheduler.local import LocalScheduler

from .conftest import Keystore, WorkerProcess
from .test_pipeline import ECHO, job_file


@pytest.fixture
def open_umask() -> Iterator[None]:
    old = os.umask(0o022)  # what a shell usually hands down
    yield
    os.umask(old)


def _shared_dir(path: Path) -> Path:
    path.mkdir()
    path.chmod(0o755)  # as an operator may pre-create it
    return path


def _modes(directory: Path) -> dict[str, int]:
    """Mode bits of every file (not socket) under ``directory``."""
    modes = {}
    for entry in directory.rglob("*"):
        st = entry.lstat()
        if stat.S_ISREG(st.st_mode):
            modes[str(entry.relative_to(directory))] = stat.S_IMODE(st.st_mode)
    return modes


def test_outbox_side_files_are_private(tmp_path: Path, open_umask: None) -> None:
    state = _shared_dir(tmp_path / "state")
    outbox = Outbox(state / "outbox.sqlite")
    try:
        outbox.commit([PendingResult("j", 0, "t", b"r", "0xsig", "0xpay", Metrics())], [])
        modes = _modes(state)
    finally:
        outbox.close()
    assert {"outbox.sqlite", "outbox.sqlite-wal", "outbox.sqlite-shm"} <= set(modes)
    assert {name: mode for name, mode in modes.items() if mode != 0o600} == {}


def test_an_older_outbox_left_readable_is_narrowed(tmp_path: Path, open_umask: None) -> None:
    state = _shared_dir(tmp_path / "state")
    Outbox(state / "outbox.sqlite").close()
    for name in _modes(state):
        (state / name).chmod(0o644)
    Outbox(state / "outbox.sqlite").close()
    assert set(_modes(state).values()) == {0o600}


def test_worker_and_scheduler_files_are_private(
    tmp_path: Path,
    open_umask: None,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    state = _shared_dir(tmp_path / "state")
    served = _shared_dir(tmp_path / "scheduler")
    with LocalScheduler(served / "scheduler.db") as local:
        worker = workers(local.url, make_keystore("w"), 1, state_dir=state)
        with ComputeClient(local.url, make_keystore("owner").identity) as client:
            job = client.deploy(job_file(tmp_path, "echo", ECHO, ["a", "b", "c"]))
            assert [r.result for r in client.results(job, wait=True, timeout=60)] == [
                b"a",
                b"b",
                b"c",
            ]
        during = _modes(state)
        assert worker.stop() == 0
        assert {"outbox.sqlite", "outbox.sqlite-wal"} <= set(during)
        assert {name: mode for name, mode in during.items() if mode & 0o077} == {}
        scheduler_files = _modes(served)
    assert {"scheduler.db", "scheduler.db-wal"} <= set(scheduler_files)
    assert {name: mode for name, mode in scheduler_files.items() if mode & 0o077} == {}
