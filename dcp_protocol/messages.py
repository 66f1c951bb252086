"""Every message of both channels, as frozen dataclasses that validate themselves.

Two channels share this vocabulary (see docs/protocol.md):

* worker <-> scheduler, over a websocket, one JSON text frame per message;
* worker <-> evaluator, over the evaluator's stdin/stdout, length-prefixed JSON frames.

Requests carry ``id`` (chosen by the sender, unique per connection); replies carry ``re``, the id
they answer. Fields of type ``bytes`` travel as standard base64 strings.

Numbers are range-checked when decoded (:func:`from_wire`): an integer field accepts
0..2**64-1 and a number field 0..MAX_NUMBER unless its type says less (``Annotated`` with a
:class:`~.limits.Range`: :data:`SliceIndex`, :data:`Attempt`, :data:`Fraction`, ...). No field
of version 1 is negative.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, TypeVar, Union, get_args, get_origin

from .errors import InvalidMessage
from .limits import (
    MAX_FRAME_BYTES,
    MAX_INT64,
    MAX_NUMBER,
    MAX_RESULTS_PER_FRAME,
    MAX_UINT32,
    MAX_UINT64,
    Range,
    result_frame_bytes,
)
from .nesting import MAX_NESTING, plain_fault

__all__ = [
    "Message",
    "Hello",
    "Auth",
    "Welcome",
    "Fetch",
    "Work",
    "SliceLease",
    "JobSpec",
    "Limits",
    "Metrics",
    "Wage",
    "Refusal",
    "GroupProof",
    "Decline",
    "LeaseRef",
    "Heartbeat",
    "HeartbeatAck",
    "Result",
    "ResultItem",
    "Results",
    "ItemAck",
    "ResultsAck",
    "MAX_RESULTS_PER_FRAME",
    "SliceIndex",
    "Attempt",
    "Fraction",
    "SliceFailed",
    "Return",
    "Ack",
    "Error",
    "Describe",
    "Capabilities",
    "Assign",
    "RunSlice",
    "Progress",
    "SliceDone",
    "Die",
    "SCHEDULER_MESSAGES",
    "EVALUATOR_MESSAGES",
    "to_wire",
    "from_wire",
    "prepare_codecs",
]

T = TypeVar("T")

#: A slice's index: the store keeps it as a signed 64-bit integer.
SliceIndex = Annotated[int, Range(0, MAX_INT64)]
#: A count the scheduler stores (SQLite integers are signed 64-bit).
Count = Annotated[int, Range(0, MAX_INT64)]
#: A lease's attempt number.
Attempt = Annotated[int, Range(1, MAX_UINT32)]
#: A fraction of work done.
Fraction = Annotated[float, Range(0.0, 1.0)]
#: A protocol version.
Version = Annotated[int, Range(0, MAX_UINT32)]
#: A size announced in ``welcome``: at most the protocol's frame limit.
FrameSize = Annotated[int, Range(1, MAX_FRAME_BYTES)]

_ADDRESS_LEN = 42


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise InvalidMessage(message)


def _check_signed(payment_address: str, signature: str) -> None:
    """The checks of a signed result: a payment address and 65 signature bytes in hex."""
    _check_address(payment_address, "payment_address")
    _check(len(signature) == 130 and _is_hex(signature), "signature must be 65 hex bytes")


def _check_address(value: str, name: str) -> None:
    _check(
        len(value) == _ADDRESS_LEN and value.startswith("0x") and _is_hex(value[2:]),
        f"{name} must be a 0x-prefixed 20-byte hex address",
    )


def _is_hex(value: str) -> bool:
    try:
        bytes.fromhex(value)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------- value objects


@dataclass(frozen=True)
class Limits:
    """Per-slice limits a job asks for; the worker clamps them to its own maxima."""

    wall_seconds: float = 60.0
    memory_bytes: int = 256 * 1024 * 1024
    output_bytes: int = 16 * 1024 * 1024
    fuel: int | None = None

    def __post_init__(self) -> None:
        _check(
            math.isfinite(self.wall_seconds) and self.wall_seconds > 0,
            "limits.wall_seconds must be positive",
        )
        _check(self.memory_bytes > 0, "limits.memory_bytes must be positive")
        _check(self.output_bytes > 0, "limits.output_bytes must be positive")
        _check(self.fuel is None or self.fuel > 0, "limits.fuel must be positive")


@dataclass(frozen=True)
class Metrics:
    """What a slice cost, measured by the evaluator and the worker."""

    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    bytes_in: Count = 0
    bytes_out: Count = 0
    gpu_seconds: float = 0.0

    def __post_init__(self) -> None:
        # A NaN or an infinity here reached a job's cost and the compute API's JSON; a
        # negative count lowered it. Plausibility against a lease is the scheduler's check.
        for name in ("wall_seconds", "cpu_seconds", "gpu_seconds", "bytes_in", "bytes_out"):
            value = getattr(self, name)
            _check(math.isfinite(value) and value >= 0, f"metrics.{name} must be a number >= 0")


@dataclass(frozen=True)
class Wage:
    """A minimum wage, in credits per CPU-hour, per GPU-hour, per MB (10^6 bytes) in and out."""

    cpu_hour: float = 0.0
    gpu_hour: float = 0.0
    mb_in: float = 0.0
    mb_out: float = 0.0

    def __post_init__(self) -> None:
        for name in ("cpu_hour", "gpu_hour", "mb_in", "mb_out"):
            value = getattr(self, name)
            _check(math.isfinite(value) and value >= 0, f"wage.{name} must be a number >= 0")

    def cost(self, metrics: Metrics) -> float:
        """What ``metrics`` is worth at this wage, in credits."""
        return (
            metrics.cpu_seconds / 3600 * self.cpu_hour
            + metrics.gpu_seconds / 3600 * self.gpu_hour
            + metrics.bytes_in / 1e6 * self.mb_in
            + metrics.bytes_out / 1e6 * self.mb_out
        )


@dataclass(frozen=True)
class Refusal:
    """Why something (a job, a group) was refused: ``code`` is an ErrorCode value."""

    subject: str
    code: str
    message: str = ""


@dataclass(frozen=True)
class GroupProof:
    """Membership of compute group ``join_key``, proven for this session (policy.group_proof)."""

    join_key: str
    proof: str


@dataclass(frozen=True)
class Decline:
    """The worker declines ``job`` at offers up to ``offer`` (it measured them below its wage)."""

    job: str
    offer: float


@dataclass(frozen=True)
class JobSpec:
    """What a worker needs to run a job's slices. ``module`` is the work function's bytes."""

    job: str
    runtime: str
    module: bytes
    sha256: str
    argv: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    name: str = ""
    owner: str = ""
    #: The compute group's join key; "" is the public group.
    group: str = ""
    #: Capability name -> "required" / "forbidden"; "min_memory_bytes" -> int.
    requirements: dict[str, Any] = field(default_factory=dict)
    #: Runtime settings: for ``opencl``, the kernel name, argument spec and sizes.
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(bool(self.job), "job must not be empty")
        _check(len(self.sha256) == 64 and _is_hex(self.sha256), "sha256 must be 64 hex digits")


@dataclass(frozen=True)
class SliceLease:
    """One leased slice: the lease token fences out superseded holders."""

    job: str
    slice: SliceIndex
    token: str
    attempt: Attempt
    deadline: float
    datum: bytes
    #: Credits the job pays for this slice now.
    offer: float = 0.0

    def __post_init__(self) -> None:
        _check(self.slice >= 0, "slice must be >= 0")
        _check(self.attempt >= 1, "attempt must be >= 1")
        _check(bool(self.token), "token must not be empty")
        _check(math.isfinite(self.offer) and self.offer >= 0, "offer must be a number >= 0")
        _check(math.isfinite(self.deadline), "deadline must be a finite time")


@dataclass(frozen=True)
class LeaseRef:
    """Names a lease without its payload (heartbeats, returns, lost leases)."""

    job: str
    slice: SliceIndex
    token: str
    progress: Fraction | None = None


# --------------------------------------------------------------------------- base


@dataclass(frozen=True)
class Message:
    """Base of all messages; ``type`` is the wire name of the concrete class."""

    type: ClassVar[str] = ""


# --------------------------------------------------------------------------- scheduler channel


@dataclass(frozen=True)
class Hello(Message):
    """Scheduler -> worker, first frame: the protocol version and a fresh session challenge."""

    type: ClassVar[str] = "hello"
    protocol: Version
    challenge: str
    server: str = ""

    def __post_init__(self) -> None:
        _check(len(self.challenge) >= 32 and _is_hex(self.challenge), "challenge must be hex")


@dataclass(frozen=True)
class Auth(Message):
    """Worker -> scheduler: the challenge signed by the worker's identity key."""

    type: ClassVar[str] = "auth"
    id: int
    address: str
    signature: str
    payment_address: str
    agent: str = ""
    groups: tuple[GroupProof, ...] = ()
    leave_public_group: bool = False

    def __post_init__(self) -> None:
        _check(len(self.groups) <= 256, "at most 256 groups")
        _check_address(self.address, "address")
        _check_address(self.payment_address, "payment_address")
        _check(
            len(self.signature) == 130 and _is_hex(self.signature), "signature must be 65 hex bytes"
        )


