"""What gets signed, and how: canonical, domain-separated payloads over secp256k1.

Signatures are never over re-serialised JSON. Each payload starts with a domain tag that names
what is signed and the version, then length-prefixed fields, so no payload of one kind can be
read as another. The signed digest is keccak-256 of the payload; a signature is 65 bytes
(r || s || v with v in {0, 1}), written as 130 hex digits. An address is the last 20 bytes of
keccak-256 of the uncompressed public key, EIP-55 checksummed.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Iterable

import coincurve
from eth_hash.auto import keccak
from eth_utils.address import to_checksum_address

__all__ = [
    "session_payload",
    "result_payload",
    "deploy_payload",
    "owner_action_payload",
    "owner_request_payload",
    "sign",
    "recover",
    "verify",
    "address_of",
    "checksum",
]

SESSION_DOMAIN = b"dcp-session-v1"
RESULT_DOMAIN = b"dcp-result-v1"
DEPLOY_DOMAIN = b"dcp-deploy-v1"
OWNER_ACTION_DOMAIN = b"dcp-owner-action-v1"
OWNER_REQUEST_DOMAIN = b"dcp-owner-request-v1"


def _field(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def _payload(domain: bytes, *fields: bytes) -> bytes:
    return _field(domain) + b"".join(_field(f) for f in fields)


def session_payload(challenge: str, server: str, address: str) -> bytes:
    """What a worker signs to open a session: the scheduler's fresh challenge."""
    return _payload(SESSION_DOMAIN, challenge.encode(), server.encode(), address.lower().encode())


def result_payload(job: str, slice_: int, token: str, result: bytes, payment_address: str) -> bytes:
    """What a worker signs for one result; the result enters by its SHA-256."""
    return _payload(
        RESULT_DOMAIN,
        job.encode(),
        struct.pack(">Q", slice_),
        token.encode(),
        hashlib.sha256(result).digest(),
        payment_address.lower().encode(),
    )


def deploy_payload(body: bytes) -> bytes:
    """What a job owner signs to deploy: the exact bytes of the job document sent."""
    return _payload(DEPLOY_DOMAIN, hashlib.sha256(body).digest())


def owner_action_payload(action: str, job: str, timestamp: int) -> bytes:
    """What a job owner signs to act on a job (e.g. cancel); the timestamp bounds replay."""
    return _payload(
        OWNER_ACTION_DOMAIN, action.encode(), job.encode(), struct.pack(">Q", timestamp)
    )


def owner_request_payload(
    method: str,
    host: str,
    path: str,
    query: Iterable[tuple[str, str]],
    body: bytes,
    timestamp: int,
    nonce: str,
    address: str,
) -> bytes:
    """What a job owner signs for one compute API request (deploy, cancel, reads, tokens).

    Args:
        method: the HTTP method (upper-cased here).
        host: the ``Host`` header sent (lower-cased here): a request signed for one scheduler
            is refused by another.
        path: the decoded URL path, e.g. ``/api/v1/jobs/<id>/results``.
        query: the decoded query parameters; signed sorted, so their order on the wire does
            not matter, and each as a (name, value) pair of fields.
        body: the exact body bytes (empty for GET); it enters by its SHA-256.
        timestamp: Unix seconds; the scheduler refuses it outside its window.
        nonce: the request's nonce as sent; the scheduler refuses it a second time.
        address: the signer's address (lower-cased here).
    """
    pairs = b"".join(_field(k.encode()) + _field(v.encode()) for k, v in sorted(query))
    return _payload(
        OWNER_REQUEST_DOMAIN,
        method.upper().encode(),
        host.lower().encode(),
        path.encode(),
        pairs,
        hashlib.sha256(body).digest(),
        struct.pack(">Q", timestamp),
        nonce.encode(),
        address.lower().encode(),
    )


def sign(private_key: bytes | coincurve.PrivateKey, payload: bytes) -> str:
    """Sign ``payload`` with a secp256k1 key (32 bytes, or a key object to skip parsing it on
    every call); returns 130 hex digits. libsecp256k1 through coincurve, about 50 us (eth-keys'
    object layer over the same library cost 210 us)."""
    key = (
        private_key
        if isinstance(private_key, coincurve.PrivateKey)
        else coincurve.PrivateKey(private_key)
    )
    return key.sign_recoverable(keccak(payload), hasher=None).hex()


def _signer(payload: bytes, signature: str) -> bytes | None:
    """The 20-byte address that signed ``payload``, or None if the signature is invalid."""
    try:
        raw = bytes.fromhex(signature)
    except ValueError:
        return None
    if len(raw) != 65 or raw[64] > 1:
        return None
    try:
        public = coincurve.PublicKey.from_signature_and_message(raw, keccak(payload), hasher=None)
    except (ValueError, TypeError):
        return None
    return keccak(public.format(compressed=False)[1:])[-20:]


def recover(payload: bytes, signature: str) -> str | None:
    """The checksummed address that signed ``payload``, or None if the signature is invalid."""
    signer = _signer(payload, signature)
    return None if signer is None else str(to_checksum_address(signer))


def verify(payload: bytes, signature: str, address: str) -> bool:
    """True when ``signature`` over ``payload`` was made by ``address``."""
    signer = _signer(payload, signature)
    if signer is None:
        return False
    try:
        return signer == bytes.fromhex(address.removeprefix("0x").removeprefix("0X"))
    except ValueError:
        return False


def address_of(private_key: bytes) -> str:
    """The EIP-55 address of a private key."""
    public = coincurve.PrivateKey(private_key).public_key.format(compressed=False)
    return str(to_checksum_address(keccak(public[1:])[-20:]))


@functools.lru_cache(maxsize=4096)
def checksum(address: str) -> str:
    """EIP-55 form of ``address``. Raises ValueError if it is not an address."""
    return str(to_checksum_address(address))
