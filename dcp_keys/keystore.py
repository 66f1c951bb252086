"""Ethereum V3 keystores (Web3 Secret Storage), encrypted and decrypted; no file I/O.

The format, as geth and eth-keyfile write it::

    {"version": 3, "id": "<uuid4>", "address": "<40 hex digits>",
     "crypto": {"cipher": "aes-128-ctr", "cipherparams": {"iv": "<32 hex digits>"},
                "ciphertext": "<64 hex digits>",
                "kdf": "scrypt",
                "kdfparams": {"dklen": 32, "n": N, "r": R, "p": P, "salt": "<hex>"},
                "mac": "<64 hex digits>"}}

``kdf`` may also be ``"pbkdf2"`` with ``{"c": C, "dklen": 32, "prf": "hmac-sha256", "salt"}``.
The derived key ``dk`` (32 bytes) opens the file: ``mac`` is keccak-256 of ``dk[16:32] +
ciphertext`` (compared in constant time), and the private key is ``ciphertext`` decrypted with
AES-128-CTR under ``dk[:16]`` from ``iv``.

The primitives are pycryptodome's scrypt and AES (already here as eth-hash's keccak backend),
``hashlib.pbkdf2_hmac`` and eth-hash's keccak-256. Not ``cryptography``'s or ``hashlib``'s
scrypt: OpenSSL enforces RFC 7914's ``n < 2**(16 * r)``, so it refuses the V3 definition's own
scrypt example (n = 2**18, r = 1) and the keystores written like it.

A keystore is someone else's file: its KDF parameters are bounded before any work is done, so
a hostile one cannot ask for more than a gigabyte of scrypt memory or hours of PBKDF2
(:data:`MAX_SCRYPT_MEMORY`, :data:`MAX_SCRYPT_WORK`, :data:`MAX_PBKDF2_ITERATIONS`, and
bounds on n, r and p each). Files we write are within them.

Exception tree::

    WalletError                 anything wrong with a keystore or a passphrase
    ├── KeystoreFormatError     not a V3 keystore we can read (names the field)
    ├── WrongPassphrase         the MAC does not match: wrong passphrase (or a tampered file)
    └── KeystoreExists          refusing to overwrite a keystore (raised by dcp_keys.identity)
"""

from __future__ import annotations

import hashlib
import hmac
import os
import uuid
from collections.abc import Mapping
from typing import Any

from eth_hash.auto import keccak

from dcp_protocol import DcpError, nesting

__all__ = [
    "WalletError",
    "KeystoreFormatError",
    "WrongPassphrase",
    "KeystoreExists",
    "parse",
    "decrypt",
    "encrypt",
    "SCRYPT_N",
    "SCRYPT_R",
    "SCRYPT_P",
    "PBKDF2_ITERATIONS",
    "MAX_SCRYPT_MEMORY",
    "MAX_SCRYPT_WORK",
    "MAX_PBKDF2_ITERATIONS",
]

#: scrypt cost of new keystores: geth's "standard" setting (256 MiB, about a second).
SCRYPT_N = 262144
SCRYPT_R = 8
SCRYPT_P = 1
#: PBKDF2 iterations of new pbkdf2 keystores (as eth-keyfile's default).
PBKDF2_ITERATIONS = 262144
#: The most memory a keystore's scrypt may take (128 * n * r bytes): four times geth's standard.
MAX_SCRYPT_MEMORY = 1 << 30
#: The most scrypt work (n * r * p): eight times geth's standard (a few seconds).
MAX_SCRYPT_WORK = 1 << 24
# Each parameter on its own, too (p * r sizes scrypt's other buffer): geth writes n = 2**18,
# r = 8, p = 1; its test files have p = 16; the V3 definition's example r = 1, p = 8.
_MAX_SCRYPT_N = 1 << 20
_MAX_SCRYPT_R = 32
_MAX_SCRYPT_P = 16
#: The most PBKDF2-HMAC-SHA256 iterations (a few seconds).
MAX_PBKDF2_ITERATIONS = 10_000_000
_MAX_SALT = 1024
_DKLEN = 32


class WalletError(DcpError):
    """Root of keystore errors; ``str()`` is a message fit for an operator."""


class KeystoreFormatError(WalletError):
    """The file is not a readable V3 keystore."""


