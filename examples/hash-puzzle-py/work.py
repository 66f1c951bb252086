"""The hash puzzle as a Python work function (the ``python`` runtime).

For the slice's prefix (bytes: a line of the job's inputs file), find the smallest nonce such
that SHA-256(prefix || decimal nonce) has at least ``difficulty`` leading zero bits; return
"<nonce> <sha256 hex>\\n" as bytes, the same output as puzzle.wasm, so the same verifier checks
it. ``progress`` is given by the runtime.
"""

import hashlib


def leading_zero_bits(digest):
    bits = 0
    for byte in digest:
        if byte:
            return bits + 8 - byte.bit_length()
        bits += 8
    return bits


def work(prefix, difficulty="16"):
    prefix = prefix.rstrip(b"\r\n")
    difficulty = int(difficulty)
    expected = 2.0 ** min(difficulty, 62)
    nonce = 0
    while True:
        digest = hashlib.sha256(prefix + str(nonce).encode()).digest()
        if leading_zero_bits(digest) >= difficulty:
            return f"{nonce} {digest.hex()}\n".encode()
        nonce += 1
        if nonce & 0xFFFF == 0:
            progress(min(0.99, nonce / expected))  # noqa: F821 (the runtime defines it)
