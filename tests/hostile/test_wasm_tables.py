"""Tables count against a job's memory cap: a work function that grows a table forever is
stopped with ``memory_limit`` while the evaluator's resident memory stays far below the cap."""

from __future__ import annotations

import wasmtime

import dcp_protocol as p

from ..evaluator_client import EvaluatorClient

CAP = 16 * 1024 * 1024

TABLE_GROW = bytes(
    wasmtime.wat2wasm(
        """(module (memory (export "memory") 1) (table $t (export "table") 1 funcref)
        (func (export "_start")
          (loop (br_if 0 (i32.ne (table.grow $t (ref.null func) (i32.const 1)) (i32.const -1))))
          unreachable))"""
    )
)


def _peak_rss(pid: int) -> int:
    """The evaluator's peak resident set (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


def test_table_growth_is_stopped_by_the_memory_cap() -> None:
    client = EvaluatorClient()
    try:
        assert isinstance(client.assign(TABLE_GROW, memory_bytes=CAP, wall_seconds=2), p.Ack)
        before = _peak_rss(client.proc.pid)
        reply = client.run(b"")
        grown = _peak_rss(client.proc.pid) - before
    finally:
        client.close()
    assert isinstance(reply, p.Error), reply
    assert reply.code == "memory_limit", reply.message
    # The tables' share of a 16 MiB cap is 1 MiB; half the cap leaves room for noise.
    assert grown < CAP // 2, f"peak RSS grew by {grown / 2**20:.0f} MiB"