@dataclass(frozen=True)
class Welcome(Message):
    """Scheduler -> worker: the session is authenticated."""

    type: ClassVar[str] = "welcome"
    re: int
    session: str
    address: str
    heartbeat_interval: float
    lease_timeout: float
    max_result_bytes: FrameSize
    #: Join keys whose proofs were accepted, and the groups refused (with why).
    groups: tuple[str, ...] = ()
    refused: tuple[Refusal, ...] = ()
    #: The largest frame either side may send on this session (at most MAX_FRAME_BYTES).
    max_frame_bytes: FrameSize = MAX_FRAME_BYTES

    def __post_init__(self) -> None:
        _check(self.heartbeat_interval > 0, "heartbeat_interval must be > 0")
        _check(self.lease_timeout > 0, "lease_timeout must be > 0")
        _check(
            result_frame_bytes(self.max_result_bytes) <= self.max_frame_bytes,
            f"max_frame_bytes {self.max_frame_bytes} cannot carry a result of max_result_bytes"
            f" ({result_frame_bytes(self.max_result_bytes)} bytes needed)",
        )


@dataclass(frozen=True)
class Fetch(Message):
    """Worker -> scheduler: ask for up to ``max_slices`` slices. ``known_jobs`` names the jobs
    whose specs the worker holds; the reply carries the specs of every other job it leases."""

    type: ClassVar[str] = "fetch"
    id: int
    max_slices: int
    capabilities: dict[str, Any] = field(default_factory=dict)
    known_jobs: tuple[str, ...] = ()
    #: Long poll: when no slice is available, the scheduler may hold the reply this long.
    wait_seconds: float = 0.0
    min_wage: Wage = field(default_factory=Wage)
    #: Allow-lists: when non-empty, only these jobs / these owners' jobs.
    allowed_jobs: tuple[str, ...] = ()
    allowed_owners: tuple[str, ...] = ()
    declined: tuple[Decline, ...] = ()
    #: Jobs to give no slice of, whatever they offer (paused by the worker's operator).
    excluded_jobs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check(1 <= self.max_slices <= 1024, "max_slices must be within 1..1024")
        _check(0 <= self.wait_seconds <= 60, "wait_seconds must be within 0..60")
        _check(len(self.known_jobs) <= 1024, "known_jobs names at most 1024 jobs")
        _check(len(self.excluded_jobs) <= 1024, "excluded_jobs names at most 1024 jobs")


