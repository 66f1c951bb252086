"""The hash puzzle's verifier in Python (runs on the scheduler, in its sandbox): is the
result "<nonce> <sha256 hex>" for this prefix, with enough leading zero bits?"""

import hashlib


def verify(prefix, result, difficulty="16"):
    try:
        nonce, digest_hex = result.decode().split()
        int(nonce)
    except ValueError:
        return False
    digest = hashlib.sha256(prefix.rstrip(b"\r\n") + nonce.encode()).digest()
    zeros = 0
    for byte in digest:
        if byte:
            zeros += 8 - byte.bit_length()
            break
        zeros += 8
    return digest.hex() == digest_hex and zeros >= int(difficulty)
