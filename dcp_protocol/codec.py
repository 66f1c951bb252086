"""Bytes <-> messages, with no I/O.

A frame is one UTF-8 JSON object: ``{"v": 1, "type": "...", ...fields}``, or, in protocol
version 2, one MessagePack map: ``{"v": 2, "type": "...", ...fields}`` with bytes fields as
MessagePack ``bin``, as they are (:func:`encode_binary`, :func:`decode_binary`).

* On the websocket each frame is one message: JSON in a text message, MessagePack in a
  binary one (:func:`decode_frame` tells them apart). A scheduler announces the highest
  version it speaks in ``hello.protocol``; a worker that speaks 2 and reads 2 there sends
  its frames in MessagePack from ``auth`` on, and a scheduler answers a session whose
  frames came in MessagePack in MessagePack. Either side of another version is understood.
* On the evaluator's pipes each frame is preceded by its length as a 4-byte big-endian
  unsigned integer. :class:`StreamDecoder` turns a byte stream into messages however the
  bytes arrive (one at a time or many frames at once). There a frame may also be *binary*
  (``frame(message, binary=True)``): the JSON object without the message's one large bytes
  field (:data:`BLOB_FIELDS`: ``slice``'s datum, ``slice_done``'s result, ``assign``'s
  module), naming it in ``"blob"``, then a NUL byte (never in JSON text), then that field's
  bytes as they are. No base64 and no JSON scan of the bytes: a 1 MiB datum cost 7 ms to
  frame and 7 ms to read back as base64 in JSON, each way. The evaluator answers a binary
  request in binary, a JSON one in JSON, so either side of another version is understood.
* A frame nests at most :data:`MAX_NESTING` levels of arrays and objects; a deeper one is
  refused before it is decoded (:mod:`.nesting`), so no decoder recursion depends on a peer.
* A frame is at most :data:`~.limits.MAX_FRAME_BYTES` (or the smaller ``max_frame_bytes`` a
  scheduler announces): :func:`result_item_bytes` and :func:`results_frame_bytes` let a sender
  pack ``results`` frames by their exact encoded size.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import struct
from collections import deque
from collections.abc import Mapping
from types import ModuleType
from typing import Any, TypeGuard

from .errors import FrameError, FrameTooLarge, UnknownMessage, UnsupportedVersion
from .limits import MAX_FRAME_BYTES, MAX_UINT64
from .messages import Message, ResultItem, Results, from_wire, to_native, to_wire
from .nesting import MAX_NESTING, check_json, strict_loads

__all__ = [
    "PROTOCOL_VERSION",
    "BINARY_VERSION",
    "MAX_FRAME_BYTES",
    "MAX_NESTING",
    "encode",
    "encode_json",
    "decode",
    "encode_binary",
    "encode_as",
    "decode_binary",
    "decode_frame",
    "peek",
    "wire_bytes",
    "frame",
    "BLOB_FIELDS",
    "result_item_bytes",
    "results_frame_bytes",
    "StreamDecoder",
]

PROTOCOL_VERSION = 1
#: MessagePack frames, bytes as they are (docs/protocol.md section 1); the highest version a
#: scheduler of this code announces in ``hello.protocol``.
BINARY_VERSION = 2
_PREFIX = struct.Struct(">I")
#: The field a binary frame of each message type carries after its JSON header.
BLOB_FIELDS = {"slice": "datum", "slice_done": "result", "assign": "module"}


def encode_json(data: object) -> bytes:
    """JSON data as frames encode it (compact, ASCII, no NaN): its size is its size in a
    frame."""
    return json.dumps(data, separators=(",", ":"), allow_nan=False).encode()


_dumps = encode_json


def encode(message: Message) -> bytes:
    """Serialize ``message`` to one frame's bytes (no length prefix)."""
    data = to_wire(message)
    data["v"] = PROTOCOL_VERSION
    return _dumps(data)


@functools.cache
def _msgspec() -> ModuleType:
    """msgspec, imported on first use: an evaluator, which reads only its pipes' frames, does
    not pay its import (13-20 ms of a cold start)."""
    import msgspec
    import msgspec.msgpack

    return msgspec


@functools.cache
def _packer() -> Any:
    return _msgspec().msgpack.Encoder()


def encode_binary(message: Message) -> bytes:
    """Serialize ``message`` to one MessagePack frame (protocol version 2)."""
    data = to_native(message)
    data["v"] = BINARY_VERSION
    packed: bytes = _packer().encode(data)
    return packed


def encode_as(message: Message, binary: bool) -> bytes:
    """``message`` as one frame of a session whose frames are MessagePack (``binary``) or
    JSON."""
    return encode_binary(message) if binary else encode(message)


def wire_bytes(value: Any, binary: bool = False) -> int:
    """The bytes a record (or field value) takes in a JSON frame, or with ``binary`` in a
    MessagePack one."""
    return len(_packer().encode(to_native(value))) if binary else len(_dumps(to_wire(value)))


def _bin_header(size: int) -> int:
    return 2 if size < 1 << 8 else 3 if size < 1 << 16 else 5


