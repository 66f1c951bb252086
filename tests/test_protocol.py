"""The wire protocol without sockets: bytes in, messages out, and back."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

import dcp_protocol as p
from dcp_protocol import states

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


def test_binary_frames_carry_their_bytes_as_they_are_one_byte_at_a_time() -> None:
    evaluator_messages = [m for m in MESSAGES if m.type in p.EVALUATOR_MESSAGES]
    big = p.RunSlice(id=9, slice=1, datum=bytes(range(256)) * 300 + b"\0{}\0")  # NULs too
    messages = [*evaluator_messages, big]
    stream = b"".join(p.frame(m, binary=True) for m in messages)
    assert len(p.frame(big, binary=True)) < len(big.datum) + 100  # no base64, no JSON
    decoder = p.StreamDecoder(p.EVALUATOR_MESSAGES)
    out, binary = [], []
    for byte in stream:
        decoder.receive_data(bytes([byte]))
        while (m := decoder.next_message()) is not None:
            out.append(m)
            binary.append(decoder.binary)
    assert out == messages
    carried = [m.type in p.BLOB_FIELDS and getattr(m, p.BLOB_FIELDS[m.type]) is not None
               for m in messages]  # fmt: skip
    assert binary == carried and any(carried) and not all(carried)


def _binary_body(header: dict[str, object], blob: bytes) -> bytes:
    body = json.dumps({"v": 1, **header}).encode() + b"\0" + blob
    return len(body).to_bytes(4, "big") + body


@pytest.mark.parametrize(
    "header",
    [
        {"type": "describe", "id": 1, "blob": "id"},  # a message with no bytes field
        {"type": "slice", "id": 1, "slice": 0},  # the field unnamed
        {"type": "slice", "id": 1, "slice": 0, "blob": "slice"},  # another field named
        {"type": "slice", "id": 1, "slice": 0, "datum": "eA==", "blob": "datum"},  # both
    ],
)
def test_a_binary_frame_that_does_not_say_its_field_is_refused_and_the_stream_goes_on(
    header: dict[str, object],
) -> None:
    decoder = p.StreamDecoder(p.EVALUATOR_MESSAGES)
    decoder.receive_data(_binary_body(header, b"raw") + p.frame(p.Describe(id=5)))
    with pytest.raises(p.FrameError, match="binary"):
        decoder.next_message()
    assert not decoder.broken
    assert decoder.next_message() == p.Describe(id=5) and not decoder.binary


def test_json_cannot_pass_bytes_for_a_binary_part() -> None:
    # Only a binary frame's part may fill a bytes field unencoded: a JSON frame (and every
    # websocket frame is one) naming "blob" is an unexpected field.
    frame = json.dumps({"v": 1, "type": "slice", "id": 1, "slice": 0, "datum": "", "blob": "datum"})
    with pytest.raises(p.InvalidMessage, match="blob"):
        p.decode(frame, p.EVALUATOR_MESSAGES)


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


def _wire(message: p.Message, **changes: object) -> str:
    """``message``'s frame with fields replaced by raw JSON values (out of range, say)."""
    data = json.loads(p.encode(message))
    for path, value in changes.items():
        node = data
        *parents, last = path.split("__")
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        node[int(last) if last.isdigit() else last] = value
    return json.dumps(data)


