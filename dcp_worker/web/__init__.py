"""The worker's local web page: its sandboxes, earnings, history and log, and its keys.

:mod:`.server` serves it (aiohttp, loopback by default); :mod:`.auth` holds the token that
guards it, in a file beside the control socket readable by the same user and group.
"""

from __future__ import annotations

from .auth import TOKEN_FILE_MODE, ConsoleAuth, read_token, write_token
from .server import ConsoleServer

__all__ = ["ConsoleAuth", "ConsoleServer", "TOKEN_FILE_MODE", "read_token", "write_token"]
