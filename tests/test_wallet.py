"""Keystores: the published Web3 Secret Storage vectors, interop, the CLI, refusals."""

from __future__ import annotations

import hashlib
import json
import stat
import subprocess
from pathlib import Path

import pytest
from Crypto.Cipher import AES
from Crypto.Hash import keccak

from dcp_keys import identity as idmod

from .conftest import command

# From the Web3 Secret Storage Definition (ethereum.org), password "testpassword".
VECTOR_KEY = "7a28b5ba57c53603b0b07b56bba752f7784bf506fa95edc395f5cf6c7514fe9d"
PBKDF2_VECTOR = {
    "crypto": {
        "cipher": "aes-128-ctr",
        "cipherparams": {"iv": "6087dab2f9fdbbfaddc31a909735c1e6"},
        "ciphertext": "5318b4d5bcd28de64ee5559e671353e16f075ecae9f99c7a79a38af5f869aa46",
        "kdf": "pbkdf2",
        "kdfparams": {
            "c": 262144,
            "dklen": 32,
            "prf": "hmac-sha256",
            "salt": "ae3cd4e7013836a3df6bd7241b12db061dbe2c6785853cce422d148a624ce0bd",
        },
        "mac": "517ead924a9d0dc3124507e3393d175ce3ff7c1e96529c6c555ce9e51205e9b2",
    },
    "id": "3198bc9c-6672-5ab3-d995-4942343ae5b6",
    "version": 3,
}
SCRYPT_VECTOR = {
    "crypto": {
        "cipher": "aes-128-ctr",
        "cipherparams": {"iv": "83dbcc02d8ccb40e466191a123791e0e"},
        "ciphertext": "d172bf743a674da9cdad04534d56926ef8358534d458fffccd4e6ad2fbde479c",
        "kdf": "scrypt",
        "kdfparams": {
            "dklen": 32,
            "n": 262144,
            "r": 1,
            "p": 8,
            "salt": "ab0c7876052600dd703518d6fc3fe8984592145b591fc8fb5c6d43190334ba19",
        },
        "mac": "2103ac29920d71da29f15d75b4a16dbe95cfd7ff8faea1056c33131d846e3097",
    },
    "id": "3198bc9c-6672-5ab3-d995-4942343ae5b6",
    "version": 3,
}


@pytest.mark.parametrize("vector", [PBKDF2_VECTOR, SCRYPT_VECTOR], ids=["pbkdf2", "scrypt"])
def test_published_vectors_load(tmp_path: Path, vector: dict[str, object]) -> None:
    path = tmp_path / "vector.json"
    path.write_text(json.dumps(vector))
    identity = idmod.load_keystore(path, b"testpassword")
    assert identity.private_key.hex() == VECTOR_KEY
    assert identity.address == "0x008AeEda4D805471dF9b2A5B0f38A0C3bCBA786b"


@pytest.mark.parametrize("vector", [PBKDF2_VECTOR, SCRYPT_VECTOR], ids=["pbkdf2", "scrypt"])
def test_published_vectors_wrong_passphrase(tmp_path: Path, vector: dict[str, object]) -> None:
    path = tmp_path / "vector.json"
    path.write_text(json.dumps(vector))
    with pytest.raises(idmod.WrongPassphrase, match="wrong passphrase"):
        idmod.load_keystore(path, b"testpassword!")


def _independent_decrypt(document: dict, passphrase: bytes) -> bytes:
    """Web3 Secret Storage, decrypted straight from the spec (not through eth-keyfile)."""
    crypto = document["crypto"]
    params = crypto["kdfparams"]
    salt = bytes.fromhex(params["salt"])
    if crypto["kdf"] == "scrypt":
        dk = hashlib.scrypt(
            passphrase,
            salt=salt,
            n=params["n"],
            r=params["r"],
            p=params["p"],
            dklen=params["dklen"],
            maxmem=2**30,
        )
    else:
        dk = hashlib.pbkdf2_hmac("sha256", passphrase, salt, params["c"], params["dklen"])
    ciphertext = bytes.fromhex(crypto["ciphertext"])
    mac = keccak.new(digest_bits=256, data=dk[16:32] + ciphertext).hexdigest()
    assert mac == crypto["mac"]
    iv = int.from_bytes(bytes.fromhex(crypto["cipherparams"]["iv"]), "big")
    return AES.new(dk[:16], AES.MODE_CTR, nonce=b"", initial_value=iv).decrypt(ciphertext)


