"""Results of the OpenCL hash puzzle as the wasm version writes them: "<nonce> <sha256 hex>"."""

from __future__ import annotations

import hashlib
import struct


def decode_puzzle(prefix: bytes, result: bytes) -> bytes:
    """``result`` is (found, ~nonce) as two little-endian uint32."""
    found, inverted = struct.unpack("<II", result)
    if not found:
        raise ValueError("no nonce found within the rounds allowed")
    nonce = ~inverted & 0xFFFFFFFF
    digest = hashlib.sha256(prefix.rstrip(b"\r\n") + str(nonce).encode()).hexdigest()
    return f"{nonce} {digest}\n".encode()