_BY_TYPE = {m.type: m for m in reversed(MESSAGES)}
#: (message type, field path, value, where the error must point): every numeric field of
#: every message, out of its documented range (docs/protocol.md section 1, "Numbers").
OUT_OF_RANGE = [
    ("hello", "protocol", -1, "hello.protocol"),
    ("hello", "protocol", 2**32, "hello.protocol"),
    ("auth", "id", -1, "auth.id"),
    ("auth", "id", 2**64, "auth.id"),
    ("welcome", "re", 2**64, "welcome.re"),
    ("welcome", "max_result_bytes", 0, "welcome.max_result_bytes"),
    ("welcome", "max_result_bytes", p.MAX_FRAME_BYTES + 1, "welcome.max_result_bytes"),
    ("welcome", "max_frame_bytes", p.MAX_FRAME_BYTES + 1, "welcome.max_frame_bytes"),
    ("welcome", "max_frame_bytes", 1024, "welcome: max_frame_bytes"),  # no room for one result
    ("welcome", "heartbeat_interval", -1.0, "welcome.heartbeat_interval"),
    ("welcome", "lease_timeout", 0, "welcome: lease_timeout"),
    ("fetch", "id", 2**64, "fetch.id"),
    ("fetch", "max_slices", 2**64, "fetch.max_slices"),
    ("fetch", "wait_seconds", 10**400, "fetch.wait_seconds"),  # float() would overflow
    ("fetch", "min_wage", {"cpu_hour": -1}, "fetch.min_wage.cpu_hour"),
    ("fetch", "declined", [{"job": "j", "offer": -0.5}], "fetch.declined[0].offer"),
    ("work", "re", -1, "work.re"),
    ("work", "slices__0__slice", -1, "work.slices[0].slice"),
    ("work", "slices__0__slice", 2**63, "work.slices[0].slice"),
    ("work", "slices__0__attempt", 0, "work.slices[0].attempt"),
    ("work", "slices__0__deadline", -5.0, "work.slices[0].deadline"),
    ("work", "slices__0__offer", -1, "work.slices[0].offer"),
    ("work", "jobs__0__limits__memory_bytes", 2**64, "work.jobs[0].limits.memory_bytes"),
    ("work", "jobs__0__limits__fuel", -1, "work.jobs[0].limits.fuel"),
    ("heartbeat", "id", 2**64, "heartbeat.id"),
    ("heartbeat", "leases__0__slice", 2**64, "heartbeat.leases[0].slice"),
    ("heartbeat", "leases__0__progress", 1.5, "heartbeat.leases[0].progress"),
    ("heartbeat_ack", "deadline", -1, "heartbeat_ack.deadline"),
    ("heartbeat_ack", "lost__0__slice", -1, "heartbeat_ack.lost[0].slice"),
    ("result", "slice", -1, "result.slice"),
    ("result", "slice", 2**64, "result.slice"),
    ("result", "metrics__bytes_in", -1, "result.metrics.bytes_in"),
    ("result", "metrics__bytes_out", 2**63, "result.metrics.bytes_out"),
    ("result", "metrics__cpu_seconds", -1.0, "result.metrics.cpu_seconds"),
    ("results", "id", 2**64, "results.id"),
    ("results", "results__1__slice", -1, "results.results[1].slice"),
    ("results", "results__0__metrics__wall_seconds", -2, "results.results[0].metrics.wall_seconds"),
    ("results_ack", "acks__0__credited", -1, "results_ack.acks[0].credited"),
    ("slice_failed", "slice", 2**64, "slice_failed.slice"),
    ("return", "leases__0__slice", -1, "return.leases[0].slice"),
    ("ack", "credited", -0.5, "ack.credited"),
    ("error", "re", -1, "error.re"),
    ("describe", "id", -1, "describe.id"),
    ("capabilities", "re", 2**64, "capabilities.re"),
    ("assign", "limits", {"output_bytes": 2**64}, "assign.limits.output_bytes"),
    ("slice", "slice", -1, "slice.slice"),
    ("progress", "fraction", -0.1, "progress.fraction"),
    ("slice_done", "metrics", {"bytes_out": -1}, "slice_done.metrics.bytes_out"),
    ("die", "id", 2**64, "die.id"),
    ("work", "jobs__0__limits__wall_seconds", -1, "work.jobs[0].limits.wall_seconds"),
    ("result", "metrics__gpu_seconds", -1, "result.metrics.gpu_seconds"),
    ("fetch", "min_wage", {"gpu_hour": -1}, "fetch.min_wage.gpu_hour"),
    ("fetch", "min_wage", {"mb_in": -1e300}, "fetch.min_wage.mb_in"),
    ("fetch", "min_wage", {"mb_out": -1}, "fetch.min_wage.mb_out"),
    ("ack", "re", -1, "ack.re"),
    ("assign", "id", 2**64, "assign.id"),
    ("heartbeat_ack", "re", -1, "heartbeat_ack.re"),
    ("progress", "re", -1, "progress.re"),
    ("result", "id", 2**64, "result.id"),
    ("results_ack", "re", 2**64, "results_ack.re"),
    ("return", "id", -1, "return.id"),
    ("slice", "id", 2**64, "slice.id"),
    ("slice_done", "re", -1, "slice_done.re"),
    ("slice_failed", "id", -1, "slice_failed.id"),
]


