"""The pipeline end to end with real processes: scheduler, workers, evaluators, compute client."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import msgspec
import pytest

from scheduler.client import ComputeClient
from scheduler.store.backends import open_store

from .conftest import EXAMPLES, Keystore, SchedulerProcess, WorkerProcess, command, wait_for

ECHO = EXAMPLES / "echo" / "echo.wasm"
PUZZLE = EXAMPLES / "hash-puzzle" / "puzzle.wasm"


def job_file(
    tmp_path: Path,
    name: str,
    module: Path,
    values: list[str],
    argv: list[str] = (),
    limits: str = "",
    attempts: int = 2,
    offer: float = 0,
    extra: str = "",
) -> Path:
    """A job file; free (offer 0) unless ``offer`` says otherwise."""
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f'name = "{name}"\nruntime = "wasm"\nmodule = "{module}"\n'
        f"argv = {json.dumps(list(argv))}\noffer = {offer}\nmax_attempts = {attempts}\n{extra}\n"
        f"[limits]\n{limits}\n[inputs]\nvalues = {json.dumps(values)}\n"
    )
    return path


@pytest.fixture
def scheduler(scheduler_on_every_backend: SchedulerProcess) -> SchedulerProcess:
    """The end-to-end suite runs on both backends (tests/conftest.py)."""
    return scheduler_on_every_backend


def counts(db: Path | str, job: str) -> dict[str, int]:
    store = open_store(str(db))
    try:
        return store.job(job).counts
    finally:
        store.close()


def test_thousand_echo_slices_in_order(
    tmp_path: Path,
    scheduler: SchedulerProcess,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    owner = make_keystore("owner")
    worker = workers(scheduler.url, make_keystore("worker"), 2)
    values = [f"datum-{i}" for i in range(1000)]
    with ComputeClient(scheduler.url, owner.identity) as client:
        job = client.deploy(job_file(tmp_path, "echo", ECHO, values))
        results = list(client.results(job, wait=True, timeout=120))
    assert [r.slice for r in results] == list(range(1000))
    assert [r.result for r in results] == [v.encode() for v in values]
    assert all(r.state == "done" for r in results)
    assert worker.stop() == 0
    # The client read them in MessagePack (bytes as they are); JSON (base64) says the same.
    with ComputeClient(scheduler.url, owner.identity) as client:
        token = client.issue_token(job).token
    url = f"{scheduler.url}/api/v1/jobs/{job}/results"
    auth = {"Authorization": f"Bearer {token}"}
    packed = httpx.get(url, headers={**auth, "Accept": "application/msgpack"}, timeout=30)
    assert packed.headers["Content-Type"].startswith("application/msgpack")
    plain = httpx.get(url, headers=auth, timeout=30)
    assert plain.headers["Content-Type"].startswith("application/json")
    as_bytes = msgspec.msgpack.decode(packed.content)["slices"]
    as_text = plain.json()["slices"]
    assert [s["result"] for s in as_bytes] == [
        base64.b64decode(s["result_base64"]) for s in as_text
    ]
    assert [s["result"] for s in as_bytes] == [v.encode() for v in values]


def test_results_cli_prints_json_lines_in_order(
    tmp_path: Path,
    scheduler: SchedulerProcess,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    owner = make_keystore("owner")
    workers(scheduler.url, make_keystore("worker"), 2)
    deployed = subprocess.run(
        [
            command("dcp-compute"),
            "--scheduler",
            scheduler.url,
            "deploy",
            str(job_file(tmp_path, "echo", ECHO, ["a", "b", "c"])),
            "--identity",
            str(owner.path),
            "--passphrase-file",
            str(owner.passphrase_file),
        ],
        capture_output=True,
        text=True,
    )
    assert deployed.returncode == 0, deployed.stderr
    job = deployed.stdout.strip()
    signed = ["--identity", str(owner.path), "--passphrase-file", str(owner.passphrase_file)]
    out = subprocess.run(
        [
            command("dcp-compute"),
            "--scheduler",
            scheduler.url,
            "results",
            job,
            "--wait",
            "--timeout",
            "60",
            *signed,
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["slice"], r["result"]) for r in rows] == [(0, "a"), (1, "b"), (2, "c")]
    status = subprocess.run(
        [command("dcp-compute"), "--scheduler", scheduler.url, "status", job, *signed],
        capture_output=True,
        text=True,
    )
    assert json.loads(status.stdout)["state"] == "finished"


def test_sigkill_worker_mid_job_then_restart(
    tmp_path: Path,
    scheduler: SchedulerProcess,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    owner = make_keystore("owner")
    identity = make_keystore("worker")
    values = [f"v{i}" for i in range(400)]
    state = tmp_path / "state"
    with ComputeClient(scheduler.url, owner.identity) as client:
        job = client.deploy(job_file(tmp_path, "echo", ECHO, values))
        first = workers(scheduler.url, identity, 2, state_dir=state)
        wait_for(lambda: counts(scheduler.db, job).get("done", 0) >= 100, 60)
        first.proc.kill()
        first.proc.wait()
        assert counts(scheduler.db, job).get("done", 0) < 400, "killed too late to matter"
        second = workers(scheduler.url, identity, 2, state_dir=state)
        results = list(client.results(job, wait=True, timeout=120))
    assert [r.result for r in results] == [v.encode() for v in values]
    store = open_store(str(scheduler.db))
    slices = store.slices(job, limit=1000)
    store.close()
    # Each slice was accepted exactly once: one accepted result, under its final lease.
    assert all(s.state == "done" and s.accepted_at is not None for s in slices)
    assert second.stop() == 0
    assert "0 in the outbox" in second.output()


def test_sigint_returns_queued_slices_and_flushes(
    tmp_path: Path,
    scheduler: SchedulerProcess,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    owner = make_keystore("owner")
    prefixes = [f"busy-{i}" for i in range(12)]
    with ComputeClient(scheduler.url, owner.identity) as client:
        job = client.deploy(
            job_file(tmp_path, "puzzle", PUZZLE, prefixes, ["21"], "memory_bytes = 33554432")
        )
        worker = workers(scheduler.url, make_keystore("worker"), 2)
        wait_for(lambda: counts(scheduler.db, job).get("done", 0) >= 1, 60)
        started = time.monotonic()
        worker.proc.send_signal(signal.SIGINT)
        rc = worker.proc.wait(35)
        elapsed = time.monotonic() - started
    assert rc == 0, worker.output()
    assert elapsed < 30
    log = worker.output()
    done = counts(scheduler.db, job)
    assert "0 in the outbox" in log
    # Every slice the worker finished reached the scheduler; the rest are queued again.
    assert done.get("leased", 0) == 0
    assert done.get("done", 0) + done.get("queued", 0) == len(prefixes)
    store = open_store(str(scheduler.db))
    queued = [s for s in store.slices(job) if s.state == "queued"]
    store.close()
    assert queued and all(s.attempts == 0 for s in queued if s.error_code is None)


def test_unauthorised_and_malformed_requests_are_refused(
    tmp_path: Path, scheduler: SchedulerProcess, make_keystore: Callable[[str], Keystore]
) -> None:
    owner = make_keystore("owner")
    stranger = make_keystore("stranger")
    with ComputeClient(scheduler.url, owner.identity) as client:
        job = client.deploy(job_file(tmp_path, "echo", ECHO, ["a"]))
    from scheduler.client import ComputeError

    with (
        ComputeClient(scheduler.url, stranger.identity) as client,
        pytest.raises(ComputeError) as info,
    ):
        client.cancel(job)
    assert info.value.status == 403
    bad = tmp_path / "bad.toml"
    bad.write_text('runtime = "wasm"\nmodule = "nope.wasm"\n')
    out = subprocess.run(
        [
            command("dcp-compute"),
            "--scheduler",
            scheduler.url,
            "deploy",
            str(bad),
            "--identity",
            str(owner.path),
            "--passphrase-file",
            str(owner.passphrase_file),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1
    assert "cannot read module" in out.stderr and "Traceback" not in out.stderr
    with ComputeClient(scheduler.url, owner.identity) as client:
        assert client.cancel(job) == 1
        assert client.status(job)["state"] == "cancelled"


def _clang_wasm(source: Path, out: Path) -> bool:
    """Build with Debian's clang and wasi-libc (not zig); False if that toolchain is absent."""
    try:
        built = subprocess.run(
            ["clang", "--target=wasm32-wasi", "-O2", "-o", str(out), str(source)],
            capture_output=True,
            timeout=120,
        )
    except FileNotFoundError:
        return False
    return built.returncode == 0


