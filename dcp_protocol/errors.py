"""Errors and error codes of the wire protocol, and the root of every exception of ours.

Exception tree::

    DcpError                       root of every exception our packages raise on purpose
    ├── ProtocolError              something on the wire is wrong
    ├── FrameError                 not a frame we can read at all (bad JSON, bad length prefix)
    │   ├── FrameTooLarge          larger than the maximum frame size
    │   └── NestingTooDeep         arrays and objects nested past MAX_NESTING (nesting.py)
    ├── UnknownMessage             well-formed, but the message type is not in the registry
    └── InvalidMessage             known type, but a field is missing, extra or of the wrong type

Every exception carries the :class:`ErrorCode` that the receiving side puts in its ``error``
reply, so a peer always learns *why* a frame was refused.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Named reasons that cross the wire (``error.code``) and reach logs and ``jobs show``."""

    # Frame and message level (docs/protocol.md section "Errors").
    MALFORMED_FRAME = "malformed_frame"
    FRAME_TOO_LARGE = "frame_too_large"
    UNKNOWN_MESSAGE = "unknown_message"
    INVALID_MESSAGE = "invalid_message"
    #: A job document that cannot be deployed (every fault in ``problems``).
    INVALID_JOB = "invalid_job"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNEXPECTED_MESSAGE = "unexpected_message"
    # Session and lease level.
    AUTH_FAILED = "auth_failed"
    #: The operator blocked this identity or payment address (``dcp-scheduler workers block``).
    BLOCKED = "blocked"
    BAD_SIGNATURE = "bad_signature"
    STALE_LEASE = "stale_lease"
    UNKNOWN_SLICE = "unknown_slice"
    RESULT_TOO_LARGE = "result_too_large"
    INTERNAL = "internal"
    # Slice level: the work function or its sandbox failed.
    INVALID_MODULE = "invalid_module"
    FORBIDDEN_IMPORT = "forbidden_import"
    SANDBOX_VIOLATION = "sandbox_violation"
    WASM_TRAP = "wasm_trap"
    WASM_EXIT = "wasm_exit"
    #: A python or js work function raised (or returned nothing): the message is its
    #: bounded traceback or stack.
    WORK_FUNCTION_ERROR = "work_function_error"
    WASM_TIMEOUT = "wasm_timeout"
    WASM_FUEL = "wasm_fuel_exhausted"
    MEMORY_LIMIT = "memory_limit"
    OUTPUT_TOO_LARGE = "output_too_large"
    MODULE_NOT_CACHED = "module_not_cached"
    NOT_ASSIGNED = "not_assigned"
    UNSUPPORTED_RUNTIME = "unsupported_runtime"
    EVALUATOR_DIED = "evaluator_died"
    EVALUATOR_TIMEOUT = "evaluator_timeout"
    EVALUATOR_PROTOCOL = "evaluator_protocol"
    LEASE_EXPIRED = "lease_expired"
    # Policy refusals: who may run what, at what price (docs/protocol.md "Refusals").
    GROUP_NOT_JOINED = "group_not_joined"
    GROUP_PROOF_INVALID = "group_proof_invalid"
    REQUIREMENT_UNMET = "requirement_unmet"
    WAGE_BELOW_MINIMUM = "wage_below_minimum"
    JOB_NOT_ALLOWED = "job_not_allowed"
    OWNER_NOT_ALLOWED = "owner_not_allowed"
    JOB_SPEC_CHANGED = "job_spec_changed"
    RESULT_REJECTED = "result_rejected"
    VERIFIER_FAILED = "verifier_failed"
    METRICS_IMPLAUSIBLE = "metrics_implausible"
    #: A replicated slice's replicas did not agree within the job's max_replicas.
    NO_QUORUM = "no_quorum"
    INSUFFICIENT_FUNDS = "insufficient_funds"
    # The compute API: who may act on a job or read it (docs/protocol.md section 6).
    UNAUTHENTICATED = "unauthenticated"
    STALE_REQUEST = "stale_request"
    REPLAYED_REQUEST = "replayed_request"
    NOT_OWNER = "not_owner"
    READ_TOKEN_INVALID = "read_token_invalid"
    READ_TOKEN_EXPIRED = "read_token_expired"
    READ_TOKEN_REVOKED = "read_token_revoked"
    READ_TOKEN_WRONG_JOB = "read_token_wrong_job"
    # The opencl runtime.
    OPENCL_UNAVAILABLE = "opencl_unavailable"
    OPENCL_BUILD_FAILED = "opencl_build_failed"
    OPENCL_ERROR = "opencl_error"
    BUFFER_TOO_LARGE = "buffer_too_large"
    DATUM_INVALID = "datum_invalid"
    # The evaluator manager's word on a connection (docs/sandbox.md, "Evaluator manager").
    MACHINE_BUSY = "machine_busy"
    EVALUATOR_PREEMPTED = "evaluator_preempted"
    PEER_NOT_ALLOWED = "peer_not_allowed"
    TOKEN_REQUIRED = "token_required"
    TOKEN_INVALID = "token_invalid"


class DcpError(Exception):
    """Root of every exception our packages raise on purpose: ``str()`` is a message fit for
    an operator. A program's edge catches this one class to report a refusal by its reason;
    anything else is a bug of ours. Subclasses that cross the wire carry an :class:`ErrorCode`
    as ``code``."""


class ProtocolError(DcpError):
    """Root of the protocol's exceptions; ``code`` names the reason on the wire."""

    code: ErrorCode = ErrorCode.INVALID_MESSAGE

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class FrameError(ProtocolError):
    """The bytes are not a frame: undecodable, not a JSON object, or a bad length prefix."""

    code = ErrorCode.MALFORMED_FRAME


class FrameTooLarge(FrameError):
    """The frame is larger than the agreed maximum; ``size`` and ``limit`` say by how much."""

    code = ErrorCode.FRAME_TOO_LARGE

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class UnknownMessage(ProtocolError):
    """The message type is not one this side understands."""

    code = ErrorCode.UNKNOWN_MESSAGE

    def __init__(self, type_: str) -> None:
        super().__init__(f"unknown message type {type_!r}")
        self.type = type_


class InvalidMessage(ProtocolError):
    """A known message with a missing, unexpected or ill-typed field."""

    code = ErrorCode.INVALID_MESSAGE


class UnsupportedVersion(ProtocolError):
    """The frame names a protocol version this side does not speak."""

    code = ErrorCode.UNSUPPORTED_VERSION


class SliceFailure(DcpError):
    """A slice (or its job's assignment) failed in a contained way: a trap, a limit, a refused
    module, a work function's exception, or the evaluator's death. ``code`` names the reason on
    the wire (an :class:`ErrorCode` when this side knows it; a newer evaluator's code stays a
    string), ``message`` says what happened.

    One failure, one name on every side: the evaluator raises it inside its process and answers
    with its code (an ``error`` reply); the sandbox handle returns it as that slice's outcome;
    the worker reports it to the scheduler in a ``slice_failed`` message."""

    def __init__(self, code: ErrorCode | str, message: str) -> None:
        if not isinstance(code, ErrorCode) and code in ErrorCode._value2member_map_:
            code = ErrorCode(code)
        super().__init__(f"{code}: {message}")
        self.code: ErrorCode | str = code
        self.message = message
