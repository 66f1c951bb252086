"""What gets signed, and how: canonical, domain-separated payloads over secp256k1.

Signatures are never over re-serialised JSON. Each payload starts with a domain tag that names
what is signed and the version, then length-prefixed fields, so no payload of one kind can be
read as another. The signed digest is keccak-256 of the payload; a signature is 65 bytes
(r || s || v with v in {0, 1}), written as 130 hex digits. An address is the last 20 bytes of
keccak-256 of the uncompressed public key, EIP-55 checksummed.
"""

from __future__ import annotations

import hashlib
import struct

from eth_keys.datatypes import PrivateKey, Signature
from eth_keys.exceptions import BadSignature
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from eth_utils.exceptions import ValidationError

__all__ = [
    "session_payload",
    "result_payload",
    "deploy_payload",
    "owner_action_payload",
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


def sign(private_key: bytes | PrivateKey, payload: bytes) -> str:
    """Sign ``payload`` with a secp256k1 key (32 bytes, or a key object to skip deriving its
    public key on every call); returns 130 hex digits."""
    key = private_key if isinstance(private_key, PrivateKey) else PrivateKey(private_key)
    signature = key.sign_msg_hash(keccak(payload))
    return signature.to_bytes().hex()


def recover(payload: bytes, signature: str) -> str | None:
    """The checksummed address that signed ``payload``, or None if the signature is invalid."""
    try:
        sig = Signature(bytes.fromhex(signature))
        public = sig.recover_public_key_from_msg_hash(keccak(payload))
    except (ValueError, BadSignature, ValidationError):
        return None
    return public.to_checksum_address()


def verify(payload: bytes, signature: str, address: str) -> bool:
    """True when ``signature`` over ``payload`` was made by ``address``."""
    signer = recover(payload, signature)
    return signer is not None and signer.lower() == address.lower()


def address_of(private_key: bytes) -> str:
    """The EIP-55 address of a private key."""
    return PrivateKey(private_key).public_key.to_checksum_address()


def checksum(address: str) -> str:
    """EIP-55 form of ``address``. Raises ValueError if it is not an address."""
    return str(to_checksum_address(address))
