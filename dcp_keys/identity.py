"""Keys on disk: Ethereum V3 keystores (Web3 Secret Storage), and the identity that signs.

The format and its errors are :mod:`dcp_keys.keystore` (re-exported here)::

    WalletError                 anything wrong with a keystore or a passphrase
    ├── KeystoreFormatError     not a V3 keystore we can read (names the field)
    ├── WrongPassphrase         the MAC does not match: wrong passphrase (or a tampered file)
    └── KeystoreExists          refusing to overwrite a keystore

Keystore files are written atomically with mode 0600 and never logged.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import coincurve

from dcp_protocol import signing

from . import keystore
from .keystore import KeystoreExists, KeystoreFormatError, WalletError, WrongPassphrase

__all__ = [
    "Identity",
    "WalletError",
    "KeystoreFormatError",
    "WrongPassphrase",
    "KeystoreExists",
    "create_keystore",
    "load_keystore",
    "keystore_address",
    "read_passphrase_file",
    "SCRYPT_N",
]

#: scrypt cost of new keystores (geth's "standard" setting). Tests lower it for speed.
SCRYPT_N = keystore.SCRYPT_N


@dataclass(frozen=True)
class Identity:
    """A private key in memory, able to sign. ``repr`` never shows the key."""

    private_key: bytes
    address: str
    _key: coincurve.PrivateKey = field(repr=False, compare=False)

    @classmethod
    def from_private_key(cls, private_key: bytes) -> Identity:
        if len(private_key) != 32:
            raise WalletError("a private key is 32 bytes (64 hex digits)")
        try:
            key = coincurve.PrivateKey(private_key)
        except ValueError as exc:  # zero, or not below the group order
            raise WalletError(f"not a valid secp256k1 private key: {exc}") from None
        return cls(private_key, signing.address_of(private_key), key)

    def sign(self, payload: bytes) -> str:
        """Sign a canonical payload from :mod:`dcp_protocol.signing`."""
        return signing.sign(self._key, payload)

    def __repr__(self) -> str:
        return f"Identity(address={self.address!r})"


def read_passphrase_file(path: str | os.PathLike[str]) -> bytes:
    """The passphrase in ``path``, without its trailing newline."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise WalletError(f"cannot read passphrase file {path}: {exc.strerror}") from None
    return data.rstrip(b"\r\n")


def _read_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise WalletError(f"cannot read keystore {path}: {exc.strerror}") from None
    try:
        return keystore.parse(raw)
    except KeystoreFormatError as exc:
        raise KeystoreFormatError(f"{path}: {exc}") from None


def keystore_address(path: str | os.PathLike[str]) -> str | None:
    """The address a keystore declares about itself (unverified), if any."""
    address = _read_json(path).get("address")
    if not isinstance(address, str):
        return None
    try:
        return signing.checksum(address if address.startswith("0x") else "0x" + address)
    except ValueError:
        return None


def load_keystore(path: str | os.PathLike[str], passphrase: bytes) -> Identity:
    """Decrypt a V3 keystore.

    Raises:
        WrongPassphrase: the MAC check failed.
        KeystoreFormatError: the file is not a V3 keystore.
        WalletError: the file cannot be read.
    """
    data = _read_json(path)
    try:
        key = keystore.decrypt(data, passphrase)
    except WrongPassphrase:
        raise WrongPassphrase(f"wrong passphrase for keystore {path}") from None
    except KeystoreFormatError as exc:
        raise KeystoreFormatError(f"{path}: {exc}") from None
    identity = Identity.from_private_key(bytes(key))
    declared = data.get("address")
    if (
        isinstance(declared, str)
        and declared.lower().removeprefix("0x") != identity.address.lower()[2:]
    ):
        raise KeystoreFormatError(f"{path}: declared address does not match the key inside")
    return identity


def create_keystore(
    path: str | os.PathLike[str],
    passphrase: bytes,
    private_key: bytes | None = None,
    *,
    kdf: str = "scrypt",
    iterations: int | None = None,
) -> Identity:
    """Write a new keystore at ``path`` (mode 0600, never overwriting) and return its identity.

    Args:
        private_key: import this key; a fresh random key when None.
        kdf: "scrypt" (default) or "pbkdf2".
        iterations: scrypt n / pbkdf2 c; defaults to :data:`SCRYPT_N` / 262144.

    Raises:
        KeystoreExists: ``path`` exists (it is left as it was).
        WalletError: an unsupported kdf or cost, or ``path`` cannot be written.
    """
    identity = Identity.from_private_key(private_key if private_key is not None else os.urandom(32))
    document = keystore.encrypt(
        identity.private_key, passphrase, identity.address, kdf=kdf, iterations=iterations
    )
    body = json.dumps(document, indent=2).encode() + b"\n"
    target = Path(path)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeystoreExists(f"{target} exists; refusing to overwrite a keystore") from None
    except OSError as exc:
        raise WalletError(f"cannot create {target}: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o600)  # the umask may have narrowed it further, never widened
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)
    return identity