@dataclass(frozen=True)
class Work(Message):
    """Scheduler -> worker: leased slices, and the specs of their jobs not in ``known_jobs``."""

    type: ClassVar[str] = "work"
    re: int
    slices: tuple[SliceLease, ...] = ()
    jobs: tuple[JobSpec, ...] = ()
    #: Active jobs this worker was not given, and why (each job at most once per session).
    skipped: tuple[Refusal, ...] = ()


@dataclass(frozen=True)
class Heartbeat(Message):
    """Worker -> scheduler: extend the named leases; progress is 0..1 or null (unknown)."""

    type: ClassVar[str] = "heartbeat"
    id: int
    leases: tuple[LeaseRef, ...] = ()


@dataclass(frozen=True)
class HeartbeatAck(Message):
    """Scheduler -> worker: the new deadline, and which of the named leases are no longer held."""

    type: ClassVar[str] = "heartbeat_ack"
    re: int
    deadline: float
    lost: tuple[LeaseRef, ...] = ()


@dataclass(frozen=True)
class Result(Message):
    """Worker -> scheduler: a signed result (see signing.result_payload)."""

    type: ClassVar[str] = "result"
    id: int
    job: str
    slice: SliceIndex
    token: str
    result: bytes
    payment_address: str
    signature: str
    metrics: Metrics = field(default_factory=Metrics)

    def __post_init__(self) -> None:
        _check_signed(self.payment_address, self.signature)


