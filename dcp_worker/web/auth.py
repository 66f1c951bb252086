"""Who may use the worker's page: whoever can read its token file.

The token (random, 256 bits) is written at each start to ``console.token`` beside the control
socket, mode 0640: the worker's user and group, as the socket's 0660. The URL that
``dcp-worker console-url`` prints carries it once (``?token=``); the page then moves it into an
HttpOnly, SameSite=Strict cookie and drops it from the address. Every request without it is
refused, naming why; a POST must also come from the page itself (its ``Origin``), so another
site open in the same browser cannot press the buttons (CSRF). The token is never logged.
"""

from __future__ import annotations

import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

__all__ = ["COOKIE", "TOKEN_FILE_MODE", "ConsoleAuth", "read_token", "write_token"]

TOKEN_FILE_MODE = 0o640
COOKIE = "dcp_worker_console"


def write_token(path: Path) -> str:
    """A new token in ``path`` (mode 0640 from its creation; replaces an old one)."""
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, TOKEN_FILE_MODE)
    try:
        os.fchmod(fd, TOKEN_FILE_MODE)  # the umask may have taken bits away
        os.write(fd, token.encode() + b"\n")
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return token


def read_token(path: Path) -> str:
    """The token in ``path``.

    Raises:
        OSError: the file cannot be read (not there, or not ours to read).
    """
    return path.read_text().strip()


@dataclass(frozen=True)
class ConsoleAuth:
    """The checks of every request, without I/O: each returns why it refuses, or None."""

    token: str
    #: ``host:port`` names the page answers to (a request for another Host is refused: a
    #: page elsewhere cannot rebind its own name to 127.0.0.1 and read this one).
    hosts: frozenset[str]

    def _matches(self, offered: str | None) -> bool:
        return offered is not None and hmac.compare_digest(offered.encode(), self.token.encode())

    def host_refusal(self, host: str | None) -> str | None:
        if host is None or host.lower() not in self.hosts:
            return f"refused: the page answers to {', '.join(sorted(self.hosts))}, not {host!r}"
        return None

    def token_refusal(self, cookie: str | None) -> str | None:
        if cookie is None:
            return "refused: no console token (open the address `dcp-worker console-url` prints)"
        if not self._matches(cookie):
            return "refused: wrong console token (the worker made a new one when it restarted)"
        return None

    def url_token_ok(self, offered: str | None) -> bool:
        return self._matches(offered)

    def origin_refusal(self, origin: str | None, host: str) -> str | None:
        """A POST's Origin must be this page's own (CSRF)."""
        if origin is None:
            return "refused: a POST needs an Origin header (cross-site request check)"
        if origin.lower() != f"http://{host.lower()}":
            return f"refused: Origin {origin!r} is not this page's (cross-site request check)"
        return None
