"""Every size and range bound of the wire protocol, defined once (docs/protocol.md section 1).

The scheduler announces the bounds of a session in ``welcome`` (``max_frame_bytes``,
``max_result_bytes``); an operator may lower them, never raise them past these.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "MAX_FRAME_BYTES",
    "MAX_RESULTS_PER_FRAME",
    "RESULT_FIELDS_BYTES",
    "MAX_UINT64",
    "MAX_INT64",
    "MAX_UINT32",
    "MAX_NUMBER",
    "Range",
    "result_frame_bytes",
]

#: The largest frame on either channel (job modules and results travel in frames). A
#: scheduler may announce less in ``welcome.max_frame_bytes``, never more.
MAX_FRAME_BYTES = 64 * 1024 * 1024
#: The most results one ``results`` frame holds (and at most ``max_frame_bytes`` of them).
MAX_RESULTS_PER_FRAME = 256
#: What the fields of one result other than its bytes may take in a frame (job id, token,
#: signature, payment address, metrics, the frame's own keys): a frame limit must leave this
#: much beside one result of ``max_result_bytes``.
RESULT_FIELDS_BYTES = 4096

MAX_UINT64 = 2**64 - 1
MAX_INT64 = 2**63 - 1
MAX_UINT32 = 2**32 - 1
#: The largest finite double: numbers beyond it are refused before decoding (nesting.py).
MAX_NUMBER = 1.7976931348623157e308


@dataclass(frozen=True)
class Range:
    """The values a numeric field accepts, both ends included. A field's type carries it
    (``Annotated[int, Range(1, MAX_UINT32)]``); without one an integer is within
    0..:data:`MAX_UINT64` and a number within 0..:data:`MAX_NUMBER`."""

    low: int | float
    high: int | float

    def __str__(self) -> str:
        return f"{self.low}..{self.high}"


def result_frame_bytes(result_bytes: int) -> int:
    """The frame size that one result of ``result_bytes`` bytes needs, at most: its base64
    form and :data:`RESULT_FIELDS_BYTES`."""
    return 4 * -(-result_bytes // 3) + RESULT_FIELDS_BYTES
