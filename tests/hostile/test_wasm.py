"""Hostile work functions: each is contained with a named error, and the evaluator serves the
next slice normally afterwards."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import wasmtime

import dcp_protocol as p
from dcp_protocol.evaluator_channel import MAY_END_EVALUATOR
from evaluator.process import EXIT_EXPIRED

from ..conftest import EXAMPLES
from ..evaluator_client import EvaluatorClient

ECHO = (EXAMPLES / "echo" / "echo.wasm").read_bytes()
WASI = "wasi_snapshot_preview1"


def wat(text: str) -> bytes:
    return bytes(wasmtime.wat2wasm(text))


def command(
    body: str, imports: str = "", memory: str = '(memory (export "memory") 1)', extra: str = ""
) -> bytes:
    return wat(f"""(module {imports} {memory} {extra}
        (func (export "_start") {body}))""")


FD_WRITE = f'(import "{WASI}" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))'

HOSTILE = {
    "infinite_loop": (command("(loop (br 0))"), {"wall_seconds": 0.5}, "wasm_timeout"),
    "unreachable_trap": (command("unreachable"), {}, "wasm_trap"),
    "divide_by_zero": (command("(drop (i32.div_u (i32.const 1) (i32.const 0)))"), {}, "wasm_trap"),
    "out_of_bounds": (command("(drop (i32.load (i32.const 1000000)))"), {}, "wasm_trap"),
    "deep_recursion": (
        wat("""(module (memory (export "memory") 1)
        (func $f (call $f)) (func (export "_start") (call $f)))"""),
        {},
        "wasm_trap",
    ),
    "grow_memory_forever": (
        command("(loop (br_if 0 (i32.ne (memory.grow (i32.const 1)) (i32.const -1)))) unreachable"),
        {"memory_bytes": 4 * 1024 * 1024},
        "memory_limit",
    ),
    "initial_memory_above_cap": (
        command("nop", memory='(memory (export "memory") 1000)'),
        {"memory_bytes": 16 * 1024 * 1024},
        "memory_limit",
    ),
    # Tables are memory too: 8 bytes an element, uncapped they reached 550 MiB of RSS under a
    # 16 MiB cap. Growing one element at a time keeps the uncapped case slow enough to stop.
    "table_grow_forever": (
        command(
            "(loop (br_if 0 (i32.ne (table.grow $t (ref.null func) (i32.const 1))"
            " (i32.const -1)))) unreachable",
            extra='(table $t (export "table") 1 funcref)',
        ),
        {"memory_bytes": 16 * 1024 * 1024, "wall_seconds": 2},
        "memory_limit",
    ),
    "initial_table_above_cap": (
        command("nop", extra="(table 10000000 funcref)"),
        {"memory_bytes": 16 * 1024 * 1024},
        "memory_limit",
    ),
    # Each memory would get the whole cap: three of 32 MiB ran under a 32 MiB cap.
    "three_memories": (
        command(
            "(i32.store $b (i32.const 0) (i32.const 1)) (i32.store $c (i32.const 0) (i32.const 1))",
            memory='(memory (export "memory") 512) (memory $b 512) (memory $c 512)',
        ),
        {"memory_bytes": 32 * 1024 * 1024},
        "memory_limit",
    ),
    "many_tables": (
        command("nop", extra="(table 1 funcref) (table 1 funcref) (table 1 funcref)"),
        {},
        "memory_limit",
    ),
    "stdout_flood": (
        command(
            # iovec at 0: buffer at 16, 65536 bytes; write it forever, ignoring errors.
            "(i32.store (i32.const 0) (i32.const 16)) (i32.store (i32.const 4) (i32.const 65536))"
            "(loop (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))"
            " (br 0))",
            imports=FD_WRITE,
            memory='(memory (export "memory") 2)',
        ),
        {"output_bytes": 1024 * 1024, "wall_seconds": 1},
        "output_too_large",
    ),
    "path_open": (
        command(
            "(drop (call $open (i32.const 3) (i32.const 0) (i32.const 0) (i32.const 11)"
            " (i32.const 0) (i64.const 0) (i64.const 0) (i32.const 0) (i32.const 100)))",
            imports=f'(import "{WASI}" "path_open" (func $open (param i32 i32 i32 i32 i32 i64 i64'
            " i32 i32) (result i32)))",
            extra='(data (i32.const 0) "/etc/passwd")',
        ),
        {},
        "sandbox_violation",
    ),
    "sock_accept": (
        command(
            "(drop (call $accept (i32.const 3) (i32.const 0) (i32.const 0)))",
            imports=f'(import "{WASI}" "sock_accept" (func $accept (param i32 i32 i32)'
            " (result i32)))",
        ),
        {},
        "sandbox_violation",
    ),
    "host_import": (
        command("(call $system)", imports='(import "env" "system" (func $system))'),
        {},
        "forbidden_import",
    ),
    "dcp_unknown_import": (
        command("(call $x)", imports='(import "dcp" "spawn" (func $x))'),
        {},
        "forbidden_import",
    ),
    "progress_wrong_signature": (
        command(
            "(drop (call $p (i32.const 1)))",
            imports='(import "dcp" "progress" (func $p (param i32) (result i32)))',
        ),
        {},
        "forbidden_import",
    ),
    "wasi_function_that_does_not_exist": (
        command("(call $x)", imports=f'(import "{WASI}" "launch_rocket" (func $x))'),
        {},
        "forbidden_import",
    ),
    "wasi_memory_import": (
        command("nop", imports=f'(import "{WASI}" "memory" (memory 1))', memory=""),
        {},
        "forbidden_import",
    ),
    "nonzero_exit": (
        command(
            "(call $exit (i32.const 3))",
            imports=f'(import "{WASI}" "proc_exit" (func $exit (param i32)))',
        ),
        {},
        "wasm_exit",
    ),
    "fuel_exhausted": (command("(loop (br 0))"), {"fuel": 100_000}, "wasm_fuel_exhausted"),
    "not_wasm": (b"#!/bin/sh\nrm -rf /\n", {}, "invalid_module"),
    "truncated_wasm": (ECHO[: len(ECHO) // 2], {}, "invalid_module"),
    "no_start": (wat('(module (func (export "main")))'), {}, "invalid_module"),
    "huge_garbage": (
        b"\x00asm\x01\x00\x00\x00" + b"\xff" * (8 * 1024 * 1024),
        {},
        "invalid_module",
    ),
}


@pytest.fixture(scope="module")
def evaluator() -> Iterator[EvaluatorClient]:
    client = EvaluatorClient()
    yield client
    assert client.close() == 0


def _echo_still_works(client: EvaluatorClient) -> None:
    assert isinstance(client.assign(ECHO), p.Ack)
    reply = client.run(b"still alive")
    assert isinstance(reply, p.SliceDone) and reply.result == b"still alive"


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_module_is_contained(evaluator: EvaluatorClient, name: str) -> None:
    module, limits, code = HOSTILE[name]
    reply = evaluator.assign(module, **limits)
    if isinstance(reply, p.Ack):
        reply = evaluator.run(b"datum")
    assert isinstance(reply, p.Error), reply
    assert reply.code == code, reply.message
    assert reply.message
    if code in MAY_END_EVALUATOR:  # as the worker does: a fresh evaluator
        status = evaluator.renew()
        # A loop ends its evaluator; a flood may be stopped by its write or by the clock.
        assert status == EXIT_EXPIRED if name == "infinite_loop" else status in (0, EXIT_EXPIRED)
    _echo_still_works(evaluator)


def test_environment_is_empty(evaluator: EvaluatorClient) -> None:
    """environ_sizes_get reports zero variables; the module writes the count as one byte."""
    module = command(
        "(drop (call $sizes (i32.const 0) (i32.const 4)))"
        "(i32.store8 (i32.const 16) (i32.add (i32.const 48) (i32.load (i32.const 0))))"
        "(i32.store (i32.const 8) (i32.const 16)) (i32.store (i32.const 12) (i32.const 1))"
        "(drop (call $fd_write (i32.const 1) (i32.const 8) (i32.const 1) (i32.const 20)))",
        imports=f'(import "{WASI}" "environ_sizes_get" (func $sizes (param i32 i32)'
        f" (result i32))) {FD_WRITE}",
    )
    assert isinstance(evaluator.assign(module), p.Ack)
    reply = evaluator.run(b"")
    assert isinstance(reply, p.SliceDone) and reply.result == b"0"


def test_module_hash_is_checked(evaluator: EvaluatorClient) -> None:
    reply = evaluator.request(
        p.Assign(id=evaluator.next_id(), job="j", runtime="wasm", sha256="00" * 32, module=ECHO)
    )
    assert isinstance(reply, p.Error) and reply.code == "invalid_module"


def test_unsupported_runtime(evaluator: EvaluatorClient) -> None:
    reply = evaluator.request(
        p.Assign(
            id=evaluator.next_id(),
            job="j",
            runtime="cuda",
            sha256=hashlib.sha256(ECHO).hexdigest(),
            module=ECHO,
        )
    )
    assert isinstance(reply, p.Error) and reply.code == "unsupported_runtime"


def test_c_program_that_opens_a_file(
    tmp_path: Path, evaluator: EvaluatorClient, zig_build: object
) -> None:
    source = Path(__file__).with_name("open_file.c")
    module = zig_build(source)  # type: ignore[operator]
    assert isinstance(evaluator.assign(module), p.Ack)
    reply = evaluator.run(b"/etc/passwd")
    # wasi-libc finds no preopened directory and fails the open itself: no syscall is made
    # (the direct path_open call is the "path_open" case above, which traps).
    assert isinstance(reply, p.SliceDone), reply
    assert reply.result == b"open failed\n"
