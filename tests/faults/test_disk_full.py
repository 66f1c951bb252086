"""A full disk under the outbox: the worker says so, stops fetching, keeps its results, and
carries on when space comes back; nothing is lost."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from scheduler.client import ComputeClient

from ..conftest import Keystore, SchedulerProcess, WorkerProcess, wait_for
from ..test_pipeline import ECHO, counts, job_file


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip("needs to mount a small tmpfs (root in a machine that allows it)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_full_disk_stops_fetching_and_loses_nothing(
    tmp_path: Path,
    tiny_disk: Path,
    scheduler: SchedulerProcess,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    worker = workers(scheduler.url, make_keystore("w"), 2, state_dir=tiny_disk / "state")
    wait_for(lambda: "connected to" in worker.output(), 30)
    filler = tiny_disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:  # fill the disk to the last block
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    values = [f"v{i}" for i in range(30)]
    with ComputeClient(scheduler.url, make_keystore("owner").identity) as client:
        job = client.deploy(job_file(tmp_path, "echo", ECHO, values))
        wait_for(
            lambda: "not fetching new slices until results can be stored" in worker.output(), 30
        )
        assert counts(scheduler.db, job).get("done", 0) < len(values)
        filler.unlink()
        results = list(client.results(job, wait=True, timeout=120))
    assert [r.result for r in results] == [v.encode() for v in values]
    assert "fetching resumes" in worker.output()
    assert worker.stop() == 0
