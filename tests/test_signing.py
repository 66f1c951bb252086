"""Canonical, domain-separated signatures."""

from __future__ import annotations

import os

from dcp_protocol import signing

KEY = bytes.fromhex("7a28b5ba57c53603b0b07b56bba752f7784bf506fa95edc395f5cf6c7514fe9d")
ADDR = signing.address_of(KEY)
PAY = "0x" + "11" * 20


def test_address_is_eip55() -> None:
    assert ADDR == "0x008AeEda4D805471dF9b2A5B0f38A0C3bCBA786b"
    assert signing.checksum(ADDR.lower()) == ADDR


def test_result_signature_verifies_and_binds_every_field() -> None:
    payload = signing.result_payload("job", 3, "token", b"result", PAY)
    sig = signing.sign(KEY, payload)
    assert len(sig) == 130
    assert signing.verify(payload, sig, ADDR)
    for other in (
        signing.result_payload("job2", 3, "token", b"result", PAY),
        signing.result_payload("job", 4, "token", b"result", PAY),
        signing.result_payload("job", 3, "token2", b"result", PAY),
        signing.result_payload("job", 3, "token", b"result!", PAY),
        signing.result_payload("job", 3, "token", b"result", "0x" + "22" * 20),
    ):
        assert not signing.verify(other, sig, ADDR)


def test_domains_are_separated() -> None:
    session = signing.session_payload("ab" * 32, "s", ADDR)
    sig = signing.sign(KEY, session)
    assert signing.verify(session, sig, ADDR)
    assert not signing.verify(signing.deploy_payload(session), sig, ADDR)
    # Field boundaries are length-prefixed: moving bytes between fields changes the payload.
    assert signing.result_payload("ab", 1, "c", b"", PAY) != signing.result_payload(
        "a", 1, "bc", b"", PAY
    )


def test_bad_signatures_are_refused_not_raised() -> None:
    payload = signing.deploy_payload(b"x")
    assert signing.recover(payload, "zz") is None
    assert signing.recover(payload, "00" * 65) is None
    assert not signing.verify(payload, os.urandom(65).hex(), ADDR)
