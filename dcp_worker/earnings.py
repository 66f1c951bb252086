"""Lifetime earnings: the payment address's balance, read from the scheduler's compute API.

The worker's own counters start at zero with each run; the scheduler's ledger holds what the
payment address earned over all of them (``GET /api/v1/accounts/{address}``). It is read on
connect and after accepted results, at most once per ``interval``; a scheduler that cannot be
reached leaves the balance unknown (``value`` None, ``error`` says why), never the worker down.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import httpx

from dcp_protocol import nesting

__all__ = ["Balance", "BalanceReader", "account_url"]

log = logging.getLogger("dcp.worker.earnings")
#: An account reply is a few dozen bytes; a longer one is refused, never held in memory.
MAX_REPLY_BYTES = 64 * 1024
# httpx logs each request at info (httpcore each step at debug): a reading every few seconds
# would fill the -v and -vv logs.
for _name in ("httpx", "httpcore"):
    logging.getLogger(_name).setLevel(logging.WARNING)


def account_url(scheduler: str, address: str) -> str:
    """The compute API's account URL for a scheduler URL given as http(s):// or ws(s)://."""
    parts = urlsplit(scheduler if "://" in scheduler else f"http://{scheduler}")
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, f"/api/v1/accounts/{address}", "", ""))


@dataclass
class Balance:
    """The last reading: ``value`` in credits (None: unknown), ``checked`` on the monotonic
    clock, ``error`` why the last try failed ("" when it did not)."""

    value: float | None = None
    checked: float | None = None
    error: str = ""


class BalanceReader:
    """Keeps :attr:`balance` fresh; :meth:`want` asks for a reading (rate-limited)."""

    def __init__(self, scheduler: str, address: str, interval: float = 5.0) -> None:
        self.address = address
        self.url = account_url(scheduler, address)
        self.interval = interval
        self.balance = Balance()
        self._wanted = asyncio.Event()

    def use(self, scheduler: str) -> None:
        """Read from ``scheduler`` from now on: the replica the worker is connected to, whose
        ledger is the shared database's (a replica it left may be the one that is down)."""
        self.url = account_url(scheduler, self.address)

    def want(self) -> None:
        self._wanted.set()

    async def read_once(self, client: httpx.AsyncClient) -> None:
        try:
            async with client.stream("GET", self.url) as reply:
                reply.raise_for_status()
                body = bytearray()
                async for chunk in reply.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_REPLY_BYTES:
                        raise ValueError(f"the reply exceeds {MAX_REPLY_BYTES} bytes")
            # The scheduler is not trusted: a reply nested 200,000 deep raised RecursionError
            # out of this reader and ended the worker (nesting.loads refuses it first).
            value = float(nesting.loads(bytes(body))["balance"])
            if not math.isfinite(value):
                raise ValueError(f"the balance is {value}")
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if why != self.balance.error:
                log.info("lifetime earnings unknown: %s (%s)", why, self.url)
            self.balance.error = why
            return
        self.balance = Balance(value, time.monotonic())

    async def run(self) -> None:
        """Read whenever wanted, at most once per ``interval``, until cancelled."""
        async with httpx.AsyncClient(timeout=10.0) as client:
            while True:
                await self._wanted.wait()
                self._wanted.clear()
                await self.read_once(client)
                await asyncio.sleep(self.interval)