def test_a_module_from_another_toolchain_runs_unchanged(
    tmp_path: Path,
    scheduler: SchedulerProcess,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    module = tmp_path / "upper.wasm"
    if not _clang_wasm(Path(__file__).parent / "wasm" / "upper.c", module):
        pytest.skip("needs clang, lld and wasi-libc from Debian (.ci/run installs them)")
    workers(scheduler.url, make_keystore("worker"), 2)
    with ComputeClient(scheduler.url, make_keystore("owner").identity) as client:
        job = client.deploy(job_file(tmp_path, "upper", module, ["abc", "Hello, world"], ["!"]))
        results = list(client.results(job, wait=True, timeout=60))
    assert [r.result for r in results] == [b"ABC|!", b"HELLO, WORLD|!"]


def test_scheduler_restart_mid_job(
    tmp_path: Path,
    db: str,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    """The worker reconnects with backoff and resends what it holds; nothing is lost."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ("--lease-timeout", "5", "--heartbeat-interval", "0.5")
    first = SchedulerProcess(db, *args, listen=f"127.0.0.1:{port}", log=tmp_path / "first.log")
    worker = workers(first.url, make_keystore("worker"), 2)
    values = [f"r{i}" for i in range(300)]
    with ComputeClient(first.url, make_keystore("owner").identity) as client:
        job = client.deploy(job_file(tmp_path, "echo", ECHO, values))
        wait_for(lambda: counts(db, job).get("done", 0) >= 50, 60)
        first.proc.kill()
        first.proc.wait()
        first.stop()
        wait_for(lambda: "disconnected from the scheduler" in worker.output(), 30)
        second = SchedulerProcess(
            db, *args, listen=f"127.0.0.1:{port}", log=tmp_path / "second.log"
        )
        try:
            results = list(client.results(job, wait=True, timeout=120))
        finally:
            assert worker.stop() == 0
            second.stop()
    assert [r.result for r in results] == [v.encode() for v in values]
