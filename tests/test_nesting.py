"""The nesting check against json.loads and a byte-by-byte reference (hypothesis)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dcp_protocol as p
from dcp_protocol import nesting

LIMIT = 8  # small, so that hypothesis reaches both sides of it


def _object_depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_object_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_object_depth, value), default=0)
    return 0


def _reference_depth(text: str) -> int:
    """Most brackets open at once outside strings, one character at a time. A backslash
    outside a string ends the scan: a parser stops there."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char == "\\":
            break
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='ab"\\[]{}\n\u00e9'),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.text(alphabet='k"\\[{', max_size=3), children, max_size=3)
    ),
    max_leaves=40,
)


@settings(max_examples=400, deadline=None)
@given(json_values, st.sampled_from(["utf-8", "utf-16", "utf-32", "str"]))
def test_agrees_with_json_loads_on_documents(value: Any, encoding: str) -> None:
    text = json.dumps(value, ensure_ascii=False)
    data: str | bytes = text if encoding == "str" else text.encode(encoding)
    assert json.loads(data) == value
    assert nesting.json_depth_exceeds(data, LIMIT) == (_object_depth(value) > LIMIT)


@settings(max_examples=1000, deadline=None)
@given(st.text(alphabet='[]{}"\\ a,:', max_size=60))
def test_never_under_counts_any_text(text: str) -> None:
    exceeds = nesting.json_depth_exceeds(text, LIMIT)
    if _reference_depth(text) > LIMIT:
        assert exceeds
    try:
        value = json.loads(text)
    except ValueError:
        return
    assert exceeds == (_object_depth(value) > LIMIT)  # exact on anything that decodes


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 3 * LIMIT), st.integers(0, 3 * LIMIT), st.text(alphabet="[]{}", max_size=20))
def test_shapes_around_the_limit(opens: int, closes: int, noise: str) -> None:
    text = "[" * opens + noise + "]" * closes
    if _reference_depth(text) > LIMIT:
        assert nesting.json_depth_exceeds(text, LIMIT)
    if opens == closes and not noise:
        assert nesting.json_depth_exceeds(text, LIMIT) == (opens > LIMIT)


def test_frames_are_refused_with_malformed_frame_before_decoding() -> None:
    deep = '{"v": 1, "type": "describe", "id": 1, "x": ' + "[" * 65 + "]" * 65 + "}"
    with pytest.raises(p.NestingTooDeep) as caught:
        p.decode(deep, p.EVALUATOR_MESSAGES)
    assert caught.value.code == p.ErrorCode.MALFORMED_FRAME
    assert "frame nests deeper than 64 levels" in caught.value.message
    ok = '{"v": 1, "type": "describe", "id": 1, "x": ' + "[" * 63 + "]" * 63 + "}"
    with pytest.raises(p.InvalidMessage):  # past the depth check: an unexpected field
        p.decode(ok, p.EVALUATOR_MESSAGES)


@pytest.mark.parametrize(
    ("text", "deep"),
    [
        ("a = " + "[" * 65 + "]" * 65, True),
        ("a = " + "[" * 64 + "]" * 64, False),
        ('a = "' + "[" * 100 + '"', False),
        ("a = '" + "{" * 100 + "'", False),
        ('a = """\n' + "[" * 100 + '\n"""', False),
        ("a = '''" + "[" * 100 + "''''", False),
        ("# " + "[" * 100 + "\na = 1", False),
        ('a = "\\"' + "[" * 100 + '"', False),
        ("[[t]]\n" * 100, False),
        ("a = " + "{b = " * 65 + "1" + "}" * 65, True),
    ],
)
def test_toml(text: str, deep: bool) -> None:
    if deep:
        with pytest.raises(nesting.NestingTooDeep):
            nesting.check_toml(text)
    else:
        nesting.check_toml(text)


def test_cost_on_a_megabyte() -> None:
    """Not a benchmark: a guard against a quadratic slip (docs/protocol.md has figures)."""
    items = [{"job": "f" * 32, "slice": i, "tags": ["a", {"b": [1]}]} for i in range(20000)]
    frame = json.dumps({"v": 1, "type": "results", "items": items})
    blocks = "[" + ",".join(["[" * 63 + "]" * 63] * 8000) + "]"
    for text in (frame, blocks, "[" * 500_000 + "]" * 500_000):
        started = time.perf_counter()
        nesting.json_depth_exceeds(text)
        assert time.perf_counter() - started < 0.5
