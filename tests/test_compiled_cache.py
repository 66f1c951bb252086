"""Jobs' compiled modules are kept on disk: a restarted evaluator does not compile again."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

import dcp_protocol as p
from dcp_protocol import Limits, SliceFailure
from evaluator.wasm import WasmRuntime, _prune
from tests.conftest import EXAMPLES
from tests.evaluator_client import EvaluatorClient

ECHO = (EXAMPLES / "echo" / "echo.wasm").read_bytes()
ECHO_SHA = hashlib.sha256(ECHO).hexdigest()


def test_a_job_module_compiled_once_is_loaded_from_disk_by_the_next_evaluator(
    tmp_path: Path,
) -> None:
    cache = tmp_path / "compiled"
    first = WasmRuntime()
    first.compile_cached(ECHO, ECHO_SHA, Limits(), cache)
    (entry,) = cache.iterdir()
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    written = entry.stat().st_mtime_ns

    # A fresh runtime (a restarted worker's evaluator) given no bytes at all: only the disk
    # can serve it, and it runs.
    restarted = WasmRuntime()
    restarted.compile_cached(None, ECHO_SHA, Limits(), cache)
    out = restarted.run(ECHO_SHA, (), Limits(), b"hello").result
    assert out == b"hello"
    assert entry.stat().st_mtime_ns == written  # read, not written again

    # Without the cache, no bytes is what it always was: refused by name.
    with pytest.raises(SliceFailure) as refused:
        WasmRuntime().compile_cached(None, ECHO_SHA, Limits(), None)
    assert refused.value.code is p.ErrorCode.MODULE_NOT_CACHED


def test_a_cached_module_that_was_altered_or_is_writable_by_others_is_compiled_again(
    tmp_path: Path,
) -> None:
    cache = tmp_path / "compiled"
    WasmRuntime().compile_cached(ECHO, ECHO_SHA, Limits(), cache)
    (entry,) = cache.iterdir()
    entry.write_bytes(entry.read_bytes()[:-100])
    os.chmod(entry, 0o600)
    with pytest.raises(SliceFailure) as refused:  # truncated: not loaded, and no bytes came
        WasmRuntime().compile_cached(None, ECHO_SHA, Limits(), cache)
    assert refused.value.code is p.ErrorCode.MODULE_NOT_CACHED
    runtime = WasmRuntime()
    runtime.compile_cached(ECHO, ECHO_SHA, Limits(), cache)  # compiled again, replaced
    assert runtime.run(ECHO_SHA, (), Limits(), b"x").result == b"x"
    WasmRuntime().compile_cached(None, ECHO_SHA, Limits(), cache)  # whole again
    os.chmod(entry, 0o644 | 0o022)
    with pytest.raises(SliceFailure):
        WasmRuntime().compile_cached(None, ECHO_SHA, Limits(), cache)


def test_modules_that_are_refused_are_never_written(tmp_path: Path) -> None:
    cache = tmp_path / "compiled"
    no_start = b"\0asm\x01\0\0\0"  # valid, empty: exports no _start
    for body in (no_start, b"not wasm at all"):
        with pytest.raises(SliceFailure) as refused:
            WasmRuntime().compile_cached(body, hashlib.sha256(body).hexdigest(), Limits(), cache)
        assert refused.value.code is p.ErrorCode.INVALID_MODULE
    with pytest.raises(SliceFailure) as refused:  # bytes that are not the module named
        WasmRuntime().compile_cached(ECHO, "00" * 32, Limits(), cache)
    assert refused.value.code is p.ErrorCode.INVALID_MODULE
    assert not cache.exists() or not any(cache.iterdir())


def test_the_disk_cache_keeps_the_most_recently_used_modules_within_its_budget(
    tmp_path: Path,
) -> None:
    for age, name in enumerate(["old", "middle", "new"]):
        path = tmp_path / f"{name}.cwasm"
        path.write_bytes(b"x" * 1000)
        os.utime(path, ns=(age * 10**9, age * 10**9))
    (tmp_path / "unrelated.txt").write_bytes(b"y" * 5000)
    _prune(tmp_path, 2000, keep=tmp_path / "old.cwasm")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["new.cwasm", "old.cwasm", "unrelated.txt"]
    _prune(tmp_path, 0, keep=tmp_path / "new.cwasm")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["new.cwasm", "unrelated.txt"]


def test_a_restarted_evaluator_runs_a_job_module_without_compiling_it_again(
    tmp_path: Path,
) -> None:
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    first = EvaluatorClient(env=env)
    try:
        assert isinstance(first.assign(ECHO), p.Ack)
        done = first.run(b"one")
        assert isinstance(done, p.SliceDone) and done.result == b"one"
    finally:
        first.close()
    (entry,) = (tmp_path / "dcp-worker" / "compiled").iterdir()
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600
    second = EvaluatorClient(env=env)
    try:
        # The worker did not send the module: only the disk cache can have it.
        assert isinstance(second.assign(ECHO, send_module=False), p.Ack)
        done = second.run(b"two")
        assert isinstance(done, p.SliceDone) and done.result == b"two"
    finally:
        second.close()
