"""Who a web console visitor is (scheduler/web/access.py), over a real SQLite store: read
tokens are the compute API's, checked again on every request; the operator token's file."""

from __future__ import annotations

import hashlib
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

import dcp_protocol as p
from scheduler.store import NewJob
from scheduler.store.sqlite import SQLiteStore
from scheduler.web.access import (
    READ_COOKIE,
    SignInRefused,
    Visitor,
    load_operator_token,
    sign_in,
)

from .conftest import EXAMPLES

OPERATOR = "dcp-op-" + "o" * 43


def _job(store: SQLiteStore, name: str) -> str:
    module = (EXAMPLES / "echo" / "echo.wasm").read_bytes()
    return store.create_job(
        NewJob(
            owner="0x" + "1" * 40,
            name=name,
            runtime="wasm",
            module=module,
            module_sha256=hashlib.sha256(module).hexdigest(),
            argv=(),
            limits=p.Limits(),
            offer_micro=0,
            data=(b"x",),
            payload_sha256=secrets.token_hex(32),
        ),
        0.0,
    )


def _token(store: SQLiteStore, job: str, name: str, expires: float = 100.0) -> tuple[str, str]:
    token = "dcp-rt-" + name * 43
    record = store.create_read_token(job, hashlib.sha256(token.encode()).hexdigest(), 0.0, expires)
    return token, record.id


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    opened = SQLiteStore(tmp_path / "s.db")
    yield opened
    opened.close()


def test_cookies_read_only_the_jobs_of_live_tokens(store: SQLiteStore) -> None:
    a, b, c = _job(store, "a"), _job(store, "b"), _job(store, "c")
    live, _ = _token(store, a, "l")
    revoked, revoked_id = _token(store, b, "r")
    expired, _ = _token(store, c, "e", expires=5.0)
    store.revoke_read_token(b, revoked_id, 1.0)
    cookie = ".".join([live, revoked, expired, "not-a-token", "dcp-rt-" + "u" * 43])
    visitor = Visitor.from_cookies(store, {READ_COOKIE: cookie}, OPERATOR, now=10.0)
    assert visitor.tokens == {a: live} and not visitor.operator
    assert visitor.may_read(a) and not visitor.may_read(b) and not visitor.may_read(c)
    assert Visitor.from_cookies(store, {}, OPERATOR, 10.0) == Visitor()
    later = Visitor.from_cookies(store, {READ_COOKIE: live}, OPERATOR, now=100.0)
    assert later.tokens == {}  # expired since


def test_the_operator_cookie_must_be_the_operator_token(store: SQLiteStore) -> None:
    assert Visitor.from_cookies(store, {"dcp_console_operator": OPERATOR}, OPERATOR, 0).operator
    wrong = {"dcp_console_operator": "dcp-op-" + "x" * 43}
    assert not Visitor.from_cookies(store, wrong, OPERATOR, 0).operator
    assert not Visitor.from_cookies(store, {"dcp_console_operator": ""}, OPERATOR, 0).operator


@pytest.mark.parametrize(
    ("pasted", "code"),
    [
        ("", "not_a_token"),
        ("hunter2", "not_a_token"),
        ("dcp-rt-" + "u" * 43, "read_token_invalid"),
        ("dcp-rt-" + "r" * 43, "read_token_revoked"),
        ("dcp-rt-" + "e" * 43, "read_token_expired"),
        ("dcp-op-" + "x" * 43, "operator_token_invalid"),
    ],
)
def test_sign_in_refusals_name_their_reason(store: SQLiteStore, pasted: str, code: str) -> None:
    b, c = _job(store, "b"), _job(store, "c")
    _, revoked_id = _token(store, b, "r")
    _token(store, c, "e", expires=5.0)
    store.revoke_read_token(b, revoked_id, 1.0)
    with pytest.raises(SignInRefused) as info:
        sign_in(store, Visitor(), pasted, OPERATOR, now=10.0)
    assert info.value.code == code


def test_sign_in_tells_what_a_token_opens(store: SQLiteStore) -> None:
    a = _job(store, "a")
    token, _ = _token(store, a, "l")
    assert sign_in(store, Visitor(), f"  {token}\n", OPERATOR, 10.0) == ("read", a)
    assert sign_in(store, Visitor(), OPERATOR, OPERATOR, 10.0) == ("operator", "")


def test_the_operator_token_file_is_private_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "s.db.console-token"
    token = load_operator_token(path)
    assert token.startswith("dcp-op-") and len(token) > 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_operator_token(path) == token  # a restart keeps it
    path.chmod(0o644)
    assert load_operator_token(path) == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text("")
    assert load_operator_token(path) not in ("", token)  # an emptied file gets a new one
