"""The wire protocol without sockets: bytes in, messages out, and back."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dcp_worker import protocol as p
from dcp_worker.protocol import states

ADDR = "0x" + "ab" * 20
SIG = "cd" * 65
SHA = "ef" * 32

MESSAGES: list[p.Message] = [
    p.Hello(protocol=1, challenge="00" * 32, server="s"),
    p.Auth(id=1, address=ADDR, signature=SIG, payment_address=ADDR, agent="dcp-worker/0"),
    p.Welcome(
        re=1,
        session="x",
        address=ADDR,
        heartbeat_interval=3.0,
        lease_timeout=15.0,
        max_result_bytes=1024,
    ),
    p.Fetch(id=2, max_slices=4, capabilities={"runtimes": {"wasm": {}}}, known_jobs=("j",)),
    p.Work(
        re=2,
        slices=(p.SliceLease("j", 0, "t", 1, 12.5, b"\x00\xffdatum"),),
        jobs=(p.JobSpec("j", "wasm", b"\x00asm", SHA, ("20",), p.Limits(fuel=10)),),
    ),
    p.Work(re=3),
    p.Heartbeat(id=4, leases=(p.LeaseRef("j", 0, "t", 0.5), p.LeaseRef("j", 1, "u"))),
    p.HeartbeatAck(re=4, deadline=99.0, lost=(p.LeaseRef("j", 1, "u"),)),
    p.Result(
        id=5,
        job="j",
        slice=0,
        token="t",
        result=b"out",
        payment_address=ADDR,
        signature=SIG,
        metrics=p.Metrics(1.0, 0.5, 3, 3),
    ),
    p.Results(
        id=8,
        results=(
            p.ResultItem("j", 0, "t", b"out", ADDR, SIG, p.Metrics(1.0, 0.5, 3, 3)),
            p.ResultItem("j", 1, "u", b"", ADDR, SIG),
        ),
    ),
    p.ResultsAck(
        re=8,
        acks=(p.ItemAck("accepted", 0.5), p.ItemAck("refused", code="stale_lease", message="m")),
    ),
    p.SliceFailed(id=6, job="j", slice=1, token="u", code="wasm_trap", message="unreachable"),
    p.Return(id=7, leases=(p.LeaseRef("j", 2, "v"),)),
    p.Ack(re=7, status="accepted"),
    p.Error(re=None, code="malformed_frame", message="bad"),
    p.Describe(id=1),
    p.Capabilities(re=1, capabilities={"memory_bytes": 1}),
    p.Assign(id=2, job="j", runtime="wasm", sha256=SHA, module=None),
    p.Assign(id=2, job="j", runtime="wasm", sha256=SHA, module=b"\x00asm", argv=("a",)),
    p.RunSlice(id=3, slice=0, datum=b""),
    p.Progress(re=3, fraction=0.25),
    p.SliceDone(re=3, result=b"\x01", metrics=p.Metrics()),
    p.Die(id=9),
]


def registry_of(message: p.Message) -> dict[str, type[p.Message]]:
    if message.type in p.SCHEDULER_MESSAGES:
        return p.SCHEDULER_MESSAGES
    return p.EVALUATOR_MESSAGES


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: m.type)
def test_round_trip(message: p.Message) -> None:
    data = p.encode(message)
    assert json.loads(data)["v"] == p.PROTOCOL_VERSION
    assert p.decode(data, registry_of(message)) == message


def test_every_message_type_is_covered() -> None:
    covered = {m.type for m in MESSAGES}
    assert covered == set(p.SCHEDULER_MESSAGES) | set(p.EVALUATOR_MESSAGES)


def test_stream_decoder_one_byte_at_a_time() -> None:
    evaluator_messages = [m for m in MESSAGES if m.type in p.EVALUATOR_MESSAGES]
    stream = b"".join(p.frame(m) for m in evaluator_messages)
    decoder = p.StreamDecoder(p.EVALUATOR_MESSAGES)
    out = []
    for byte in stream:
        decoder.receive_data(bytes([byte]))
        while (m := decoder.next_message()) is not None:
            out.append(m)
    assert out == evaluator_messages
    assert decoder.buffered == 0


def test_stream_decoder_many_frames_in_one_chunk() -> None:
    decoder = p.StreamDecoder(p.EVALUATOR_MESSAGES)
    decoder.receive_data(p.frame(p.Describe(id=1)) * 3)
    assert [decoder.next_message() for _ in range(4)] == [p.Describe(id=1)] * 3 + [None]


def _raw(obj: object) -> bytes:
    return json.dumps(obj).encode()


BAD_FRAMES = [
    (b"\xff\xfe", p.FrameError, "malformed_frame"),
    (b"{not json", p.FrameError, "malformed_frame"),
    (b"[1, 2]", p.FrameError, "malformed_frame"),
    (_raw({"type": "ack", "re": 1}), p.UnsupportedVersion, "unsupported_version"),
    (_raw({"v": 2, "type": "ack", "re": 1}), p.UnsupportedVersion, "unsupported_version"),
    (_raw({"v": 1, "re": 1}), p.FrameError, "malformed_frame"),
    (_raw({"v": 1, "type": "launch_missiles"}), p.UnknownMessage, "unknown_message"),
    (_raw({"v": 1, "type": "ack"}), p.InvalidMessage, "invalid_message"),
    (_raw({"v": 1, "type": "ack", "re": 1, "extra": 2}), p.InvalidMessage, "invalid_message"),
    (_raw({"v": 1, "type": "ack", "re": "1"}), p.InvalidMessage, "invalid_message"),
    (_raw({"v": 1, "type": "ack", "re": True}), p.InvalidMessage, "invalid_message"),
    (
        _raw({"v": 1, "type": "fetch", "id": 1, "max_slices": 0}),
        p.InvalidMessage,
        "invalid_message",
    ),
    (
        _raw({"v": 1, "type": "fetch", "id": 1, "max_slices": 5000}),
        p.InvalidMessage,
        "invalid_message",
    ),
    (
        _raw(
            {
                "v": 1,
                "type": "auth",
                "id": 1,
                "address": "0x12",
                "signature": SIG,
                "payment_address": ADDR,
            }
        ),
        p.InvalidMessage,
        "invalid_message",
    ),
    (
        _raw(
            {
                "v": 1,
                "type": "result",
                "id": 1,
                "job": "j",
                "slice": 0,
                "token": "t",
                "result": "!!notbase64",
                "payment_address": ADDR,
                "signature": SIG,
            }
        ),
        p.InvalidMessage,
        "invalid_message",
    ),
    (
        _raw({"v": 1, "type": "work", "re": 1, "slices": [{"job": "j"}]}),
        p.InvalidMessage,
        "invalid_message",
    ),
    (_raw({"v": 1, "type": "work", "re": 1, "slices": {}}), p.InvalidMessage, "invalid_message"),
]


@pytest.mark.parametrize(("data", "exc", "code"), BAD_FRAMES)
def test_bad_frames_are_named(data: bytes, exc: type[p.ProtocolError], code: str) -> None:
    with pytest.raises(exc) as info:
        p.decode(data, p.SCHEDULER_MESSAGES)
    assert info.value.code.value == code


def test_oversized_frame() -> None:
    with pytest.raises(p.FrameTooLarge) as info:
        p.decode(b" " * 101, p.SCHEDULER_MESSAGES, max_bytes=100)
    assert info.value.code is p.ErrorCode.FRAME_TOO_LARGE
    assert (info.value.size, info.value.limit) == (101, 100)


def test_stream_recovers_after_a_bad_frame() -> None:
    decoder = p.StreamDecoder(p.EVALUATOR_MESSAGES)
    body = b"{garbage"
    decoder.receive_data(len(body).to_bytes(4, "big") + body + p.frame(p.Describe(id=5)))
    with pytest.raises(p.FrameError):
        decoder.next_message()
    assert not decoder.broken
    assert decoder.next_message() == p.Describe(id=5)


def test_stream_oversized_prefix_is_fatal() -> None:
    decoder = p.StreamDecoder(p.EVALUATOR_MESSAGES, max_bytes=1000)
    decoder.receive_data((1001).to_bytes(4, "big"))
    with pytest.raises(p.FrameTooLarge):
        decoder.next_message()
    assert decoder.broken


def test_stream_truncated_at_eof_is_fatal() -> None:
    decoder = p.StreamDecoder(p.EVALUATOR_MESSAGES)
    decoder.receive_data(p.frame(p.Describe(id=1))[:-2])
    assert decoder.next_message() is None
    decoder.receive_eof()
    with pytest.raises(p.FrameError):
        decoder.next_message()
    assert decoder.broken


@given(st.binary(max_size=300))
def test_fuzz_decode_raises_only_protocol_errors(data: bytes) -> None:
    try:
        p.decode(data, p.SCHEDULER_MESSAGES)
    except p.ProtocolError:
        pass


@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False)
        | st.text(max_size=10),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=10), children, max_size=4)
        ),
        max_leaves=20,
    ),
    st.sampled_from(sorted(p.SCHEDULER_MESSAGES)),
)
def test_fuzz_structured_fields(value: object, type_: str) -> None:
    """Well-formed JSON with arbitrary field values: only documented errors escape."""
    cls = p.SCHEDULER_MESSAGES[type_]
    fields = {f: value for f in cls.__dataclass_fields__}
    try:
        p.decode(json.dumps({"v": 1, "type": type_, **fields}), p.SCHEDULER_MESSAGES)
    except p.ProtocolError:
        pass


@given(st.binary(max_size=200), st.integers(min_value=1, max_value=50))
def test_fuzz_stream_decoder(data: bytes, chunk: int) -> None:
    decoder = p.StreamDecoder(p.EVALUATOR_MESSAGES, max_bytes=1 << 16)
    for i in range(0, len(data), chunk):
        decoder.receive_data(data[i : i + chunk])
        while not decoder.broken:
            try:
                if decoder.next_message() is None:
                    break
            except p.ProtocolError:
                continue


@pytest.mark.parametrize("state", list(states.SliceState))
@pytest.mark.parametrize("event", list(states.SliceEvent))
def test_slice_table_is_total(state: states.SliceState, event: states.SliceEvent) -> None:
    """Every (state, event) either has an entry or raises IllegalTransition."""
    if (state, event) in states.SLICE_TRANSITIONS:
        assert p.transition(state, event) is states.SLICE_TRANSITIONS[(state, event)]
    else:
        with pytest.raises(p.IllegalTransition):
            p.transition(state, event)


def test_final_states_only_leave_by_reset() -> None:
    for (state, event), _new in states.SLICE_TRANSITIONS.items():
        if state in states.FINAL_STATES:
            assert event is states.SliceEvent.RESET


def test_protocol_package_does_no_io() -> None:
    """The sans-I/O rule: the protocol package imports no socket, pipe or daemon module."""
    import ast
    from pathlib import Path

    forbidden = {
        "socket",
        "asyncio",
        "subprocess",
        "websockets",
        "aiohttp",
        "sqlite3",
        "dcp_worker.supervisor",
        "scheduler",
        "evaluator",
    }
    root = Path(p.__file__).parent
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in forbidden and name not in forbidden, (path, name)


def test_results_frames_are_bounded_and_checked() -> None:
    item = p.ResultItem("j", 0, "t", b"", ADDR, SIG)
    with pytest.raises(p.InvalidMessage, match="1..256"):
        p.Results(id=1, results=())
    with pytest.raises(p.InvalidMessage, match="1..256"):
        p.Results(id=1, results=(item,) * (p.MAX_RESULTS_PER_FRAME + 1))
    with pytest.raises(p.InvalidMessage, match="signature"):
        p.ResultItem("j", 0, "t", b"", ADDR, "zz")
    with pytest.raises(p.InvalidMessage, match="status"):
        p.ItemAck("maybe")