def result_item_bytes(item: ResultItem, binary: bool = False) -> int:
    """The exact bytes ``item`` takes inside a ``results`` frame (JSON, or with ``binary``
    MessagePack), without encoding its result: base64 needs no JSON escapes, and a ``bin``
    is a header and the bytes, so either length is known from the result's."""
    if binary:
        data = to_native(item)
        data["result"] = b""
        return len(_packer().encode(data)) - 2 + _bin_header(len(item.result)) + len(item.result)
    data = to_wire(item)
    data["result"] = ""
    return len(_dumps(data)) + 4 * -(-len(item.result) // 3)


def _results_frame_base(binary: bool) -> int:
    item = ResultItem("", 0, "", b"", "0x" + "0" * 40, "0" * 130)
    frame_ = Results(id=MAX_UINT64, results=(item,))
    size = len(encode_binary(frame_)) if binary else len(encode(frame_))
    return size - result_item_bytes(item, binary)


#: A ``results`` frame's bytes beside its results, with the longest id (JSON).
_RESULTS_FRAME_BASE = _results_frame_base(False)


@functools.cache
def _results_frame_base_binary() -> int:
    return _results_frame_base(True)


def results_frame_bytes(item_bytes: int, count: int, binary: bool = False) -> int:
    """The most bytes a ``results`` frame of ``count`` results whose
    :func:`result_item_bytes` add up to ``item_bytes`` encodes to (exact but for the id)."""
    if binary:  # the array's header: 1 byte up to 15 items, 3 up to 65535
        return _results_frame_base_binary() + item_bytes + (2 if count > 15 else 0)
    return _RESULTS_FRAME_BASE + item_bytes + max(0, count - 1)


#: The first byte of a MessagePack map (fixmap, map 16, map 32): a binary frame. A JSON
#: object starts with ``{`` or whitespace, never one of these.
_MAP_MARKERS = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}


def _is_msgpack(data: bytes | str) -> TypeGuard[bytes]:
    return isinstance(data, bytes) and bool(data) and data[0] in _MAP_MARKERS


def decode_frame(
    data: bytes | str, registry: Mapping[str, type[Message]], max_bytes: int = MAX_FRAME_BYTES
) -> tuple[Message, bool]:
    """A websocket message's frame, and whether it was MessagePack: text is JSON, and so is
    a binary message that does not start as a MessagePack map (a version 1 peer's JSON sent
    as bytes); anything else is :func:`decode_binary`'s."""
    if _is_msgpack(data):
        return decode_binary(data, registry, max_bytes), True
    return decode(data, registry, max_bytes), False


def peek(data: bytes | str) -> Any:
    """A frame's data as parsed, its fields unchecked (the ``id`` of a frame that failed to
    decode, for its error's ``re``), or None when it cannot be parsed at all; the nesting
    bound holds as for :func:`decode`."""
    msgspec = _msgspec()
    try:
        if _is_msgpack(data):
            return msgspec.msgpack.decode(data)
        check_json(data, MAX_NESTING, "frame")
        return strict_loads(data)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError, ValueError):
        return None  # NestingTooDeep is a ValueError


def decode_binary(
    data: bytes, registry: Mapping[str, type[Message]], max_bytes: int = MAX_FRAME_BYTES
) -> Message:
    """Parse one MessagePack frame (protocol version 2) into a message of ``registry``. The
    same checks as :func:`decode` hold: every field's type and range (a ``bin`` for a bytes
    field; a base64 string is also read), and free-form fields hold JSON data only.

    Raises:
        FrameTooLarge: ``data`` exceeds ``max_bytes``.
        FrameError: not one MessagePack map, trailing bytes, or nested beyond what the
            decoder's recursion allows (free-form fields are held to :data:`MAX_NESTING`).
        UnsupportedVersion: ``v`` is not :data:`BINARY_VERSION`.
        UnknownMessage, InvalidMessage: as :func:`decode`.
    """
    if len(data) > max_bytes:
        raise FrameTooLarge(len(data), max_bytes)
    msgspec = _msgspec()
    try:
        obj = msgspec.msgpack.decode(data)
    except msgspec.DecodeError as exc:
        raise FrameError(f"frame is not valid MessagePack: {exc}") from None
    except RecursionError:
        raise FrameError(f"frame nests deeper than {MAX_NESTING} levels") from None
    if not isinstance(obj, dict):
        raise FrameError("frame is not a MessagePack map")
    version = obj.pop("v", None)
    if version != BINARY_VERSION:
        raise UnsupportedVersion(
            f"protocol version {version!r} is not supported in a MessagePack frame (this side"
            f" speaks {BINARY_VERSION} there)"
        )
    return from_wire(_message_class(obj, registry)[1], obj)


def _message_class(
    obj: dict[Any, Any], registry: Mapping[str, type[Message]]
) -> tuple[str, type[Message]]:
    """A frame's ``type`` and its class in ``registry``.

    Raises:
        FrameError: no string ``type``.
        UnknownMessage: ``type`` is not in ``registry``.
    """
    type_ = obj.get("type")
    if not isinstance(type_, str):
        raise FrameError("frame has no string 'type'")
    cls = registry.get(type_)
    if cls is None:
        raise UnknownMessage(type_)
    return type_, cls


