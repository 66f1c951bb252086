"""Check hash-puzzle results: each line is "<nonce> <sha256 hex>" for its prefix."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from scheduler.client import SliceResult


def leading_zero_bits(digest: bytes) -> int:
    bits = 0
    for byte in digest:
        if byte == 0:
            bits += 8
            continue
        return bits + 8 - byte.bit_length()
    return bits


def check(prefix: bytes, result: bytes, difficulty: int) -> str | None:
    """None when ``result`` solves the puzzle for ``prefix``; otherwise what is wrong."""
    try:
        nonce_text, digest_hex = result.decode().split()
        nonce = int(nonce_text)
    except ValueError:
        return f"not '<nonce> <hash>': {result!r}"
    digest = hashlib.sha256(prefix + str(nonce).encode()).digest()
    if digest.hex() != digest_hex:
        return f"hash mismatch for nonce {nonce}"
    if leading_zero_bits(digest) < difficulty:
        return f"only {leading_zero_bits(digest)} leading zero bits"
    return None


def show_results(results: Iterable[SliceResult], prefixes: list[bytes], difficulty: int) -> int:
    """Print each result in slice order, checked again here; the number that were wrong or
    missing."""
    failures = 0
    for r in results:
        prefix = prefixes[r.slice]
        if r.result is None:
            problem: str | None = f"no result ({r.state}: {r.error})"
        else:
            problem = check(prefix, r.result, difficulty)
        failures += problem is not None
        shown = r.result.decode().strip() if r.result else "-"
        verdict = "ok" if problem is None else f"WRONG: {problem}"
        print(f"   slice {r.slice:>2}  {prefix.decode():<18} {shown}  {verdict}")
    return failures
