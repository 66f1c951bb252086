"""Who a console visitor is, from their cookies: which jobs they may read and whether they are
the operator. No I/O but the store's read-token lookups and the operator token file.

The rules are the compute API's (scheduler/api.py), not wider ones:

- anonymous: the summary the API lists anonymously of the active public jobs (``market``),
  nothing that names a job or its owner, no job page;
- a read token (``dcp-rt-...``, issued by ``dcp-compute token JOB``): that job, checked by
  :func:`scheduler.api.read_token_job`, as the API checks its ``Authorization: Bearer``;
- the operator token (``dcp-op-...``, written at ``serve`` start beside the database, 0600):
  every job, the workers and the ledger.
"""

from __future__ import annotations

import hmac
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from dcp_protocol import DcpError

from ..api import Refused, read_token_job
from ..store import Store

__all__ = [
    "MAX_TOKENS",
    "OPERATOR_PREFIX",
    "READ_COOKIE",
    "OPERATOR_COOKIE",
    "SignInRefused",
    "Visitor",
    "load_operator_token",
    "operator_token_path",
    "sign_in",
]

READ_COOKIE = "dcp_console_read"
OPERATOR_COOKIE = "dcp_console_operator"
OPERATOR_PREFIX = "dcp-op-"
#: Read tokens one browser may hold at once (the cookie stays well under 4 KiB).
MAX_TOKENS = 20
_TOKEN = re.compile(r"dcp-(rt|op)-[A-Za-z0-9_-]{16,100}")


class SignInRefused(DcpError):
    """A sign-in refused; ``code`` names why."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Visitor:
    """One request's visitor: the live read tokens they hold (job id -> token) and whether
    they hold the operator token."""

    tokens: dict[str, str] = field(default_factory=dict)
    operator: bool = False

    @property
    def signed_in(self) -> bool:
        return self.operator or bool(self.tokens)

    def may_read(self, job_id: str) -> bool:
        return self.operator or job_id in self.tokens

    @classmethod
    def from_cookies(
        cls, store: Store, cookies: dict[str, str], operator_token: str, now: float
    ) -> Visitor:
        """The visitor these cookies make: each read token is checked again now (a revoked or
        expired one reads nothing), the operator token compared in constant time."""
        tokens: dict[str, str] = {}
        for token in cookies.get(READ_COOKIE, "").split(".")[:MAX_TOKENS]:
            if not _TOKEN.fullmatch(token):
                continue
            try:
                tokens[read_token_job(store, token, now)] = token
            except Refused:
                continue
        held = cookies.get(OPERATOR_COOKIE, "")
        operator = bool(held) and hmac.compare_digest(held.encode(), operator_token.encode())
        return cls(tokens, operator)


def sign_in(
    store: Store, visitor: Visitor, pasted: str, operator_token: str, now: float
) -> tuple[str, str]:
    """What a pasted token signs in: ``("read", job id)`` or ``("operator", "")``.

    Raises:
        SignInRefused: the token is malformed, unknown, revoked or expired (named).
    """
    token = pasted.strip()
    if not _TOKEN.fullmatch(token):
        raise SignInRefused(
            400,
            "not_a_token",
            "paste a read token (dcp-rt-..., from dcp-compute token JOB) or the operator "
            "token (dcp-op-...)",
        )
    if token.startswith(OPERATOR_PREFIX):
        if not hmac.compare_digest(token.encode(), operator_token.encode()):
            raise SignInRefused(401, "operator_token_invalid", "that is not the operator token")
        return "operator", ""
    if len(visitor.tokens) >= MAX_TOKENS:
        raise SignInRefused(
            400, "too_many_tokens", f"this browser holds {MAX_TOKENS} read tokens; sign out first"
        )
    try:
        return "read", read_token_job(store, token, now)
    except Refused as exc:
        raise SignInRefused(exc.status, exc.code.value, exc.message) from None


def operator_token_path(db: Path) -> Path:
    """Where ``serve`` keeps the console's operator token: beside its database."""
    return db.with_name(db.name + ".console-token")


def load_operator_token(path: Path) -> str:
    """The operator token in ``path``, made (mode 0600) if the file is missing or empty."""
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        token = ""
    if token.startswith(OPERATOR_PREFIX) and _TOKEN.fullmatch(token):
        os.chmod(path, 0o600)
        return token
    token = OPERATOR_PREFIX + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    os.chmod(path, 0o600)
    return token
