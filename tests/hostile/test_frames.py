"""An evaluator fed garbage: a named error per bad frame, and it keeps serving; a stream it
cannot resynchronise ends it with exit status 3."""

from __future__ import annotations

import struct

import dcp_protocol as p

from ..evaluator_client import EvaluatorClient


def test_garbage_frames_get_errors_and_the_evaluator_continues() -> None:
    client = EvaluatorClient()
    try:
        for body, code in [
            (b"\x00\x01garbage", "malformed_frame"),
            (b'{"v":1,"type":"rm_rf"}', "unknown_message"),
            (b'{"v":1,"type":"slice","id":"x"}', "invalid_message"),
            (b'{"v":9,"type":"describe","id":1}', "unsupported_version"),
        ]:
            client.send_raw(struct.pack(">I", len(body)) + body)
            reply = client.receive()
            assert isinstance(reply, p.Error) and reply.code == code
        reply = client.request(p.RunSlice(id=1, slice=0, datum=b""))
        assert isinstance(reply, p.Error) and reply.code == "not_assigned"
        reply = client.request(p.Ack(re=1))
        assert isinstance(reply, p.Error) and reply.code == "unexpected_message"
        reply = client.request(p.Describe(id=2))
        assert isinstance(reply, p.Capabilities)
        assert "wasm" in reply.capabilities["runtimes"]
    finally:
        assert client.close() == 0


def test_oversized_length_prefix_ends_the_evaluator() -> None:
    client = EvaluatorClient()
    client.send_raw(struct.pack(">I", 0xFFFFFFF0))
    reply = client.receive()
    assert isinstance(reply, p.Error) and reply.code == "frame_too_large"
    assert client.close() == 3


def test_stream_cut_inside_a_frame() -> None:
    client = EvaluatorClient()
    client.send_raw(p.frame(p.Describe(id=1))[:-3])
    assert client.proc.stdin is not None
    client.proc.stdin.close()
    reply = client.receive()
    assert isinstance(reply, p.Error) and reply.code == "malformed_frame"
    assert client.proc.wait(10) == 3
    client.proc.stdout.close()  # type: ignore[union-attr]
    client.proc.stderr.close()  # type: ignore[union-attr]
