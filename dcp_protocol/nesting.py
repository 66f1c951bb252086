"""The nesting bound: how deep untrusted JSON (and TOML) may nest, checked before decoding.

Python's decoders recurse once per level of arrays and objects (``json``'s C scanner and
``tomllib`` alike). Past the interpreter's recursion limit that is a RecursionError that the
callers' ``except ValueError`` does not catch; with a raised limit it is a C stack overflow
that kills the process. So every decoder of bytes from outside (frames on both channels, the
control socket, compute API bodies and replies, job files and documents, configuration files,
keystores) first checks the depth with a linear scan that counts ``[`` and ``{`` outside
strings, honouring escapes, and refuses anything deeper than :data:`MAX_NESTING`.

The scan never decodes. On UTF-8 bytes every byte below 0x80 is the ASCII character it looks
like, so it works on bytes; other encodings that ``json.loads`` accepts are converted first.
The depth it measures is the largest count of open brackets not yet closed at any point,
which is the nesting depth of a valid document and at least the depth any parser reaches on
invalid text (a parser stops at the first error; the scan goes on).

Cost, in the common cases: when the whole input holds no more than :data:`MAX_NESTING`
brackets it is two ``bytes.count`` calls; otherwise strings are cut out with one regular
expression, everything but brackets is deleted with ``bytes.translate``, and innermost ``[]``
pairs are removed with ``bytes.replace``, one level per pass, at most :data:`MAX_NESTING`
passes. docs/protocol.md section 1 has measured figures.
"""

from __future__ import annotations

import json
import math
import re
from itertools import accumulate
from typing import Any

from .errors import FrameError

__all__ = [
    "MAX_NESTING",
    "NestingTooDeep",
    "check_json",
    "check_toml",
    "json_depth_exceeds",
    "loads",
    "strict_loads",
]

#: The deepest nesting of arrays and objects accepted from outside, on every channel. Our own
#: frames nest at most 7 deep; job documents are held to half of this (scheduler.jobdoc), so
#: that the frames that carry their parts stay within it.
MAX_NESTING = 64


class NestingTooDeep(FrameError, ValueError):
    """Arrays and objects nest deeper than the bound; refused before decoding.

    A :class:`FrameError` (so a frame gets ``malformed_frame``), and a ValueError, so that a
    caller that handles ``json.loads``'s errors handles this one too.
    """

    def __init__(self, limit: int, subject: str = "") -> None:
        message = f"nests deeper than {limit} levels of arrays and objects"
        super().__init__(f"{subject} {message}" if subject else message)
        self.limit = limit