@dataclass(frozen=True)
class ResultItem:
    """One signed result inside ``results`` (the fields of ``result`` without an id)."""

    job: str
    slice: SliceIndex
    token: str
    result: bytes
    payment_address: str
    signature: str
    metrics: Metrics = field(default_factory=Metrics)

    def __post_init__(self) -> None:
        _check_signed(self.payment_address, self.signature)


@dataclass(frozen=True)
class Results(Message):
    """Worker -> scheduler: several signed results in one frame; answered by one
    ``results_ack`` with an entry per result, in order."""

    type: ClassVar[str] = "results"
    id: int
    results: tuple[ResultItem, ...]

    def __post_init__(self) -> None:
        _check(
            1 <= len(self.results) <= MAX_RESULTS_PER_FRAME,
            f"results holds 1..{MAX_RESULTS_PER_FRAME} results",
        )


@dataclass(frozen=True)
class ItemAck:
    """The scheduler's answer to one result of a ``results`` frame: ``accepted`` (with the
    credits paid) or ``duplicate``; or ``refused`` / ``retry`` with the error ``code`` and
    ``message`` it would have answered to a single ``result``."""

    status: str
    credited: float = 0.0
    code: str = ""
    message: str = ""

    def __post_init__(self) -> None:
        _check(
            self.status in ("accepted", "duplicate", "refused", "retry"),
            "status must be accepted, duplicate, refused or retry",
        )


@dataclass(frozen=True)
class ResultsAck(Message):
    """Scheduler -> worker: the answer to ``results``, one entry per result in order."""

    type: ClassVar[str] = "results_ack"
    re: int
    acks: tuple[ItemAck, ...]


@dataclass(frozen=True)
class SliceFailed(Message):
    """Worker -> scheduler: the slice could not be computed; ``code`` names why."""

    type: ClassVar[str] = "slice_failed"
    id: int
    job: str
    slice: SliceIndex
    token: str
    code: str
    message: str = ""


@dataclass(frozen=True)
class Return(Message):
    """Worker -> scheduler: give back leased slices that were never started."""

    type: ClassVar[str] = "return"
    id: int
    leases: tuple[LeaseRef, ...] = ()
    #: Empty for a plain return (graceful stop); otherwise why the worker refuses them.
    code: str = ""
    message: str = ""


@dataclass(frozen=True)
class Ack(Message):
    """A positive reply to request ``re``; ``status`` refines it (e.g. accepted / duplicate)."""

    type: ClassVar[str] = "ack"
    re: int
    status: str = "ok"
    #: For an accepted result: the credits paid to the payment address.
    credited: float = 0.0


@dataclass(frozen=True)
class Error(Message):
    """A negative reply; ``re`` is null when the request's id could not be read."""

    type: ClassVar[str] = "error"
    re: int | None
    code: str
    message: str = ""


# --------------------------------------------------------------------------- evaluator channel


@dataclass(frozen=True)
class Describe(Message):
    """Worker -> evaluator: report capabilities."""

    type: ClassVar[str] = "describe"
    id: int


