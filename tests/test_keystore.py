"""dcp_keys.keystore: geth's test keystores, interop with eth-keyfile both ways (in a
subprocess: it imports py_ecc, which raises the recursion limit), and hostile parameters
refused before any key derivation."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from dcp_keys import identity as idmod
from dcp_keys import keystore

# go-ethereum accounts/keystore/testdata: keystore/aaa and keystore/zzz (passphrase "foobar"),
# very-light-scrypt.json (passphrase ""), and the short keys of v3_test_vector.json ("foo").
GETH_AAA = (
    '{"address":"f466859ead1932d743d622cb74fc058882e8648a","crypto":{"cipher":"aes-128-ctr",'
    '"ciphertext":"cb664472deacb41a2e995fa7f96fe29ce744471deb8d146a0e43c7898c9ddd4d",'
    '"cipherparams":{"iv":"dfd9ee70812add5f4b8f89d0811c9158"},"kdf":"scrypt","kdfparams":'
    '{"dklen":32,"n":8,"p":16,"r":8,"salt":"0d6769bf016d45c479213990d6a08d938469c4adad8a02ce507b4a'
    '4e7b7739f1"},"mac":"bac9af994b15a45dd39669fc66f9aa8a3b9dd8c22cb16e4d8d7ea089d0f1a1a9"},'
    '"id":"472e8b3d-afb6-45b5-8111-72c89895099a","version":3}'
)
GETH_ZZZ = (
    '{"address":"289d485d9771714cce91d3393d764e1311907acc","crypto":{"cipher":"aes-128-ctr",'
    '"ciphertext":"faf32ca89d286b107f5e6d842802e05263c49b78d46eac74e6109e9a963378ab",'
    '"cipherparams":{"iv":"558833eec4a665a8c55608d7d503407d"},"kdf":"scrypt","kdfparams":'
    '{"dklen":32,"n":8,"p":16,"r":8,"salt":"d571fff447ffb24314f9513f5160246f09997b857ac71348b73e78'
    '5aab40dc04"},"mac":"21edb85ff7d0dab1767b9bf498f2c3cb7be7609490756bd32300bb213b59effe"},'
    '"id":"3279afcf-55ba-43ff-8997-02dcc46a6525","version":3}'
)
GETH_VERY_LIGHT = (
    '{"address":"45dea0fb0bba44f4fcf290bba71fd57d7117cbb8","crypto":{"cipher":"aes-128-ctr",'
    '"ciphertext":"b87781948a1befd247bff51ef4063f716cf6c2d3481163e9a8f42e1f9bb74145",'
    '"cipherparams":{"iv":"dc4926b48a105133d2f16b96833abf1e"},"kdf":"scrypt","kdfparams":'
    '{"dklen":32,"n":2,"p":1,"r":8,"salt":"004244bbdc51cadda545b1cfa43cff9ed2ae88e08c61f1479dbb454'
    '10722f8f0"},"mac":"39990c1684557447940d4c69e06b1b82b2aceacb43f284df65c956daf3046b85"},'
    '"id":"ce541d8d-c79b-40f8-9f8c-20f59616faba","version":3}'
)


def _short_key(iv: str, ciphertext: str, salt: str, mac: str) -> str:
    crypto = {
        "cipher": "aes-128-ctr",
        "cipherparams": {"iv": iv},
        "ciphertext": ciphertext,
        "kdf": "scrypt",
        "kdfparams": {"dklen": 32, "n": 2, "r": 8, "p": 1, "salt": salt},
        "mac": mac,
    }
    return json.dumps({"crypto": crypto, "version": 3})


GETH_31_BYTE_KEY = _short_key(
    "e0c41130a323adc1446fc82f724bca2f",
    "9517cd5bdbe69076f9bf5057248c6c050141e970efa36ce53692d5d59a3984",
    "711f816911c92d649fb4c84b047915679933555030b3552c1212609b38208c63",
    "d5e116151c6aa71470e67a7d42c9620c75c4d23229847dcc127794f0732b0db5",
)
GETH_30_BYTE_KEY = _short_key(
    "3ca92af36ad7c2cd92454c59cea5ef00",
    "108b7d34f3442fc26ab1ab90ca91476ba6bfa8c00975a49ef9051dc675aa",
    "d0769e608fb86cda848065642a9c6fa046845c928175662b8e356c77f914cd3b",
    "75d0e6759f7b3cefa319c3be41680ab6beea7d8328653474bd06706d4cc67420",
)


@pytest.mark.parametrize(
    ("text", "passphrase", "expected"),
    [
        (GETH_AAA, b"foobar", "0xf466859ead1932d743d622cb74fc058882e8648a"),
        (GETH_ZZZ, b"foobar", "0x289d485d9771714cce91d3393d764e1311907acc"),
        (GETH_VERY_LIGHT, b"", "0x45dea0fb0bba44f4fcf290bba71fd57d7117cbb8"),
        (
            GETH_31_BYTE_KEY,
            b"foo",
            "00fa7b3db73dc7dfdf8c5fbdb796d741e4488628c41fc4febd9160a866ba0f35",
        ),
        (
            GETH_30_BYTE_KEY,
            b"foo",
            "000081c29e8142bb6a81bef5a92bda7a8328a5c85bb2f9542e76f9b0f94fc018",
        ),
    ],
    ids=["aaa", "zzz", "very-light", "31-byte-key", "30-byte-key"],
)
def test_geth_keystores_open(tmp_path: Path, text: str, passphrase: bytes, expected: str) -> None:
    path = tmp_path / "geth.json"
    path.write_text(text)
    identity = idmod.load_keystore(path, passphrase)
    if expected.startswith("0x"):
        assert identity.address.lower() == expected
    else:
        assert identity.private_key.hex() == expected
    with pytest.raises(idmod.WrongPassphrase):
        idmod.load_keystore(path, passphrase + b"bad")


ETH_KEYFILE_DECODE = """
import json, sys
from eth_keyfile import decode_keyfile_json
print(decode_keyfile_json(json.load(open(sys.argv[1])), sys.argv[2].encode()).hex())
"""
ETH_KEYFILE_CREATE = """
import json, sys
from eth_keyfile import create_keyfile_json
doc = create_keyfile_json(bytes.fromhex(sys.argv[2]), b"pw", kdf=sys.argv[3], iterations=1024)
open(sys.argv[1], "w").write(json.dumps(doc))
"""


def _python(script: str, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.parametrize("kdf", ["scrypt", "pbkdf2"])
def test_eth_keyfile_reads_ours_and_we_read_its(tmp_path: Path, kdf: str) -> None:
    ours = tmp_path / "ours.json"
    identity = idmod.create_keystore(ours, b"pw", kdf=kdf, iterations=1024)
    assert _python(ETH_KEYFILE_DECODE, str(ours), "pw") == identity.private_key.hex()

    theirs = tmp_path / "theirs.json"
    key = "4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"
    _python(ETH_KEYFILE_CREATE, str(theirs), key, kdf)
    assert idmod.load_keystore(theirs, b"pw").private_key.hex() == key


def test_written_shape_is_geths(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    identity = idmod.create_keystore(path, b"pw", iterations=1024)
    document = json.loads(path.read_text())
    assert set(document) == {"address", "crypto", "id", "version"}
    assert document["address"] == identity.address.lower()[2:]
    crypto = document["crypto"]
    assert set(crypto) == {"cipher", "cipherparams", "ciphertext", "kdf", "kdfparams", "mac"}
    assert set(crypto["kdfparams"]) == {"dklen", "n", "r", "p", "salt"}
    assert (crypto["kdfparams"]["r"], crypto["kdfparams"]["p"]) == (8, 1)
    assert len(bytes.fromhex(crypto["cipherparams"]["iv"])) == 16


def _vector() -> dict[str, Any]:
    return json.loads(GETH_VERY_LIGHT)  # type: ignore[no-any-return]


def _with(path: str, value: object) -> dict[str, Any]:
    document = copy.deepcopy(_vector())
    *parents, last = path.split(".")
    section = document
    for key in parents:
        section = section[key]
    section[last] = value
    return document


@pytest.mark.parametrize(
    ("path", "value", "match"),
    [
        ("crypto.kdfparams.n", 1 << 30, r"kdfparams\.n = 1073741824 is outside 2\.\.1048576"),
        ("crypto.kdfparams.n", 1000, r"kdfparams\.n = 1000 is not a power of 2"),
        ("crypto.kdfparams.n", True, r"kdfparams\.n must be an integer"),
        ("crypto.kdfparams.r", 1 << 20, r"kdfparams\.r = 1048576 is outside 1\.\.32"),
        ("crypto.kdfparams.p", 1 << 20, r"kdfparams\.p = 1048576 is outside 1\.\.16"),
        ("crypto.kdfparams.dklen", 16, r"kdfparams\.dklen = 16 is outside 32\.\.64"),
        ("crypto.kdfparams.salt", "zz", r"kdfparams\.salt is not hex"),
        ("crypto.cipherparams.iv", "00", r"cipherparams\.iv must be 16 bytes"),
        ("crypto.mac", "00" * 31, r"crypto\.mac must be 32 bytes"),
        ("crypto.ciphertext", "00" * 33, r"crypto\.ciphertext must be 1 to 32 bytes"),
        ("crypto.cipherparams", None, r"missing crypto\.cipherparams"),
        ("crypto.kdfparams", [], r"crypto\.kdfparams must be an object"),
    ],
)
def test_hostile_parameters_are_refused_before_any_work(
    tmp_path: Path, path: str, value: object, match: str
) -> None:
    file = tmp_path / "hostile.json"
    file.write_text(json.dumps(_with(path, value)))
    started = time.monotonic()
    with pytest.raises(idmod.KeystoreFormatError, match=match):
        idmod.load_keystore(file, b"")
    assert time.monotonic() - started < 1.0  # refused, not derived


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"n": 1 << 20, "r": 32, "p": 1}, r"needs 4096 MiB of memory; at most 1024 MiB"),
        ({"n": 1 << 20, "r": 8, "p": 16}, r"scrypt work n \* r \* p = 134217728 exceeds"),
    ],
)
def test_scrypt_memory_and_work_are_bounded(
    tmp_path: Path, params: dict[str, int], match: str
) -> None:
    document = _vector()
    document["crypto"]["kdfparams"].update(params)
    file = tmp_path / "hostile.json"
    file.write_text(json.dumps(document))
    with pytest.raises(idmod.KeystoreFormatError, match=match):
        idmod.load_keystore(file, b"")


def test_pbkdf2_bounds(tmp_path: Path) -> None:
    document = keystore.encrypt(b"\1" * 32, b"pw", "0x" + "00" * 20, kdf="pbkdf2", iterations=2)
    document["crypto"]["kdfparams"]["c"] = 10**9
    file = tmp_path / "hostile.json"
    file.write_text(json.dumps(document))
    with pytest.raises(idmod.KeystoreFormatError, match=r"kdfparams\.c = 1000000000 is outside"):
        idmod.load_keystore(file, b"pw")
    document["crypto"]["kdfparams"].update(c=2, prf="hmac-sha512")
    file.write_text(json.dumps(document))
    with pytest.raises(idmod.KeystoreFormatError, match="is not hmac-sha256"):
        idmod.load_keystore(file, b"pw")


def test_a_tampered_file_is_a_wrong_passphrase_not_a_wrong_key(tmp_path: Path) -> None:
    document = _vector()
    ciphertext = bytearray.fromhex(document["crypto"]["ciphertext"])
    ciphertext[0] ^= 1
    document["crypto"]["ciphertext"] = ciphertext.hex()
    file = tmp_path / "tampered.json"
    file.write_text(json.dumps(document))
    with pytest.raises(idmod.WrongPassphrase):
        idmod.load_keystore(file, b"")


def test_we_never_write_what_we_would_refuse(tmp_path: Path) -> None:
    with pytest.raises(idmod.WalletError, match="is not a power of 2"):
        idmod.create_keystore(tmp_path / "a.json", b"pw", iterations=1000)
    with pytest.raises(idmod.WalletError, match="is outside"):
        idmod.create_keystore(tmp_path / "b.json", b"pw", iterations=1 << 21)
    assert not list(tmp_path.iterdir())