@pytest.mark.parametrize("kdf", ["scrypt", "pbkdf2"])
def test_our_keystores_read_by_an_independent_implementation(tmp_path: Path, kdf: str) -> None:
    path = tmp_path / "k.json"
    identity = idmod.create_keystore(path, b"pw", kdf=kdf, iterations=1024)
    document = json.loads(path.read_text())
    assert document["version"] == 3
    assert document["crypto"]["kdf"] == kdf
    assert _independent_decrypt(document, b"pw") == identity.private_key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_default_keystore_is_scrypt_with_standard_cost(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    idmod.create_keystore(path, b"pw")
    params = json.loads(path.read_text())["crypto"]["kdfparams"]
    assert params["n"] == 262144


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    idmod.create_keystore(path, b"pw", iterations=1024)
    before = path.read_bytes()
    with pytest.raises(idmod.KeystoreExists):
        idmod.create_keystore(path, b"pw", iterations=1024)
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    "content,match",
    [
        ("not json", "not a JSON keystore"),
        ("[]", "not a JSON keystore"),
        ('{"version": 1}', "only version 3"),
        ('{"version": 3}', "missing 'crypto'"),
        ('{"version": 3, "crypto": {"cipher": "aes-128-ctr"}}', "missing crypto.ciphertext"),
    ],
)
def test_malformed_keystores_are_named(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(idmod.KeystoreFormatError, match=match):
        idmod.load_keystore(path, b"pw")


def test_identity_repr_hides_the_key() -> None:
    identity = idmod.Identity.from_private_key(bytes.fromhex(VECTOR_KEY))
    # Only the address: a dataclass's own repr would show the key's bytes (not its hex).
    assert repr(identity) == str(identity) == f"Identity(address={identity.address!r})"
    assert repr(identity.private_key) not in repr(identity)


def _wallet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([command("dcp-wallet"), *args], capture_output=True, text=True)


def test_cli_create_show_and_import(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("secret\n")
    out = tmp_path / "w.json"
    created = _wallet(
        "create", "--out", str(out), "--passphrase-file", str(pw), "--kdf-iterations", "1024"
    )
    assert created.returncode == 0, created.stderr
    address = created.stdout.strip()
    assert address.startswith("0x") and len(address) == 42 and address != address.lower()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert _wallet("show", str(out)).stdout.strip() == address
    assert _wallet("show", str(out), "--passphrase-file", str(pw)).stdout.strip() == address

    key = tmp_path / "key"
    key.write_text("0x" + VECTOR_KEY + "\n")
    imported = _wallet(
        "import",
        "--out",
        str(tmp_path / "i.json"),
        "--key-file",
        str(key),
        "--passphrase-file",
        str(pw),
        "--kdf",
        "pbkdf2",
        "--kdf-iterations",
        "1024",
    )
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == "0x008AeEda4D805471dF9b2A5B0f38A0C3bCBA786b"


def test_cli_wrong_passphrase_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "vector.json"
    path.write_text(json.dumps(PBKDF2_VECTOR))
    pw = tmp_path / "pw"
    pw.write_text("wrong\n")
    shown = _wallet("show", str(path), "--passphrase-file", str(pw))
    assert shown.returncode == 2
    assert "wrong passphrase" in shown.stderr
    assert "Traceback" not in shown.stderr


def test_cli_refuses_overwrite(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("secret\n")
    out = tmp_path / "w.json"
    out.write_text("precious")
    result = _wallet("create", "--out", str(out), "--passphrase-file", str(pw))
    assert result.returncode == 2
    assert "refusing to overwrite" in result.stderr
    assert out.read_text() == "precious"
