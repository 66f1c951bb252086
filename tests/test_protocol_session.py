"""The worker's side of a session, sans I/O (dcp_protocol/session.py): frames in, events and
frames out, no socket. The end-to-end tests run the same core over a real websocket."""

from __future__ import annotations

from functools import partial

import pytest

import dcp_protocol as p
from dcp_keys.identity import Identity
from dcp_protocol import signing
from dcp_protocol.session import (
    Failed,
    Opened,
    Replied,
    SessionState,
    Unsolicited,
    WorkerSession,
)

IDENTITY = Identity.from_private_key(bytes(range(1, 33)))
CHALLENGE = "ab" * 32
JOIN_HASH = "cd" * 32


def _session() -> WorkerSession:
    return WorkerSession(
        IDENTITY.address,
        IDENTITY.sign,
        IDENTITY.address,
        agent="test/1",
        groups={"lab": JOIN_HASH},
    )


def _welcome(**fields: object) -> bytes:
    values: dict[str, object] = dict(
        re=0,
        session="s1",
        address=IDENTITY.address,
        heartbeat_interval=3.0,
        lease_timeout=15.0,
        max_result_bytes=1000,
        max_frame_bytes=10_000,
    )
    values.update(fields)
    return p.encode(p.Welcome(**values))  # type: ignore[arg-type]


def _opened() -> WorkerSession:
    session = _session()
    session.receive(p.encode(p.Hello(protocol=p.PROTOCOL_VERSION, challenge=CHALLENGE, server="s")))
    session.data_to_send()
    assert isinstance(session.receive(_welcome())[0], Opened)
    return session


def test_hello_is_answered_with_a_signed_auth_proving_the_groups() -> None:
    session = _session()
    hello = p.Hello(protocol=p.PROTOCOL_VERSION, challenge=CHALLENGE, server="sched")
    assert session.receive(p.encode(hello)) == []
    (frame,) = session.data_to_send()
    auth = p.decode(frame, p.SCHEDULER_MESSAGES)
    assert isinstance(auth, p.Auth) and auth.agent == "test/1"
    payload = signing.session_payload(CHALLENGE, "sched", IDENTITY.address)
    assert signing.verify(payload, auth.signature, IDENTITY.address)
    (proof,) = auth.groups
    assert proof == p.GroupProof("lab", p.policy.group_proof(JOIN_HASH, CHALLENGE, auth.address))
    assert session.data_to_send() == []  # sent once
    assert session.state is SessionState.AWAITING_WELCOME


def test_welcome_opens_the_session_with_its_frame_limit() -> None:
    session = _opened()
    assert session.state is SessionState.OPEN and session.max_frame_bytes == 10_000


def test_replies_are_matched_to_their_requests_by_id() -> None:
    session = _opened()
    first, _ = session.request(partial(p.Heartbeat, leases=()))
    second, _ = session.request(partial(p.Heartbeat, leases=()))
    assert (first, second) == (1, 2)
    late = p.HeartbeatAck(re=second, deadline=1.0)
    assert session.receive(p.encode(late)) == [Replied(second, late)]
    assert session.receive(p.encode(late)) == [Unsolicited(late)]  # answered already
    stray = p.Error(re=None, code="internal", message="x")
    assert session.receive(p.encode(stray)) == [Unsolicited(stray)]
    lost = session.connection_lost()
    assert lost.pending == (first,)  # the one never answered


def test_a_request_above_the_announced_limit_is_answered_locally_and_not_sent() -> None:
    session = _opened()
    rid, answer = session.request(
        partial(
            p.SliceFailed, job="j", slice=0, token="00" * 16, code="wasm_trap", message="x" * 20_000
        )
    )
    assert isinstance(answer, p.Error) and answer.code == "frame_too_large" and answer.re == rid
    reply = p.Ack(re=rid, status="ok")
    assert session.receive(p.encode(reply)) == [Unsolicited(reply)]  # it was never pending