@pytest.mark.parametrize(("type_", "path", "value", "where"), OUT_OF_RANGE)
def test_numbers_out_of_range_are_refused_naming_the_field(
    type_: str, path: str, value: object, where: str
) -> None:
    message = _BY_TYPE[type_]
    with pytest.raises(p.InvalidMessage) as caught:
        p.decode(_wire(message, **{path: value}), registry_of(message))
    assert where in caught.value.message
    assert caught.value.code == "invalid_message"


def test_the_ends_of_the_ranges_are_accepted() -> None:
    result = _BY_TYPE["result"]
    for slice_ in (0, 2**63 - 1):
        decoded = p.decode(_wire(result, slice=slice_, id=2**64 - 1), p.SCHEDULER_MESSAGES)
        assert isinstance(decoded, p.Result) and decoded.slice == slice_
    work = p.decode(_wire(_BY_TYPE["work"], slices__0__offer=10**300), p.SCHEDULER_MESSAGES)
    assert isinstance(work, p.Work) and work.slices[0].offer == 1e300


def _records(tp: object) -> list[type]:
    import dataclasses
    import typing

    args = [tp, *typing.get_args(tp)]
    args += [a for arg in args for a in typing.get_args(arg)]
    return [a for a in args if isinstance(a, type) and dataclasses.is_dataclass(a)]


def _numeric(tp: object) -> bool:
    import typing

    args = {tp, *typing.get_args(tp)}
    return int in args or float in args


def test_every_numeric_field_has_an_out_of_range_case() -> None:
    """The table above names every int and float field of every message type, and every
    numeric field of every record class (a record's fields are checked by one plan wherever
    the record appears)."""
    import re
    import typing

    covered_top: set[tuple[str, str]] = set()
    covered_fields: set[tuple[type, str]] = set()
    registry = {**p.SCHEDULER_MESSAGES, **p.EVALUATOR_MESSAGES}
    for type_, *_x, where in OUT_OF_RANGE:
        parts = re.sub(r"\[\d+\]", "", where).replace(": ", ".").split(".")
        cls: type = registry[type_]
        covered_top.add((type_, parts[1]))
        for part in parts[1:]:
            covered_fields.add((cls, part))
            inner = _records(typing.get_type_hints(cls)[part])
            if not inner:
                break
            cls = inner[0]
    missing = []
    seen: set[type] = set()
    todo: list[type] = []
    for type_, cls in registry.items():
        for name, tp in typing.get_type_hints(cls).items():
            if _numeric(tp) and (cls, name) not in covered_fields:
                missing.append(f"{type_}.{name}")
            if (
                _records(tp)
                and any(
                    _numeric(t) for r in _records(tp) for t in typing.get_type_hints(r).values()
                )
                and (type_, name) not in covered_top
            ):
                missing.append(f"{type_}.{name} (a record with numbers)")
            todo += _records(tp)
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        for name, tp in typing.get_type_hints(cls).items():
            if _numeric(tp) and (cls, name) not in covered_fields:
                missing.append(f"{cls.__name__}.{name}")
            todo += _records(tp)
    assert not missing, sorted(missing)


def test_result_item_bytes_is_exact_and_frames_stay_under_their_bound() -> None:
    items = [
        p.ResultItem("job", 0, "tok", b"", ADDR, SIG),
        p.ResultItem('j\u00e9"b', 2**63 - 1, "t" * 40, b"\x00" * 1000, ADDR, SIG),
        p.ResultItem("j", 5, "t", b"abcd", ADDR, SIG, p.Metrics(1.25, 0.5, 3, 2**63 - 1, 1e-9)),
    ]
    for n in (1, 2, 3):
        for rid in (0, 7, 2**64 - 1):
            frame = p.encode(p.Results(id=rid, results=tuple(items[:n])))
            bound = p.results_frame_bytes(sum(map(p.result_item_bytes, items[:n])), n)
            assert len(frame) <= bound
            assert bound - len(frame) == 20 - len(str(rid))  # exact but for the id's digits
    # One result of max_result_bytes always fits in the frame a Welcome may announce.
    for size in (1, 2, 3, 1000, 16 * 1024 * 1024):
        item = p.ResultItem("j" * 64, 2**63 - 1, "t" * 64, b"\xff" * size, ADDR, SIG)
        need = p.results_frame_bytes(p.result_item_bytes(item), 1)
        assert need <= p.limits.result_frame_bytes(size)


