"""No evaluator outlives what started it: a SIGKILLed worker (a Sandbox in a subprocess), a
dropped manager connection, a SIGKILLed manager."""

from __future__ import annotations

import hashlib
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import psutil
import wasmtime

import dcp_protocol as p

from .conftest import ROOT, wait_for
from .test_manager import ManagerProcess, managers  # noqa: F401  (the fixture)

#: Reports progress (so the test knows the slice runs), then sleeps 60 s by the wall clock
#: (WASI poll_oneoff on a relative monotonic clock): a long slice that costs no CPU.
SLEEPER = wasmtime.wat2wasm(
    """(module
      (import "dcp" "progress" (func $progress (param f64)))
      (import "wasi_snapshot_preview1" "poll_oneoff"
        (func $poll (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (func (export "_start")
        (call $progress (f64.const 0.01))
        (i32.store (i32.const 16) (i32.const 1))
        (i64.store (i32.const 24) (i64.const 60000000000))
        (drop (call $poll (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 128)))))"""
)
SHA = hashlib.sha256(SLEEPER).hexdigest()
LIMITS = p.Limits(wall_seconds=120)


def _gone(pid: int) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    return check


def _only_child(parent: int) -> int:
    """The one evaluator process ``parent`` started."""
    children: list[psutil.Process] = []

    def found() -> bool:
        children.clear()
        for child in psutil.Process(parent).children():
            try:
                if "--stdio" in child.cmdline():
                    children.append(child)
            except psutil.NoSuchProcess:
                pass  # a short-lived helper (a probe) ended meanwhile
        return len(children) == 1

    wait_for(found, 30)
    return children[0].pid


def test_evaluator_dies_with_a_sigkilled_worker(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import asyncio, sys
            from dcp_protocol import JobSpec, Limits
            from evaluator.client import Sandbox

            async def main():
                sandbox = Sandbox(0)
                job = JobSpec("sleeper", "wasm", {SLEEPER!r}, {SHA!r}, limits=Limits(120))
                def running(fraction):
                    print("running", flush=True)
                await sandbox.run(job, job.limits, b"", 0, running)

            asyncio.run(main())
            """
        )
    )
    worker = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert worker.stdout is not None
        assert worker.stdout.readline() == "running\n"  # the slice sleeps in the evaluator
        evaluator = _only_child(worker.pid)
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        wait_for(_gone(evaluator), 10)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        if worker.stdout is not None:
            worker.stdout.close()
        if not _gone(evaluator)():  # a failed run leaves nothing behind
            psutil.Process(evaluator).kill()


def _start_slice(path: str) -> socket.socket:
    """Connect to a manager as a worker would, assign the sleeper, run one slice of it and
    return once it reports progress (the evaluator is inside the slice)."""
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(path)
    sock.settimeout(30)
    sock.sendall(
        p.frame(
            p.Assign(id=1, job="sleeper", runtime="wasm", sha256=SHA, module=SLEEPER, limits=LIMITS)
        )
        + p.frame(p.RunSlice(id=2, slice=0, datum=b""))
    )
    decoder = p.StreamDecoder(p.EVALUATOR_MESSAGES)
    while True:
        message = decoder.next_message()
        if message is None:
            data = sock.recv(65536)
            assert data, "the manager closed the connection"
            decoder.receive_data(data)
        elif isinstance(message, p.Progress):
            return sock
        else:
            assert isinstance(message, p.Ack), message


def test_manager_evaluators_die_with_their_connection_and_with_the_manager(
    managers: Callable[..., ManagerProcess],  # noqa: F811
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "m.sock")
    manager = managers("--no-tcp", "--socket", path, "--tty-idle", "0", "--ignore-screensaver")
    conn = _start_slice(path)
    evaluator = _only_child(manager.proc.pid)
    conn.close()  # the worker hangs up
    wait_for(_gone(evaluator), 10)

    conn = _start_slice(path)
    evaluator = _only_child(manager.proc.pid)
    try:
        manager.proc.send_signal(signal.SIGKILL)
        manager.proc.wait(10)
        wait_for(_gone(evaluator), 10)
    finally:
        conn.close()
        if not _gone(evaluator)():
            psutil.Process(evaluator).kill()
