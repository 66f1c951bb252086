"""The client's side of an evaluator connection, sans I/O (dcp_protocol/evaluator_channel.py):
requests out as frames, the evaluator's frames in, events out; no process, no pipe. The
sandbox tests (test_batching.py, hostile/test_wasm_wall_clock.py) run the same channel over a
real evaluator."""

from __future__ import annotations

import hashlib

import pytest

import dcp_protocol as p
from dcp_protocol import ErrorCode, SliceFailure
from dcp_protocol.evaluator_channel import (
    ChannelMisuse,
    ChannelState,
    Ended,
    EvaluatorChannel,
    Progressed,
    Replied,
    SliceAnswered,
    SliceResult,
    SliceWork,
)

MODULE = b"\0asm\1\0\0\0"
JOB = p.JobSpec("j", "wasm", MODULE, hashlib.sha256(MODULE).hexdigest())
LIMITS = p.Limits()


def _requests(data: bytes) -> list[p.Message]:
    decoder = p.StreamDecoder(p.EVALUATOR_MESSAGES)
    decoder.receive_data(data)
    out = []
    while (message := decoder.next_message()) is not None:
        out.append(message)
    return out


def _frames(*messages: p.Message) -> bytes:
    return b"".join(p.frame(m, binary=True) for m in messages)


def _assigned(relayed: bool = False) -> EvaluatorChannel:
    channel = EvaluatorChannel(relayed=relayed)
    (assign,) = _requests(channel.assign(JOB, LIMITS, {}, with_module=False))
    assert channel.receive_data(_frames(p.Ack(re=assign.id))) == [  # type: ignore[attr-defined]
        Replied(p.Ack(re=assign.id))  # type: ignore[attr-defined]
    ]
    assert channel.state is ChannelState.ASSIGNED and channel.is_assigned(JOB, LIMITS)
    return channel


def _run(channel: EvaluatorChannel, *data: bytes) -> list[int]:
    work = [SliceWork(i, datum) for i, datum in enumerate(data)]
    requests = _requests(channel.run(work))
    assert [(r.slice, r.datum) for r in requests] == [(w.slice, w.datum) for w in work]  # type: ignore[attr-defined]
    return [r.id for r in requests]  # type: ignore[attr-defined]


def _done(rid: int, result: bytes) -> p.SliceDone:
    return p.SliceDone(re=rid, result=result, metrics=p.Metrics(wall_seconds=0.5))


def test_describe_is_answered_and_leaves_the_channel_fresh() -> None:
    channel = EvaluatorChannel()
    (describe,) = _requests(channel.describe())
    assert isinstance(describe, p.Describe) and channel.state is ChannelState.WAITING
    reply = p.Capabilities(re=describe.id, capabilities={"runtimes": {}})
    assert channel.receive_data(_frames(reply)) == [Replied(reply)]
    assert channel.state is ChannelState.FRESH and channel.owed == 0


def test_an_assignment_without_the_module_then_with_it() -> None:
    channel = EvaluatorChannel()
    (first,) = _requests(channel.assign(JOB, LIMITS, {"x": 1}, with_module=False))
    assert isinstance(first, p.Assign) and first.module is None and first.options == {"x": 1}
    missing = p.Error(re=first.id, code=ErrorCode.MODULE_NOT_CACHED.value, message="no")
    assert channel.receive_data(_frames(missing)) == [Replied(missing)]
    assert channel.state is ChannelState.FRESH and not channel.is_assigned(JOB, LIMITS)
    (second,) = _requests(channel.assign(JOB, LIMITS, {}, with_module=True))
    assert isinstance(second, p.Assign) and second.module == MODULE and second.id != first.id
    channel.receive_data(_frames(p.Ack(re=second.id)))
    assert channel.is_assigned(JOB, LIMITS)
    assert not channel.is_assigned(JOB, p.Limits(wall_seconds=1.0))  # other limits: assign again


def test_a_refused_assignment_leaves_nothing_assigned() -> None:
    channel = _assigned()
    (assign,) = _requests(channel.assign(JOB, p.Limits(wall_seconds=2.0), {}, with_module=True))
    refused = p.Error(re=assign.id, code=ErrorCode.INVALID_MODULE.value, message="bad")  # type: ignore[attr-defined]
    channel.receive_data(_frames(refused))
    assert channel.state is ChannelState.FRESH
    assert not channel.is_assigned(JOB, LIMITS)
    with pytest.raises(ChannelMisuse):
        channel.run([SliceWork(0, b"x")])  # no slice before its job is assigned


def test_a_batch_is_answered_in_order_from_bytes_cut_anywhere() -> None:
    channel = _assigned()
    ids = _run(channel, b"a", b"b", b"c")
    data = _frames(
        p.Progress(re=ids[0], fraction=0.5),
        p.Progress(re=ids[2], fraction=0.9),  # not the slice being run: ignored
        _done(ids[0], b"A"),
        p.Error(re=ids[1], code=ErrorCode.WASM_TRAP.value, message="unreachable"),
        _done(ids[2], b"C"),
    )
    events = []
    for i in range(len(data)):  # one byte at a time
        events += channel.receive_data(data[i : i + 1])
    assert events[0] == Progressed(0, 0.5)
    answered = [e for e in events if isinstance(e, SliceAnswered)]
    assert [a.index for a in answered] == [0, 1, 2]
    assert answered[0].outcome == SliceResult(b"A", p.Metrics(wall_seconds=0.5))
    failure = answered[1].outcome
    assert isinstance(failure, SliceFailure) and failure.code is ErrorCode.WASM_TRAP
    assert len(events) == 4 and channel.state is ChannelState.ASSIGNED
    _run(channel, b"next")  # the same evaluator goes on