@dataclass(frozen=True)
class Capabilities(Message):
    """Evaluator -> worker: what this evaluator offers, measured, not configured."""

    type: ClassVar[str] = "capabilities"
    re: int
    capabilities: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Assign(Message):
    """Worker -> evaluator: prepare a job. ``module`` may be null if the evaluator has
    ``sha256`` cached; it answers ``module_not_cached`` otherwise."""

    type: ClassVar[str] = "assign"
    id: int
    job: str
    runtime: str
    sha256: str
    module: bytes | None = None
    argv: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    #: The job's runtime settings (JobSpec.config).
    config: dict[str, Any] = field(default_factory=dict)
    #: The worker's own settings for this runtime (e.g. banned OpenCL devices).
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunSlice(Message):
    """Worker -> evaluator: run one slice of the assigned job."""

    type: ClassVar[str] = "slice"
    id: int
    slice: SliceIndex
    datum: bytes


@dataclass(frozen=True)
class Progress(Message):
    """Evaluator -> worker: the running slice reports progress (0..1)."""

    type: ClassVar[str] = "progress"
    re: int
    fraction: Fraction

    def __post_init__(self) -> None:
        _check(0.0 <= self.fraction <= 1.0, "fraction must be within 0..1")


@dataclass(frozen=True)
class SliceDone(Message):
    """Evaluator -> worker: the slice's result (its stdout) and what it cost."""

    type: ClassVar[str] = "slice_done"
    re: int
    result: bytes
    metrics: Metrics = field(default_factory=Metrics)


@dataclass(frozen=True)
class Die(Message):
    """Worker -> evaluator: exit now."""

    type: ClassVar[str] = "die"
    id: int


SCHEDULER_MESSAGES: dict[str, type[Message]] = {
    cls.type: cls
    for cls in (
        Hello,
        Auth,
        Welcome,
        Fetch,
        Work,
        Heartbeat,
        HeartbeatAck,
        Result,
        Results,
        ResultsAck,
        SliceFailed,
        Return,
        Ack,
        Error,
    )
}
EVALUATOR_MESSAGES: dict[str, type[Message]] = {
    cls.type: cls
    for cls in (Describe, Capabilities, Assign, RunSlice, Progress, SliceDone, Die, Ack, Error)
}


# --------------------------------------------------------------------------- conversion


def to_wire(value: Any) -> Any:
    """Turn a message (or a field value) into JSON-compatible data: bytes as base64, tuples
    as lists, records as objects (a message's ``type`` first); anything else as it is."""
    return _encode(value, _ENCODERS, _b64)


def to_native(value: Any) -> Any:
    """As :func:`to_wire`, but bytes stay bytes: the data of a MessagePack frame (protocol
    version 2, docs/protocol.md section 1), where bytes travel as they are."""
    return _encode(value, _NATIVE_ENCODERS, None)