def test_one_frame_limit_announced_in_welcome() -> None:
    welcome = _BY_TYPE["welcome"]
    assert isinstance(welcome, p.Welcome) and welcome.max_frame_bytes == p.MAX_FRAME_BYTES
    smaller = p.decode(_wire(welcome, max_frame_bytes=70000), p.SCHEDULER_MESSAGES)
    assert isinstance(smaller, p.Welcome) and smaller.max_frame_bytes == 70000


# ------------------------------------------------------------------ MessagePack (version 2)


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: m.type)
def test_binary_round_trip(message: p.Message) -> None:
    registry = p.SCHEDULER_MESSAGES if message.type in p.SCHEDULER_MESSAGES else None
    registry = registry or p.EVALUATOR_MESSAGES
    data = p.encode_binary(message)
    assert msgspec.msgpack.decode(data)["v"] == p.BINARY_VERSION
    assert p.decode_binary(data, registry) == message
    assert p.decode_frame(data, registry) == (message, True)
    assert p.decode_frame(p.encode(message), registry) == (message, False)  # JSON as bytes
    assert p.decode_frame(p.encode(message).decode(), registry) == (message, False)


def test_binary_frames_carry_bytes_as_they_are() -> None:
    datum = bytes(range(256)) * 256  # 64 KiB
    lease = p.SliceLease("j", 0, "t", 1, 1.0, datum)
    data = p.encode_binary(p.Work(re=1, slices=(lease,)))
    assert len(data) < len(datum) + 200  # no base64
    assert datum in data


def _pack(**fields: object) -> bytes:
    return msgspec.msgpack.encode({"v": 2, **fields})


RESULT = {"job": "j", "slice": 0, "token": "t", "payment_address": ADDR, "signature": SIG}
FETCH = {"type": "fetch", "id": 3, "max_slices": 1}

BAD_BINARY = [
    (b"\x80\xc1", p.FrameError, "malformed_frame"),  # 0xc1 is never used
    (msgspec.msgpack.encode({"v": 2, "type": "ack"}) + b"\x00", p.FrameError, "malformed_frame"),
    (b"\x81\xa1v" + b"\x91" * 100_000 + b"\xc0", p.FrameError, "malformed_frame"),
    (_pack(**{**FETCH, "v": 1}), p.UnsupportedVersion, "unsupported_version"),
    (msgspec.msgpack.encode({"type": "ack"}), p.UnsupportedVersion, "unsupported_version"),
    (_pack(type=b"fetch", id=3), p.FrameError, "malformed_frame"),
    (_pack(type="teleport"), p.UnknownMessage, "unknown_message"),
    (_pack(**FETCH, extra=1), p.InvalidMessage, "invalid_message"),
    (msgspec.msgpack.encode({"v": 2, **FETCH, 7: 1}), p.InvalidMessage, "invalid_message"),
    (_pack(**{**FETCH, "id": -1}), p.InvalidMessage, "invalid_message"),
    (_pack(**{**FETCH, "max_slices": 1.5}), p.InvalidMessage, "invalid_message"),
    (_pack(**FETCH, wait_seconds=float("nan")), p.InvalidMessage, "invalid_message"),
    (_pack(**FETCH, capabilities={"k": b"bytes"}), p.InvalidMessage, "invalid_message"),
    (_pack(**FETCH, capabilities={1: "int key"}), p.InvalidMessage, "invalid_message"),
    (_pack(**FETCH, capabilities={"k": float("inf")}), p.InvalidMessage, "invalid_message"),
    (
        _pack(**FETCH, capabilities={"k": msgspec.msgpack.Ext(1, b"x")}),
        p.InvalidMessage,
        "invalid_message",
    ),
    (
        msgspec.msgpack.encode({"v": 2, **FETCH, "capabilities": {"k": [[[]]]}}).replace(
            b"\x91\x91\x90", b"\x91" * 80 + b"\x90"
        ),
        p.InvalidMessage,
        "invalid_message",
    ),
    (
        _pack(type="result", id=1, **RESULT, result="not base64!"),
        p.InvalidMessage,
        "invalid_message",
    ),
    (
        _pack(type="result", id=1, **{**RESULT, "job": b"j"}, result=b""),
        p.InvalidMessage,
        "invalid_message",
    ),
]


