"""The wire protocol of the platform, sans I/O: messages, codec, signing payloads, states.

Nothing here reads or writes a socket, a pipe or a file; the worker, the scheduler and the
evaluator wrap it in their own I/O. docs/protocol.md is the normative description.
"""

from __future__ import annotations

# ``signing`` is imported where it is used (``from dcp_protocol import signing``): it
# pulls in eth-utils (about 120 ms), which an evaluator, started often, never needs.
from . import limits, nesting, policy
from .codec import (
    BINARY_VERSION,
    BLOB_FIELDS,
    PROTOCOL_VERSION,
    StreamDecoder,
    decode,
    decode_binary,
    decode_frame,
    encode,
    encode_as,
    encode_binary,
    encode_json,
    frame,
    peek,
    result_item_bytes,
    results_frame_bytes,
    wire_bytes,
)
from .errors import (
    DcpError,
    ErrorCode,
    FrameError,
    FrameTooLarge,
    InvalidMessage,
    ProtocolError,
    SliceFailure,
    UnknownMessage,
    UnsupportedVersion,
)
from .limits import MAX_FRAME_BYTES, RESULT_FIELDS_BYTES, Range
from .messages import *  # noqa: F403
from .messages import __all__ as _messages_all
from .nesting import MAX_NESTING, NestingTooDeep
from .states import IllegalTransition, SliceEvent, SliceState, transition

__all__ = [
    "DcpError",
    "MAX_FRAME_BYTES",
    "MAX_NESTING",
    "PROTOCOL_VERSION",
    "StreamDecoder",
    "decode",
    "decode_binary",
    "decode_frame",
    "encode_as",
    "encode_binary",
    "peek",
    "wire_bytes",
    "encode",
    "frame",
    "BINARY_VERSION",
    "BLOB_FIELDS",
    "encode_json",
    "result_item_bytes",
    "results_frame_bytes",
    "RESULT_FIELDS_BYTES",
    "Range",
    "limits",
    "ErrorCode",
    "FrameError",
    "FrameTooLarge",
    "InvalidMessage",
    "NestingTooDeep",
    "ProtocolError",
    "SliceFailure",
    "UnknownMessage",
    "UnsupportedVersion",
    "IllegalTransition",
    "SliceEvent",
    "SliceState",
    "transition",
    "nesting",
    "policy",
    *_messages_all,
]