def test_slices_queued_behind_a_wall_clock_answer_are_unanswered_not_failed() -> None:
    channel = _assigned()
    ids = _run(channel, b"a", b"b", b"c")
    timeout = p.Error(re=ids[0], code=ErrorCode.WASM_TIMEOUT.value, message="wall clock")
    (answered,) = channel.receive_data(_frames(timeout))
    assert isinstance(answered, SliceAnswered) and answered.index == 0
    # The evaluator ends, as it does after such an answer: the rest go to a fresh one.
    assert channel.connection_lost("exited with status 4") == [Ended(None, (1, 2))]
    assert channel.state is ChannelState.ENDED and not channel.is_assigned(JOB, LIMITS)
    with pytest.raises(ChannelMisuse):
        channel.run([SliceWork(1, b"b")])


def test_a_batch_fully_answered_with_a_wall_clock_answer_still_ends_the_evaluator() -> None:
    channel = _assigned()
    ids = _run(channel, b"a", b"b")
    events = channel.receive_data(
        _frames(
            _done(ids[0], b"A"),
            p.Error(re=ids[1], code=ErrorCode.OUTPUT_TOO_LARGE.value, message="flood"),
        )
    )
    assert events[-1] == Ended(None, ())
    assert channel.state is ChannelState.ENDED


def test_a_death_fails_what_was_not_answered() -> None:
    channel = _assigned()
    ids = _run(channel, b"a", b"b", b"c")
    channel.receive_data(_frames(_done(ids[0], b"A")))
    (ended,) = channel.connection_lost("killed by signal 9")
    assert isinstance(ended, Ended) and ended.unanswered == (1, 2)
    assert ended.failure is not None and ended.failure.code is ErrorCode.EVALUATOR_DIED
    assert "signal 9" in ended.failure.message
    assert channel.connection_lost("again") == []  # once


def test_a_timeout_fails_what_was_not_answered() -> None:
    channel = _assigned()
    _run(channel, b"a", b"b")
    (ended,) = channel.timed_out(6.0)
    assert isinstance(ended, Ended) and ended.unanswered == (0, 1)
    assert ended.failure is not None and ended.failure.code is ErrorCode.EVALUATOR_TIMEOUT
    assert "6 s" in ended.failure.message


def test_a_bad_frame_ends_the_channel_by_name() -> None:
    channel = _assigned()
    _run(channel, b"a")
    (ended,) = channel.receive_data(b"\xff\xff\xff\xff garbage")
    assert isinstance(ended, Ended) and ended.unanswered == (0,)
    assert ended.failure is not None and ended.failure.code is ErrorCode.EVALUATOR_PROTOCOL
    assert channel.receive_data(_frames(p.Ack(re=1))) == []  # nothing after the end


def test_the_managers_word_answers_every_request_left() -> None:
    channel = _assigned(relayed=True)
    ids = _run(channel, b"a", b"b", b"c")
    word = p.Error(re=None, code=ErrorCode.MACHINE_BUSY.value, message="the owner is typing")
    events = channel.receive_data(_frames(_done(ids[0], b"A"), word))
    busy = [e.outcome for e in events if isinstance(e, SliceAnswered)][1:]
    assert [(f.code, f.message) for f in busy] == [
        (ErrorCode.MACHINE_BUSY, "the owner is typing")
    ] * 2  # type: ignore[union-attr]
    assert isinstance(events[-1], Ended) and events[-1].unanswered == ()
    assert channel.state is ChannelState.ENDED


def test_without_a_manager_an_error_with_no_re_answers_the_slice_being_run() -> None:
    channel = _assigned(relayed=False)
    ids = _run(channel, b"a", b"b")
    events = channel.receive_data(
        _frames(p.Error(re=None, code=ErrorCode.WASM_TRAP.value, message="x"), _done(ids[1], b"B"))
    )
    assert [e.index for e in events if isinstance(e, SliceAnswered)] == [0, 1]
    assert channel.state is ChannelState.ASSIGNED


def test_a_reply_to_a_request_not_waited_for_is_ignored() -> None:
    channel = _assigned()
    (rid,) = _run(channel, b"a")
    assert channel.receive_data(_frames(_done(rid + 100, b"stale"))) == []
    assert channel.owed == 1
    (answered,) = channel.receive_data(_frames(_done(rid, b"A")))
    assert answered == SliceAnswered(0, SliceResult(b"A", p.Metrics(wall_seconds=0.5)))


def test_one_exchange_at_a_time() -> None:
    channel = _assigned()
    _run(channel, b"a")
    for request in (channel.describe, lambda: channel.run([SliceWork(1, b"b")])):
        with pytest.raises(ChannelMisuse, match="waiting"):
            request()
    assert _requests(channel.die()) == [p.Die(id=0)]
    assert channel.state is ChannelState.ENDED


def test_a_code_this_side_does_not_know_stays_a_string() -> None:
    failure = SliceFailure("a_code_from_the_future", "newer evaluator")
    assert failure.code == "a_code_from_the_future" and str(failure).startswith("a_code")
    assert SliceFailure("wasm_trap", "x").code is ErrorCode.WASM_TRAP
