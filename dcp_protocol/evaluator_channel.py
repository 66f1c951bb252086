"""The client's side of one evaluator connection, sans I/O.

An :class:`EvaluatorChannel` builds the frames a client (the worker's sandbox handle,
:class:`evaluator.client.Sandbox`, or the scheduler's verifiers through it) writes to an
evaluator's stdin or to the evaluator manager's socket, is fed every byte read back
(:meth:`EvaluatorChannel.receive_data`), matches each reply to its request, and returns events:
what a request came to (:class:`Replied`), what a slice came to (:class:`SliceAnswered`, a
:class:`SliceResult` or a :class:`SliceFailure`), a slice's progress (:class:`Progressed`), and
the end of the evaluator (:class:`Ended`, naming the requests it left unanswered and whether
they fail or go to a fresh evaluator). Processes, sockets and clocks stay with the client: it
reports end of file (:meth:`EvaluatorChannel.connection_lost`) and a reply that did not come in
time (:meth:`EvaluatorChannel.timed_out`).

The lifecycle is a table (:data:`CHANNEL_TRANSITIONS`)::

    fresh --describe/assign--> waiting --replied--> fresh | assigned
    assigned --describe/assign/run--> waiting --replied--> assigned | fresh
    waiting --answered (a slice answered with a code of MAY_END_EVALUATOR)--> ended
    any --lost/timed_out/bad frame/the manager's word--> ended

One exchange at a time: requests written together are answered in order, one reply each. An
evaluator may end after answering a slice with a code of :data:`MAY_END_EVALUATOR` (a slice
stopped by its wall clock in compiled wasm ends its process; docs/sandbox.md): the slices
queued behind it are then unanswered, not failed, and a client runs them on a fresh evaluator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from .codec import StreamDecoder, frame
from .errors import DcpError, ErrorCode, ProtocolError, SliceFailure
from .messages import (
    EVALUATOR_MESSAGES,
    Ack,
    Assign,
    Describe,
    Die,
    Error,
    JobSpec,
    Limits,
    Message,
    Metrics,
    Progress,
    RunSlice,
    SliceDone,
)

__all__ = [
    "CHANNEL_TRANSITIONS",
    "MAY_END_EVALUATOR",
    "ChannelEvent",
    "ChannelMisuse",
    "ChannelState",
    "Ended",
    "EvaluatorChannel",
    "Progressed",
    "Replied",
    "SliceAnswered",
    "SliceOutcome",
    "SliceResult",
    "SliceWork",
]

#: Codes of a slice's answer after which its evaluator may have ended.
MAY_END_EVALUATOR = frozenset({ErrorCode.WASM_TIMEOUT, ErrorCode.OUTPUT_TOO_LARGE})


class ChannelState(StrEnum):
    FRESH = "fresh"  # started (or connected), no job assigned
    ASSIGNED = "assigned"  # a job's module is loaded: its slices may run
    WAITING = "waiting"  # requests written, replies owed
    ENDED = "ended"  # the evaluator ended or is to be ended: start a fresh one


class ChannelStep(StrEnum):
    DESCRIBE = "describe"
    ASSIGN = "assign"
    RUN = "run"
    ACKED = "acked"  # the exchange is over and the job is (still) assigned
    UNASSIGNED = "unassigned"  # the exchange is over and no job is known to be assigned
    END = "end"


S, T = ChannelState, ChannelStep
CHANNEL_TRANSITIONS: dict[tuple[ChannelState, ChannelStep], ChannelState] = {
    (S.FRESH, T.DESCRIBE): S.WAITING,
    (S.FRESH, T.ASSIGN): S.WAITING,
    (S.ASSIGNED, T.DESCRIBE): S.WAITING,
    (S.ASSIGNED, T.ASSIGN): S.WAITING,
    (S.ASSIGNED, T.RUN): S.WAITING,
    (S.WAITING, T.ACKED): S.ASSIGNED,
    (S.WAITING, T.UNASSIGNED): S.FRESH,
    (S.FRESH, T.END): S.ENDED,
    (S.ASSIGNED, T.END): S.ENDED,
    (S.WAITING, T.END): S.ENDED,
    (S.ENDED, T.END): S.ENDED,
}
del S, T


class ChannelMisuse(DcpError):
    """A request the channel's state does not allow (a bug of the client, not of an evaluator):
    a second exchange before the first is answered, a slice before its job is assigned,
    anything after the end."""

    def __init__(self, state: ChannelState, step: ChannelStep) -> None:
        super().__init__(f"evaluator channel: {step.value!r} is not allowed when {state.value!r}")
        self.state = state
        self.step = step


@dataclass(frozen=True, slots=True)
class SliceWork:
    """A slice for an evaluator: its index in the job and its datum."""

    slice: int
    datum: bytes


@dataclass(frozen=True, slots=True)
class SliceResult:
    """A slice's result and what running it cost."""

    result: bytes
    metrics: Metrics