@pytest.mark.parametrize(("data", "exc", "code"), BAD_BINARY)
def test_bad_binary_frames_are_named(data: bytes, exc: type[p.ProtocolError], code: str) -> None:
    with pytest.raises(exc) as info:
        p.decode_frame(data, p.SCHEDULER_MESSAGES)
    assert info.value.code.value == code


def test_a_binary_frame_decodes_as_its_json_twin() -> None:
    """The same checks hold: a result's base64 string is read as in JSON, a bin as bytes."""
    assert p.decode_binary(
        _pack(type="result", id=1, **RESULT, result="YWJj"), p.SCHEDULER_MESSAGES
    ) == p.decode_binary(_pack(type="result", id=1, **RESULT, result=b"abc"), p.SCHEDULER_MESSAGES)
    assert p.peek(_pack(**FETCH, extra=1)) == {"v": 2, **FETCH, "extra": 1}  # the id to answer
    assert p.peek(b"\x80\xc1") is None


@given(st.binary(max_size=300))
def test_fuzz_decode_binary_raises_only_protocol_errors(data: bytes) -> None:
    for frame in (data, b"\x83" + data):
        try:
            p.decode_frame(frame, p.SCHEDULER_MESSAGES)
        except p.ProtocolError:
            pass


@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.floats()
        | st.text(max_size=10)
        | st.binary(max_size=10),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=10) | st.integers(0, 9), children, max_size=4)
        ),
        max_leaves=20,
    ),
    st.sampled_from(sorted(p.SCHEDULER_MESSAGES)),
)
def test_fuzz_binary_structured_fields(value: object, type_: str) -> None:
    """Well-formed MessagePack with arbitrary field values (bytes, integer keys, NaN among
    them): only documented errors escape, and what decodes is JSON data where it is free."""
    cls = p.SCHEDULER_MESSAGES[type_]
    fields = {f: value for f in cls.__dataclass_fields__}
    try:
        message = p.decode_binary(_pack(**{**fields, "type": type_}), p.SCHEDULER_MESSAGES)
    except p.ProtocolError:
        return
    json.dumps(p.to_wire(message), allow_nan=False)  # storable as JSON


def test_binary_result_item_bytes_is_exact_and_frames_stay_under_their_bound() -> None:
    items = [
        p.ResultItem("job", 0, "tok", b"", ADDR, SIG),
        p.ResultItem('j\u00e9"b', 2**63 - 1, "t" * 40, b"\x00" * 1000, ADDR, SIG),
        p.ResultItem("j", 5, "t", b"abcd", ADDR, SIG, p.Metrics(1.25, 0.5, 3, 2**63 - 1, 1e-9)),
        p.ResultItem("j", 5, "t", b"\x01" * 70_000, ADDR, SIG),
    ]
    for item in items:
        frame = p.encode_binary(p.Results(id=0, results=(item,)))
        bound = p.results_frame_bytes(p.result_item_bytes(item, True), 1, True)
        assert len(frame) <= bound <= len(frame) + 8  # exact but for the id's bytes
        # And never above the JSON frame's size, which the welcome's limit is checked by.
        assert bound <= p.results_frame_bytes(p.result_item_bytes(item), 1)
    for n in (1, 15, 16, 200):
        batch = tuple((items * 60)[:n])
        frame = p.encode_binary(p.Results(id=2**64 - 1, results=batch))
        bound = p.results_frame_bytes(sum(p.result_item_bytes(i, True) for i in batch), n, True)
        assert len(frame) == bound
