"""The evaluator answers a batch in few writes, but a slow slice in the batch does not hold back
the replies before it (docs/protocol.md: at most 50 ms)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path

import dcp_protocol as p

from .evaluator_client import EvaluatorClient

SPIN = Path(__file__).parent / "wasm" / "spin.c"


def test_a_slow_slice_does_not_hold_back_the_replies_before_it(
    zig_build: Callable[[Path], bytes],
) -> None:
    evaluator = EvaluatorClient()
    try:
        assert isinstance(evaluator.assign(zig_build(SPIN), wall_seconds=30), p.Ack)
        started = time.monotonic()
        evaluator.send_raw(
            p.frame(p.RunSlice(id=evaluator.next_id(), slice=0, datum=b"0"))
            + p.frame(p.RunSlice(id=evaluator.next_id(), slice=1, datum=b"2000"))
        )
        first = evaluator.receive()
        first_at = time.monotonic() - started
        second = evaluator.receive()
        second_at = time.monotonic() - started
    finally:
        evaluator.close()
    assert isinstance(first, p.SliceDone) and first.result == b"done\n"
    assert isinstance(second, p.SliceDone) and second.result == b"done\n"
    assert second_at >= 2.0
    # The fast slice's reply went out while the slow one ran (50 ms, with room for a slow
    # machine), not when the batch ended.
    assert first_at < 1.0, first_at


def test_a_binary_slice_is_answered_in_binary_and_a_json_one_in_json() -> None:
    # The worker sends datums as they are (codec.frame binary); an evaluator answers in the
    # request's form, so a worker of the version before, which sends JSON, reads its replies.
    echo = (Path(__file__).parents[1] / "examples" / "echo" / "echo.wasm").read_bytes()
    datum = bytes(range(256)) * 4 + b"\0"
    client = EvaluatorClient()
    try:
        assert isinstance(client.assign(echo), p.Ack)
        for binary in (True, False, True):
            rid = client.next_id()
            client.send_raw(p.frame(p.RunSlice(id=rid, slice=0, datum=datum), binary=binary))
            reply = client.receive()
            assert isinstance(reply, p.SliceDone) and reply.re == rid, reply
            assert reply.result == datum and client.decoder.binary is binary
        # An assignment's module may come as a binary part too.
        rid = client.next_id()
        assign = p.Assign(
            id=rid,
            job="other",
            runtime="wasm",
            sha256=hashlib.sha256(echo).hexdigest(),
            module=echo,
            argv=(),
            limits=p.Limits(),
        )
        client.send_raw(p.frame(assign, binary=True))
        reply = client.receive()
        assert isinstance(reply, p.Ack) and reply.re == rid, reply
    finally:
        assert client.close() == 0