def _encode(
    value: Any,
    encoders: dict[type, typing.Callable[[Any], Any]],
    blob: typing.Callable[[bytes], Any] | None,
) -> Any:
    encoder = encoders.get(type(value))
    if encoder is not None:
        return encoder(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        encoder = encoders[type(value)] = _compile_encoder(type(value), blob)
        return encoder(value)
    if isinstance(value, bytes):
        return value if blob is None else blob(value)
    if isinstance(value, tuple):
        return [_encode(v, encoders, blob) for v in value]
    return value


#: Per record class, an encoder planned once from its field types (encoding is on every hot
#: path, like decoding: a field whose JSON form is itself costs no call at all); one table
#: for JSON frames (bytes as base64), one for MessagePack frames (bytes as they are).
_ENCODERS: dict[type, typing.Callable[[Any], Any]] = {}
_NATIVE_ENCODERS: dict[type, typing.Callable[[Any], Any]] = {}


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _compile_encoder(
    cls: type, blob: typing.Callable[[bytes], Any] | None
) -> typing.Callable[[Any], Any]:
    hints = _hints(cls)
    plan = [(f.name, _field_encoder(hints[f.name], blob)) for f in dataclasses.fields(cls)]
    tag = cls.type if issubclass(cls, Message) else None

    def encode(value: Any) -> dict[str, Any]:
        out: dict[str, Any] = {} if tag is None else {"type": tag}
        for name, encoder in plan:
            field_value = getattr(value, name)
            out[name] = field_value if encoder is None else encoder(field_value)
        return out

    return encode


def _field_encoder(
    tp: Any, blob: typing.Callable[[bytes], Any] | None
) -> typing.Callable[[Any], Any] | None:
    """How to encode a field of type ``tp``; None when its value is its wire form."""
    origin = get_origin(tp)
    if tp in (str, int, float, bool) or origin is dict or tp is dict:
        return None
    if tp is bytes:
        return blob
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            inner = _field_encoder(args[0], blob)
            if inner is None:
                return None
            return lambda value: None if value is None else inner(value)
    if origin is tuple:
        items = get_args(tp)
        if len(items) == 2 and items[1] is Ellipsis:
            item = _field_encoder(items[0], blob)
            if item is None:
                return list
            return lambda value: [item(v) for v in value]
    return to_wire if blob is not None else to_native  # records, Any, anything unusual


def prepare_codecs(*classes: type) -> None:
    """Plan the encoders and decoders of record ``classes`` now rather than on first use.
    For a reply that must go out on time: planning resolves type hints, a few milliseconds
    of CPU that an evaluator starved of CPU took 0.15-0.2 s to get (its first wall-clock
    answer came that much later than the next ones)."""
    for cls in classes:
        if cls not in _ENCODERS:
            _ENCODERS[cls] = _compile_encoder(cls, _b64)
        if cls not in _NATIVE_ENCODERS:
            _NATIVE_ENCODERS[cls] = _compile_encoder(cls, None)
        _plan(cls)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def from_wire(cls: type[T], data: Any, path: str = "") -> T:
    """Build dataclass ``cls`` from JSON data, checking every field's type.

    Raises:
        InvalidMessage: a field is missing, unexpected, or of the wrong type.
    """
    where = path or getattr(cls, "type", "") or cls.__name__
    return _plan(cls)(data, where)  # type: ignore[no-any-return]


#: A compiled converter: (JSON value, path for messages) -> the field's value. Types are
#: resolved once per class, and paths are only formatted when something is wrong (decoding is
#: on every hot path: a worker decodes each evaluator reply, a scheduler each result).
_Converter = typing.Callable[[Any, str], Any]
_PLANS: dict[type, _Converter] = {}


class _Bad(Exception):
    """A value of the wrong type inside a field; ``path`` is its place below the field."""

    def __init__(self, why: str, path: str = "") -> None:
        super().__init__(why)
        self.why = why
        self.path = path


def _plan(cls: type) -> _Converter:
    plan = _PLANS.get(cls)
    if plan is None:
        plan = _PLANS[cls] = _compile_dataclass(cls)
    return plan


def _compile_dataclass(cls: type) -> _Converter:
    hints = _hints(cls)
    ranged = typing.get_type_hints(cls, include_extras=True)  # with the fields' Ranges
    fields_ = [
        (
            f.name,
            _compile(ranged[f.name]),
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
            _nests(hints[f.name]),
        )
        for f in dataclasses.fields(cls)
    ]
    known = frozenset(name for name, *_rest in fields_) | {"type"}

    def convert(data: Any, where: str) -> Any:
        if not isinstance(data, dict):
            raise InvalidMessage(f"{where}: expected an object")
        if not known.issuperset(data):
            # str(): a MessagePack map's keys need not be strings, nor sort with them.
            extra = sorted(map(str, set(data) - known))
            raise InvalidMessage(f"{where}: unexpected field(s) {extra}")
        kwargs: dict[str, Any] = {}
        for name, conv, required, nests in fields_:
            if name in data:
                try:
                    kwargs[name] = conv(data[name], f"{where}.{name}" if nests else "")
                except _Bad as bad:
                    raise InvalidMessage(f"{where}.{name}{bad.path}: {bad.why}") from None
            elif required:
                raise InvalidMessage(f"{where}: missing field {name!r}")
        try:
            return cls(**kwargs)
        except InvalidMessage as exc:
            raise InvalidMessage(f"{where}: {exc.message}") from None

    return convert


def _plain(value: Any, depth: int) -> None:
    """Check that a free-form value (a ``dict`` or ``Any`` field) is JSON data
    (:func:`~.nesting.plain_fault`): a JSON frame holds nothing else; a MessagePack frame
    could (bytes, integer keys, extension types, NaN), and such a value would fail far from
    here, in the store's JSON or in a comparison."""
    if (why := plain_fault(value, MAX_NESTING, depth)) is not None:
        raise _Bad(why)


def _nests(tp: Any) -> bool:
    """Whether a field holds records, whose own errors need the field's path."""
    return any(dataclasses.is_dataclass(t) for t in (tp, *get_args(tp), *_flat_args(tp)))


def _flat_args(tp: Any) -> tuple[Any, ...]:
    return tuple(a for arg in get_args(tp) for a in get_args(arg))


#: The ranges of numeric fields whose type names none (docs/protocol.md section 1).
_INTEGERS = Range(0, MAX_UINT64)
_NUMBERS = Range(0.0, MAX_NUMBER)


def _integer(bounds: Range) -> _Converter:
    low, high = bounds.low, bounds.high
    why = f"must be an integer within {bounds}"

    def integer(value: Any, _where: str) -> Any:
        if type(value) is not int:
            raise _Bad("expected an integer")
        if not low <= value <= high:
            raise _Bad(why)
        return value

    return integer


def _number(bounds: Range) -> _Converter:
    low, high = bounds.low, bounds.high
    why = f"must be a number within {bounds}"

    def number(value: Any, _where: str) -> Any:
        # An integer is compared before it is converted: float(10**400) raises OverflowError.
        if type(value) is not float and type(value) is not int:
            raise _Bad("expected a number")
        if not low <= value <= high:
            raise _Bad(why)
        return float(value)

    return number


def _compile(tp: Any) -> _Converter:
    origin = get_origin(tp)
    if origin is Annotated:
        base, *extras = get_args(tp)
        bounds = next((x for x in extras if isinstance(x, Range)), None)
        if bounds is not None and base is int:
            return _integer(bounds)
        if bounds is not None and base is float:
            return _number(bounds)
        return _compile(base)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        nullable = type(None) in args
        (inner_tp,) = [a for a in args if a is not type(None)]
        inner = _compile(inner_tp)

        def optional(value: Any, where: str) -> Any:
            if value is None:
                if nullable:
                    return None
                raise _Bad("must not be null")
            return inner(value, where)

        return optional
    if tp is Any:

        def anything(value: Any, _where: str) -> Any:
            _plain(value, 1)
            return value

        return anything
    if tp is bool:

        def boolean(value: Any, _where: str) -> Any:
            if not isinstance(value, bool):
                raise _Bad("expected a boolean")
            return value

        return boolean
    if tp is int:
        return _integer(_INTEGERS)
    if tp is float:
        return _number(_NUMBERS)
    if tp is str:

        def string(value: Any, _where: str) -> Any:
            if type(value) is not str:
                raise _Bad("expected a string")
            return value

        return string
    if tp is bytes:

        def blob(value: Any, _where: str) -> Any:
            if isinstance(value, bytes):  # a binary frame's part (codec.decode): as it is
                return value
            if not isinstance(value, str):
                raise _Bad("expected a base64 string")
            try:
                return base64.b64decode(value, validate=True)
            except binascii.Error:
                raise _Bad("invalid base64") from None

        return blob
    if origin is tuple:
        (inner_tp, _ellipsis) = get_args(tp)
        inner = _compile(inner_tp)

        def sequence(value: Any, where: str) -> Any:
            if not isinstance(value, list):
                raise _Bad("expected an array")
            out = []
            for i, item in enumerate(value):
                try:
                    out.append(inner(item, where))
                except _Bad as bad:
                    raise _Bad(bad.why, f"[{i}]{bad.path}") from None
                except InvalidMessage as exc:  # a record inside: its message has its path
                    raise InvalidMessage(exc.message.replace(where, f"{where}[{i}]", 1)) from None
            return tuple(out)

        return sequence
    if origin is dict:

        def mapping(value: Any, _where: str) -> Any:
            if not isinstance(value, dict):
                raise _Bad("expected an object")
            _plain(value, 1)
            return value

        return mapping
    if dataclasses.is_dataclass(tp):

        def record(value: Any, where: str) -> Any:
            return _plan(tp)(value, where)  # type: ignore[arg-type]

        return record
    raise TypeError(f"unsupported field type {tp!r}")  # a bug in this module