@pytest.mark.parametrize(
    ("frame", "code", "fatal"),
    [
        (
            p.encode(
                p.Welcome(
                    re=0,
                    session="s",
                    address=IDENTITY.address,
                    heartbeat_interval=1.0,
                    lease_timeout=1.0,
                    max_result_bytes=10,
                )
            ),
            "unexpected_message",
            False,
        ),
        (p.encode(p.Error(re=None, code="auth_failed", message="no")), "unexpected_message", False),
        (b"{nope", "malformed_frame", False),
        (b"[" * 5000 + b"]" * 5000, "malformed_frame", False),
    ],
)
def test_anything_but_hello_first_ends_the_session(frame: bytes, code: str, fatal: bool) -> None:
    session = _session()
    (failed,) = session.receive(frame)
    assert isinstance(failed, Failed) and (failed.code, failed.fatal) == (code, fatal)
    assert session.state is SessionState.CLOSED
    assert session.data_to_send() == [] and session.receive(frame) == []


@pytest.mark.parametrize(
    ("code", "fatal"), [("auth_failed", True), ("blocked", True), ("internal", False)]
)
def test_an_error_instead_of_welcome_is_a_refusal_fatal_only_for_auth_and_blocks(
    code: str, fatal: bool
) -> None:
    session = _session()
    session.receive(p.encode(p.Hello(protocol=p.PROTOCOL_VERSION, challenge=CHALLENGE)))
    (failed,) = session.receive(p.encode(p.Error(re=0, code=code, message="why")))
    assert isinstance(failed, Failed) and (failed.code, failed.fatal) == (code, fatal)
    assert "refused" in failed.reason and "why" in failed.reason


def test_a_bad_frame_on_an_open_session_fails_its_pending_requests() -> None:
    session = _opened()
    rid, _ = session.request(partial(p.Fetch, max_slices=1))
    (failed,) = session.receive(b'{"v": 1, "type": "work", "re": -1}')
    assert isinstance(failed, Failed) and failed.code == "invalid_message"
    assert failed.pending == (rid,)
    with pytest.raises(RuntimeError):
        session.request(partial(p.Fetch, max_slices=1))


def test_frames_above_the_limit_are_refused_once_welcome_set_it() -> None:
    session = _opened()
    big = p.encode(p.Error(re=None, code="internal", message="x" * 20_000))
    (failed,) = session.receive(big)
    assert isinstance(failed, Failed) and failed.code == "frame_too_large"


# ------------------------------------------------------------------ protocol version 2


@pytest.mark.parametrize(
    ("announced", "allowed", "binary"),
    [(p.BINARY_VERSION, True, True), (p.PROTOCOL_VERSION, True, False), (2, False, False)],
)
def test_frames_go_as_messagepack_only_where_hello_announces_version_2(
    announced: int, allowed: bool, binary: bool
) -> None:
    """A scheduler that speaks only version 1 announces 1, and gets JSON; one that speaks 2
    gets MessagePack from auth on, unless the worker was told to keep to JSON."""
    session = WorkerSession(IDENTITY.address, IDENTITY.sign, IDENTITY.address, binary=allowed)
    session.receive(p.encode(p.Hello(protocol=announced, challenge=CHALLENGE)))
    assert session.binary is binary
    (frame,) = session.data_to_send()
    message, was_binary = p.decode_frame(frame, p.SCHEDULER_MESSAGES)
    assert isinstance(message, p.Auth) and was_binary is binary
    welcome = p.decode(_welcome(), p.SCHEDULER_MESSAGES)
    # The scheduler's frames are read in either form, whatever this side sends.
    answer = p.encode_binary(welcome) if binary else p.encode(welcome)
    assert isinstance(session.receive(answer)[0], Opened)
    rid, data = session.request(partial(p.Fetch, max_slices=1))
    assert isinstance(data, bytes)
    assert p.decode_frame(data, p.SCHEDULER_MESSAGES) == (p.Fetch(id=rid, max_slices=1), binary)
    reply = p.Work(re=rid)
    assert session.receive(p.encode_binary(reply)) == [Replied(rid, reply)]
    assert session.receive(p.encode(p.Work(re=rid))) == [Unsolicited(reply)]