class WrongPassphrase(WalletError):
    """The passphrase does not open this keystore."""


class KeystoreExists(WalletError):
    """The output path already exists."""


def parse(raw: bytes) -> dict[str, Any]:
    """Decode a keystore file's bytes and check its outline (version, cipher, kdf).

    Raises:
        KeystoreFormatError: not JSON, nested too deep, not version 3, a section missing.
    """
    try:
        data = nesting.loads(raw)
    except nesting.NestingTooDeep as exc:
        raise KeystoreFormatError(f"the keystore {exc}") from None
    except ValueError:
        raise KeystoreFormatError("not a JSON keystore") from None
    if not isinstance(data, dict):
        raise KeystoreFormatError("not a JSON keystore object")
    # Some tools write "Crypto" (capitalised), as geth once did; the spec's key is "crypto".
    if "Crypto" in data and "crypto" not in data:
        data["crypto"] = data.pop("Crypto")
    if data.get("version") != 3:
        raise KeystoreFormatError("only version 3 keystores are supported")
    crypto = data.get("crypto")
    if not isinstance(crypto, dict):
        raise KeystoreFormatError("missing 'crypto' section")
    for key in ("cipher", "ciphertext", "kdf", "kdfparams", "mac"):
        if key not in crypto:
            raise KeystoreFormatError(f"missing crypto.{key}")
    if crypto["cipher"] != "aes-128-ctr":
        raise KeystoreFormatError(f"unsupported cipher {crypto['cipher']!r}")
    if crypto["kdf"] not in ("scrypt", "pbkdf2"):
        raise KeystoreFormatError(f"unsupported kdf {crypto['kdf']!r}")
    return data


def _hex(section: Mapping[str, Any], key: str, where: str, size: int | None = None) -> bytes:
    value = section.get(key)
    if not isinstance(value, str):
        raise KeystoreFormatError(f"{where}.{key} must be a hex string")
    try:
        raw = bytes.fromhex(value.removeprefix("0x"))
    except ValueError:
        raise KeystoreFormatError(f"{where}.{key} is not hex") from None
    if size is not None and len(raw) != size:
        raise KeystoreFormatError(f"{where}.{key} must be {size} bytes, not {len(raw)}")
    return raw


def _int(section: Mapping[str, Any], key: str, where: str, low: int, high: int) -> int:
    value = section.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise KeystoreFormatError(f"{where}.{key} must be an integer")
    if not low <= value <= high:
        raise KeystoreFormatError(f"{where}.{key} = {value} is outside {low}..{high}")
    return value


def _derive(crypto: Mapping[str, Any], passphrase: bytes) -> bytes:
    """The 32-byte derived key, after checking the KDF's parameters against the bounds."""
    params = crypto["kdfparams"]
    where = "crypto.kdfparams"
    if not isinstance(params, dict):
        raise KeystoreFormatError(f"{where} must be an object")
    # dklen beyond 32 derives more than the format uses; only the first 32 bytes count.
    dklen = _int(params, "dklen", where, _DKLEN, 64)
    salt = _hex(params, "salt", where)
    if not 1 <= len(salt) <= _MAX_SALT:
        raise KeystoreFormatError(f"{where}.salt must be 1 to {_MAX_SALT} bytes")
    if crypto["kdf"] == "scrypt":
        n = _int(params, "n", where, 2, _MAX_SCRYPT_N)
        if n & (n - 1):
            raise KeystoreFormatError(f"{where}.n = {n} is not a power of 2")
        r = _int(params, "r", where, 1, _MAX_SCRYPT_R)
        p = _int(params, "p", where, 1, _MAX_SCRYPT_P)
        if 128 * n * r > MAX_SCRYPT_MEMORY:
            raise KeystoreFormatError(
                f"{where}: scrypt n = {n}, r = {r} needs {128 * n * r >> 20} MiB of memory;"
                f" at most {MAX_SCRYPT_MEMORY >> 20} MiB is allowed"
            )
        if n * r * p > MAX_SCRYPT_WORK:
            raise KeystoreFormatError(
                f"{where}: scrypt work n * r * p = {n * r * p} exceeds {MAX_SCRYPT_WORK}"
            )
        from Crypto.Protocol.KDF import scrypt

        return bytes(scrypt(passphrase, salt, dklen, N=n, r=r, p=p))[:_DKLEN]  # type: ignore[arg-type]
    if params.get("prf") != "hmac-sha256":
        raise KeystoreFormatError(f"{where}.prf {params.get('prf')!r} is not hmac-sha256")
    c = _int(params, "c", where, 1, MAX_PBKDF2_ITERATIONS)
    return hashlib.pbkdf2_hmac("sha256", passphrase, salt, c, dklen)[:_DKLEN]