SliceOutcome = SliceResult | SliceFailure


@dataclass(frozen=True, slots=True)
class Replied:
    """The reply to a ``describe`` or an ``assign``: a :class:`Capabilities`, an :class:`Ack` or
    an :class:`Error`."""

    reply: Message


@dataclass(frozen=True, slots=True)
class SliceAnswered:
    """The slice at ``index`` of the exchange (the order :meth:`EvaluatorChannel.run` was
    given) came to ``outcome``."""

    index: int
    outcome: SliceOutcome


@dataclass(frozen=True, slots=True)
class Progressed:
    """The slice at ``index`` of the exchange says it is ``fraction`` done."""

    index: int
    fraction: float


@dataclass(frozen=True, slots=True)
class Ended:
    """The evaluator ended, or must be ended before the next request. ``unanswered``: the
    indexes of the exchange's requests that got no reply. ``failure`` is what they came to; when
    it is None they were queued behind an answer of :data:`MAY_END_EVALUATOR` and may run on a
    fresh evaluator."""

    failure: SliceFailure | None
    unanswered: tuple[int, ...] = ()


ChannelEvent = Replied | SliceAnswered | Progressed | Ended


class EvaluatorChannel:
    """One evaluator, as its client sees it. ``relayed``: reached through the evaluator manager,
    whose error with no ``re`` is its word on the whole connection (``machine_busy``,
    ``evaluator_preempted``, a refusal of this client): every request left gets it."""

    def __init__(self, relayed: bool = False) -> None:
        self.relayed = relayed
        self.state = ChannelState.FRESH
        self._decoder = StreamDecoder(EVALUATOR_MESSAGES)
        self._next_id = 0
        self._assigned: tuple[Any, ...] | None = None
        self._assigning: tuple[Any, ...] | None = None
        #: The request ids of the exchange in flight, in order, and how many are answered.
        self._ids: list[int] = []
        self._answered = 0
        self._slices = False
        self._may_end = False

    # ------------------------------------------------------------------ requests

    @property
    def owed(self) -> int:
        """Replies the exchange in flight still waits for."""
        return len(self._ids) - self._answered

    @property
    def answered(self) -> int:
        """Replies the exchange in flight has had."""
        return self._answered

    def is_assigned(self, job: JobSpec, limits: Limits) -> bool:
        """Whether ``job`` under ``limits`` is what the evaluator has loaded."""
        return self.state is ChannelState.ASSIGNED and self._assigned == _key(job, limits)

    def describe(self) -> bytes:
        """The frame asking for the evaluator's capabilities."""
        self._step(ChannelStep.DESCRIBE)
        return self._send([Describe(id=self._id())], slices=False)

    def assign(
        self, job: JobSpec, limits: Limits, options: dict[str, Any], with_module: bool
    ) -> bytes:
        """The frame assigning ``job``; without the module's bytes unless ``with_module`` (a warm
        evaluator has it compiled, and answers ``module_not_cached`` otherwise)."""
        self._step(ChannelStep.ASSIGN)
        self._assigning = _key(job, limits)
        message = Assign(
            id=self._id(),
            job=job.job,
            runtime=job.runtime,
            sha256=job.sha256,
            module=job.module if with_module else None,
            argv=job.argv,
            limits=limits,
            config=job.config,
            options=options,
        )
        return self._send([message], slices=False)

    def run(self, work: Sequence[SliceWork]) -> bytes:
        """The frames running ``work`` on the assigned job, in one write: the evaluator answers
        each in turn. Binary frames: a datum goes as it is, not as base64 in JSON."""
        self._step(ChannelStep.RUN)
        requests = [RunSlice(id=self._id(), slice=w.slice, datum=w.datum) for w in work]
        return self._send(requests, slices=True)

    def die(self) -> bytes:
        """The frame asking the evaluator to exit; the channel has ended."""
        self._step(ChannelStep.END)
        self._ids, self._answered = [], 0
        return frame(Die(id=0))

    # ------------------------------------------------------------------ what comes back

    def receive_data(self, data: bytes) -> list[ChannelEvent]:
        """Feed bytes read from the evaluator; the events they complete, in order."""
        events: list[ChannelEvent] = []
        if self.state is ChannelState.ENDED:
            return events
        self._decoder.receive_data(data)
        while self.state is ChannelState.WAITING:
            try:
                reply = self._decoder.next_message()
            except ProtocolError as exc:
                events.append(
                    self._end(
                        SliceFailure(
                            ErrorCode.EVALUATOR_PROTOCOL,
                            f"evaluator sent a bad frame: {exc.message}",
                        )
                    )
                )
                break
            if reply is None:
                break
            events += self._reply(reply)
        return events

    def connection_lost(self, reason: str) -> list[ChannelEvent]:
        """The evaluator's output ended (``reason``: how it died, as the client saw it)."""
        if self.state is ChannelState.ENDED:
            return []
        if self._may_end:
            # It answered a slice after which it may end, and did: what it left is not spoiled.
            return [self._end(None)]
        return [self._end(SliceFailure(ErrorCode.EVALUATOR_DIED, reason))]

    def timed_out(self, seconds: float) -> list[ChannelEvent]:
        """No reply came within ``seconds`` of the one before: the client kills the evaluator."""
        if self.state is ChannelState.ENDED:
            return []
        return [
            self._end(
                SliceFailure(
                    ErrorCode.EVALUATOR_TIMEOUT,
                    f"no answer within {seconds:g} s; the evaluator was killed",
                )
            )
        ]

    # ------------------------------------------------------------------ internals

    def _reply(self, reply: Message) -> list[ChannelEvent]:
        index = self._answered
        rid = self._ids[index]
        if isinstance(reply, Progress):
            if reply.re == rid and self._slices:
                return [Progressed(index, reply.fraction)]
            return []
        if self.relayed and isinstance(reply, Error) and reply.re is None:
            # The manager's word on the connection: it closes it, so every request left gets
            # the same answer.
            word = SliceFailure(reply.code, reply.message)
            events: list[ChannelEvent] = [
                SliceAnswered(i, word) if self._slices else Replied(reply)
                for i in range(index, len(self._ids))
            ]
            self._answered = len(self._ids)
            events.append(self._end(word))
            return events
        if getattr(reply, "re", None) not in (rid, None):
            return []  # an answer to a request that is no longer waited for
        self._answered += 1
        if self._slices:
            outcome = _outcome(reply)
            if isinstance(outcome, SliceFailure) and outcome.code in MAY_END_EVALUATOR:
                self._may_end = True
            events = [SliceAnswered(index, outcome)]
        else:
            events = [Replied(reply)]
            if isinstance(reply, Ack) and self._assigning is not None:
                self._assigned = self._assigning
            elif self._assigning is not None:
                self._assigned = None  # a refused assignment leaves nothing known loaded
        if self.owed == 0:
            events += self._finish()
        return events

    def _finish(self) -> list[ChannelEvent]:
        self._assigning = None
        if self._may_end:
            return [self._end(None)]
        self._step(ChannelStep.ACKED if self._assigned is not None else ChannelStep.UNASSIGNED)
        return []

    def _end(self, failure: SliceFailure | None) -> Ended:
        unanswered = tuple(range(self._answered, len(self._ids)))
        self._step(ChannelStep.END)
        self._assigned = self._assigning = None
        self._answered = len(self._ids)
        return Ended(failure, unanswered)

    def _send(self, messages: Sequence[Describe | Assign | RunSlice], slices: bool) -> bytes:
        self._ids = [m.id for m in messages]
        self._answered = 0
        self._slices = slices
        self._may_end = False
        return b"".join(frame(m, binary=True) for m in messages)

    def _step(self, step: ChannelStep) -> None:
        try:
            self.state = CHANNEL_TRANSITIONS[(self.state, step)]
        except KeyError:
            raise ChannelMisuse(self.state, step) from None

    def _id(self) -> int:
        self._next_id += 1
        return self._next_id


def _key(job: JobSpec, limits: Limits) -> tuple[Any, ...]:
    return (job.job, job.sha256, job.argv, limits)


def _outcome(reply: Message) -> SliceOutcome:
    """What an evaluator's reply to a slice says of it."""
    if isinstance(reply, SliceDone):
        return SliceResult(reply.result, reply.metrics)
    if isinstance(reply, Error):
        return SliceFailure(reply.code, reply.message)
    return SliceFailure(ErrorCode.EVALUATOR_PROTOCOL, f"slice got {reply.type}")