def decode(
    data: bytes | str,
    registry: Mapping[str, type[Message]],
    max_bytes: int = MAX_FRAME_BYTES,
    blob: bytes | None = None,
) -> Message:
    """Parse one frame into a message of ``registry``; ``blob``: a binary frame's bytes,
    for the field its header names (``data`` is then the header).

    Raises:
        FrameTooLarge: ``data`` exceeds ``max_bytes``.
        NestingTooDeep: arrays and objects nest deeper than :data:`MAX_NESTING` (checked
            before decoding; a :class:`FrameError`).
        FrameError: not a UTF-8 JSON object.
        UnsupportedVersion: ``v`` is not :data:`PROTOCOL_VERSION`.
        UnknownMessage: ``type`` is not in ``registry``.
        InvalidMessage: a field is missing, unexpected or ill-typed.
    """
    if len(data) > max_bytes:
        raise FrameTooLarge(len(data), max_bytes)
    check_json(data, MAX_NESTING, "frame")
    try:
        obj = strict_loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise FrameError(f"frame is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise FrameError("frame is not a JSON object")
    version = obj.pop("v", None)
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersion(
            f"protocol version {version!r} is not supported (this side speaks {PROTOCOL_VERSION})"
        )
    type_, cls = _message_class(obj, registry)
    if blob is not None:
        field = BLOB_FIELDS.get(type_)
        if field is None:
            raise FrameError(f"{type_} frames carry no binary part")
        if obj.pop("blob", None) != field or field in obj:
            raise FrameError(
                f"a binary {type_} frame names its bytes field ('blob': {field!r}) and leaves"
                " it out of its header"
            )
        obj[field] = blob  # bytes as they are: JSON never yields bytes, so only from here
    return from_wire(cls, obj)


def frame(message: Message, binary: bool = False) -> bytes:
    """Encode ``message`` with its 4-byte length prefix, for the evaluator's pipes; with
    ``binary``, its bytes field (:data:`BLOB_FIELDS`) after the JSON header as it is (a
    message without one, or with None there, goes as JSON)."""
    field = BLOB_FIELDS.get(message.type) if binary else None
    blob = getattr(message, field) if field is not None else None
    if blob is None:
        body = encode(message)
        return _PREFIX.pack(len(body)) + body
    data = to_wire(dataclasses.replace(message, **{field: b""}))  # type: ignore[arg-type]
    del data[field]
    data["blob"] = field
    data["v"] = PROTOCOL_VERSION
    header = _dumps(data)
    return b"".join((_PREFIX.pack(len(header) + 1 + len(blob)), header, b"\0", blob))


class StreamDecoder:
    """Sans-I/O reader of length-prefixed frames.

    Feed bytes with :meth:`receive_data`; take messages with :meth:`next_message`. A frame
    that fails to parse raises from :meth:`next_message` and is consumed, so the stream stays
    in sync and the caller may answer with an error and carry on. A length prefix above the
    limit cannot be skipped safely (the sender is broken or hostile): it raises
    :class:`FrameTooLarge` every time, and the caller must close the stream.
    """

    def __init__(
        self, registry: Mapping[str, type[Message]], max_bytes: int = MAX_FRAME_BYTES
    ) -> None:
        self._registry = registry
        self._max = max_bytes
        self._buffer = bytearray()
        self._frames: deque[bytes] = deque()
        self._eof = False
        #: True once the stream cannot be resynchronised; the caller must close it.
        self.broken = False
        #: Whether the message :meth:`next_message` returned last came in a binary frame.
        self.binary = False

    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the stream."""
        self._buffer += data

    def receive_eof(self) -> None:
        """Note that the stream ended; a partial frame then becomes an error."""
        self._eof = True

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as messages."""
        return len(self._buffer)

    def next_message(self) -> Message | None:
        """The next complete message, or None when more bytes are needed.

        Raises:
            FrameTooLarge: the announced frame length exceeds the limit (fatal).
            FrameError: the stream ended inside a frame (fatal), or a frame is malformed.
            ProtocolError: any other decoding error of one frame (the frame is skipped).
        """
        if len(self._buffer) < _PREFIX.size:
            if self._eof and self._buffer:
                self.broken = True
                raise FrameError("stream ended inside a frame's length prefix")
            return None
        (length,) = _PREFIX.unpack_from(self._buffer)
        if length > self._max:
            self.broken = True
            raise FrameTooLarge(length, self._max)
        end = _PREFIX.size + length
        if len(self._buffer) < end:
            if self._eof:
                self.broken = True
                raise FrameError(
                    f"stream ended inside a frame ({len(self._buffer)} of {end} bytes)"
                )
            return None
        nul = self._buffer.find(b"\0", _PREFIX.size, end)
        if nul < 0:
            body = bytes(self._buffer[_PREFIX.size : end])
            blob = None
        else:
            body = bytes(self._buffer[_PREFIX.size : nul])
            blob = bytes(self._buffer[nul + 1 : end])
        del self._buffer[:end]
        self.binary = blob is not None
        return decode(body, self._registry, self._max, blob)