def _aes_128_ctr(key: bytes, iv: bytes, data: bytes) -> bytes:
    from Crypto.Cipher import AES

    # The whole 16-byte iv is the initial counter block (big-endian), as geth does; CTR is
    # its own inverse, so the same call encrypts and decrypts.
    return AES.new(key, AES.MODE_CTR, nonce=b"", initial_value=iv).encrypt(data)


def decrypt(document: Mapping[str, Any], passphrase: bytes) -> bytes:
    """The private key inside a keystore that :func:`parse` accepted.

    Raises:
        WrongPassphrase: the MAC does not match.
        KeystoreFormatError: a field is missing, ill-typed or out of bounds (named).
    """
    crypto = document["crypto"]
    ciphertext = _hex(crypto, "ciphertext", "crypto")
    # Some early tools dropped a key's leading zero bytes (geth reads them; its test files
    # have 30- and 31-byte keys): the key is the big-endian number, padded back to 32 bytes.
    if not 1 <= len(ciphertext) <= 32:
        raise KeystoreFormatError(f"crypto.ciphertext must be 1 to 32 bytes, not {len(ciphertext)}")
    mac = _hex(crypto, "mac", "crypto", 32)
    params = crypto.get("cipherparams")
    if not isinstance(params, dict):
        raise KeystoreFormatError("missing crypto.cipherparams")
    iv = _hex(params, "iv", "crypto.cipherparams", 16)
    derived = _derive(crypto, passphrase)
    if not hmac.compare_digest(keccak(derived[16:32] + ciphertext), mac):
        raise WrongPassphrase("wrong passphrase")
    return _aes_128_ctr(derived[:16], iv, ciphertext).rjust(32, b"\0")


def encrypt(
    private_key: bytes,
    passphrase: bytes,
    address: str,
    *,
    kdf: str = "scrypt",
    iterations: int | None = None,
) -> dict[str, Any]:
    """A new V3 keystore document holding ``private_key`` (32 bytes).

    Args:
        address: the key's address (0x optional); written as 40 lower-case hex digits, as geth.
        kdf: "scrypt" (geth's standard cost) or "pbkdf2" (hmac-sha256).
        iterations: scrypt n (a power of 2) / pbkdf2 c; the defaults otherwise.

    Raises:
        WalletError: an unsupported kdf or a cost outside the bounds that :func:`decrypt`
            accepts (so every keystore written here can be read back).
    """
    if len(private_key) != 32:
        raise WalletError("a private key is 32 bytes")
    salt = os.urandom(32)
    params: dict[str, Any]
    if kdf == "scrypt":
        params = {"dklen": _DKLEN, "n": iterations or SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P}
    elif kdf == "pbkdf2":
        params = {"c": iterations or PBKDF2_ITERATIONS, "dklen": _DKLEN, "prf": "hmac-sha256"}
    else:
        raise WalletError(f"unsupported kdf {kdf!r}: use scrypt or pbkdf2")
    params["salt"] = salt.hex()
    crypto: dict[str, Any] = {"kdf": kdf, "kdfparams": params}
    try:
        derived = _derive(crypto, passphrase)
    except KeystoreFormatError as exc:
        raise WalletError(f"cannot write this keystore: {exc}") from None
    iv = os.urandom(16)
    ciphertext = _aes_128_ctr(derived[:16], iv, private_key)
    return {
        "address": address.lower().removeprefix("0x"),
        "crypto": {
            "cipher": "aes-128-ctr",
            "cipherparams": {"iv": iv.hex()},
            "ciphertext": ciphertext.hex(),
            "kdf": kdf,
            "kdfparams": params,
            "mac": keccak(derived[16:32] + ciphertext).hex(),
        },
        "id": str(uuid.uuid4()),
        "version": 3,
    }
