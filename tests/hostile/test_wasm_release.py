"""Every slice gives back its store, whatever way it ended: a run of trapping, timed-out and
refused slices must not use up the evaluator's address space for the jobs that come after it.

Each wasm linear memory reserves about 4 GiB of address space; the evaluator runs under an
RLIMIT_AS of 16 GiB (evaluator/launch.py). A store kept alive past its slice (by a traceback
cycle waiting for the garbage collector) made the fourth slice after three traps fail with
``mmap failed to reserve``, for every job on that evaluator.
"""

from __future__ import annotations

import hashlib
import resource

import wasmtime

import dcp_protocol as p
from evaluator.launch import SandboxLimits

from ..conftest import EXAMPLES
from ..evaluator_client import EvaluatorClient

ECHO = (EXAMPLES / "echo" / "echo.wasm").read_bytes()
WASI = "wasi_snapshot_preview1"


def _module(body: str, imports: str = "", memory: str = '(memory (export "memory") 1)') -> bytes:
    return bytes(wasmtime.wat2wasm(f'(module {imports} {memory} (func (export "_start") {body}))'))


#: One module per way a slice can end badly: (name, module, limits, expected code).
ENDINGS = [
    ("trap", _module("unreachable"), {}, "wasm_trap"),
    # (A slice past its wall clock in wasm ends its evaluator, and everything with it.)
    (
        "memory_refused",
        _module("nop", memory='(memory (export "memory") 1000)'),
        {"memory_bytes": 16 * 1024 * 1024},
        "memory_limit",
    ),
    (
        "violation",
        _module(
            "(drop (call $accept (i32.const 3) (i32.const 0) (i32.const 0)))",
            imports=f'(import "{WASI}" "sock_accept" (func $accept (param i32 i32 i32)'
            " (result i32)))",
        ),
        {},
        "sandbox_violation",
    ),
    (
        "exit",
        _module(
            "(call $exit (i32.const 3))",
            imports=f'(import "{WASI}" "proc_exit" (func $exit (param i32)))',
        ),
        {},
        "wasm_exit",
    ),
]


def _address_space_as_deployed() -> None:
    """In the child: the RLIMIT_AS every evaluator gets from evaluator/launch.py."""
    cap = SandboxLimits().address_space_bytes
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def _assign(client: EvaluatorClient, job: str, module: bytes, **limits: object) -> p.Message:
    return client.request(
        p.Assign(
            id=client.next_id(),
            job=job,
            runtime="wasm",
            sha256=hashlib.sha256(module).hexdigest(),
            module=module,
            limits=p.Limits(**limits),  # type: ignore[arg-type]
        )
    )


def _vm_size(pid: int) -> int:
    """The evaluator's mapped address space, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize in /proc/PID/status")


def test_failed_slices_release_their_memory_for_the_next_owner() -> None:
    client = EvaluatorClient(preexec_fn=_address_space_as_deployed)
    try:
        assert isinstance(_assign(client, "warm-up", ECHO), p.Ack)
        assert isinstance(client.run(b"x"), p.SliceDone)
        # Every reply is sent after its slice's store is gone, so the size seen between
        # slices is what a slice leaves behind.
        baseline = _vm_size(client.proc.pid)
        seen: list[tuple[str, str, str]] = []
        for name, module, limits, _code in ENDINGS:
            assert isinstance(_assign(client, f"owner-a-{name}", module, **limits), p.Ack)
            # Twelve of each: three kept reservations would already exhaust 16 GiB.
            for _ in range(12):
                reply = client.run(b"datum")
                assert isinstance(reply, p.Error), reply
                seen.append((name, reply.code, reply.message))
        left_behind = _vm_size(client.proc.pid) - baseline
        assert isinstance(_assign(client, "owner-b", ECHO), p.Ack)
        reply = client.run(b"another owner's slice")
    finally:
        client.close()
    expected = {name: code for name, _m, _l, code in ENDINGS}
    wrong = [s for s in seen if s[1] != expected[s[0]] or "mmap" in s[2]]
    assert not wrong, wrong[:3]
    assert isinstance(reply, p.SliceDone), reply
    assert reply.result == b"another owner's slice"
    # One linear-memory reservation is about 4 GiB; none may outlive its slice.
    assert left_behind < 1024**3, left_behind