# TOML's strings and comments, longest delimiters first (TOML 1.0, section "String").
#: A run of key characters, dots and blanks: a dotted key is one (its quoted parts stripped
#: to nothing leave bare dots); TOML values outside strings hold at most one dot per run.
_TOML_KEY_RUN = re.compile(r"[A-Za-z0-9_\-. \t]+")
_TOML_SKIP = re.compile(
    r'"""(?:[^"\\]|\\[\s\S]|"(?!""))*(?:"{3,5}|\Z)'
    r"|'''[\s\S]*?(?:'{3,5}|\Z)"
    r'|"(?:[^"\\\n]|\\.)*"?'
    r"|'[^'\n]*'?"
    r"|#[^\n]*"
)
# ``translate(_FOLD, _NOT_KEPT)`` deletes every byte but brackets and quotes, and folds { } into
# [ ]; ``translate(_FOLD, _NOT_BRACKETS)`` keeps only the brackets.
_FOLD = bytes.maketrans(b"{}", b"[]")
_NOT_KEPT = bytes(b for b in range(256) if b not in b'[]{}"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_RUNS = re.compile(rb"\[+|\]+")


def _utf8(data: bytes | bytearray | str) -> bytes:
    if isinstance(data, str):
        return data.encode("utf-8", "surrogatepass")
    raw = bytes(data)
    encoding = json.detect_encoding(raw)
    if encoding in ("utf-8", "utf-8-sig"):
        return raw
    try:  # UTF-16 or UTF-32, as json.loads would read it
        return raw.decode(encoding, "surrogatepass").encode("utf-8", "surrogatepass")
    except UnicodeError:
        return raw  # json.loads refuses it before parsing anything


def _max_depth(brackets: bytes) -> int:
    """The most opens not yet closed at any point of a string of ``[`` and ``]``; one step
    per run of equal brackets."""
    lengths = list(map(len, _RUNS.findall(brackets)))
    closing = slice(0 if brackets[:1] == b"]" else 1, None, 2)  # runs alternate
    lengths[closing] = [-n for n in lengths[closing]]
    return max(accumulate(lengths, initial=0))


def _brackets_depth_exceeds(brackets: bytes, limit: int) -> bool:
    """Whether a string of ``[`` and ``]`` opens more than ``limit`` at some point.

    Runs of equal brackets are walked in Python when they are long (few of them); while they
    are short, passes of ``bytes.replace`` remove the innermost pairs first. A pass lowers
    every balanced part by one level and lowers the depth anywhere by at most one, so the
    depth is at most the remainder's plus the passes (exactly that for balanced input).
    Short runs mean many innermost pairs, so each pass shortens the string by at least an
    eighth: the passes cost a few scans of the input in all, and there are at most ``limit``.
    """
    if brackets.count(b"[") <= limit:
        return False
    if b"[" * (limit + 1) in brackets:
        return True  # the usual attack, one run of opens: one scan
    passes = 0
    while True:
        leaves = brackets.count(b"[]")
        if leaves == 0 or (leaves + brackets.count(b"][")) * 8 < len(brackets):
            return _max_depth(brackets) + passes > limit
        if passes == limit:
            return True  # a balanced part is still there after ``limit`` levels
        brackets = brackets.replace(b"[]", b"")
        passes += 1


def json_depth_exceeds(data: bytes | bytearray | str, limit: int = MAX_NESTING) -> bool:
    """Whether JSON text ``data`` nests arrays and objects deeper than ``limit``."""
    # Fast path. In any encoding json.loads reads, a bracket has at least one byte of its value.
    if isinstance(data, str):
        brackets = data.count("[") + data.count("{")
    else:
        brackets = data.count(b"[") + data.count(b"{")
    if brackets <= limit:
        return False
    raw = _utf8(data)
    if b"\\" in raw:
        # Escaped backslashes first (left to right, as a parser pairs them), then escaped
        # quotes: every quote left opens or closes a string. A backslash outside a string
        # is an error a parser stops at, so what this does after one does not matter.
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    kept = raw.translate(_FOLD, _NOT_KEPT)  # brackets (folded to [ ]) and quotes
    if b'"' in kept:
        # An adjacent pair of quotes is an empty string, or the end of one string and the
        # start of the next with no bracket between: either way dropping it moves no
        # bracket into or out of a string. Then every other segment is outside strings
        # (an unterminated string runs to the end, as a parser reads it).
        kept = kept.replace(b'""', b"")
        if b'"' in kept:
            kept = b"".join(kept.split(b'"')[::2])
    return _brackets_depth_exceeds(kept, limit)


def check_json(data: bytes | bytearray | str, limit: int = MAX_NESTING, subject: str = "") -> None:
    """Refuse JSON text that nests deeper than ``limit``; decodes nothing. ``subject`` starts
    the error's message ("frame", "the job document").

    Raises:
        NestingTooDeep: it does.
    """
    if json_depth_exceeds(data, limit):
        raise NestingTooDeep(limit, subject)


def check_toml(text: str, limit: int = MAX_NESTING) -> None:
    """Refuse TOML text whose arrays and inline tables nest deeper than ``limit`` (a table
    header ``[[a]]`` counts as 2 while it is read), or with a dotted key of more than
    ``limit`` parts (``a.b.c = 1`` nests tables too: tomllib needs memory quadratic in the
    number of parts, and 30,000 of them in 90 KB exhausted 3 GB); decodes nothing.

    Raises:
        NestingTooDeep: it does.
    """
    if text.count("[") + text.count("{") <= limit and text.count(".") < limit:
        return
    stripped = _TOML_SKIP.sub("", text)
    # A dotted key's parts are bare keys or quoted ones (stripped above, leaving bare dots);
    # no TOML value outside a string has more than one dot in a row of key characters.
    if any(run.group().count(".") >= limit for run in _TOML_KEY_RUN.finditer(stripped)):
        raise NestingTooDeep(limit)
    outside = stripped.encode("utf-8", "surrogatepass")
    if _brackets_depth_exceeds(outside.translate(_FOLD, _NOT_BRACKETS), limit):
        raise NestingTooDeep(limit)


def _not_a_number(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if value - value != 0.0:  # inf: a number too large for a double, such as 1e400
        raise ValueError(f"{text[:40]} is out of range")
    return value


def strict_loads(data: bytes | bytearray | str) -> Any:
    """``json.loads`` of JSON as RFC 8259 defines it: no ``NaN`` or ``Infinity``, and no
    number that reads as an infinite float (``1e400``). A NaN offer compares false with
    every bound, so it passed a minimum-wage check; outside bytes never carry them.

    Raises:
        ValueError: not such JSON (``json.JSONDecodeError``, UnicodeDecodeError).
    """
    return json.loads(data, parse_constant=_not_a_number, parse_float=_finite)


def loads(data: bytes | bytearray | str, limit: int = MAX_NESTING) -> Any:
    """:func:`strict_loads` after :func:`check_json`.

    Raises:
        NestingTooDeep: deeper than ``limit``.
        ValueError: not JSON (``json.JSONDecodeError``, UnicodeDecodeError), or numbers
            JSON does not have.
    """
    check_json(data, limit)
    return strict_loads(data)


def plain_fault(value: Any, limit: int = MAX_NESTING, depth: int = 1) -> str | None:
    """Why ``value``, decoded from MessagePack, is not JSON data, or None: objects with string
    keys, arrays, strings, finite numbers, booleans and null, nested at most ``limit`` levels
    (``value`` itself at ``depth``). A JSON parser yields nothing else; a MessagePack one also
    yields bytes, integer keys, extension types and NaN, which a reader of JSON data does not
    expect (the store keeps such fields as JSON text)."""
    kind = type(value)
    if kind is dict or kind is list:
        if depth > limit:
            return f"nests deeper than {limit} levels"
        items = value.items() if kind is dict else enumerate(value)
        for key, item in items:
            if kind is dict and type(key) is not str:
                return "object keys must be strings"
            if (why := plain_fault(item, limit, depth + 1)) is not None:
                return why
    elif kind is float:
        if not math.isfinite(value):
            return "numbers must be finite"
    elif value is not None and kind not in (str, bool, int):
        return f"{kind.__name__} is not JSON data"
    return None
