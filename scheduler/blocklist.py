"""The operator's blocklist as sessions and acceptance consult it: identities and payment
addresses that get no session and whose results are refused (``dcp-scheduler workers block``).

Every login and every result asks, so the list is read from the store at most once per
:data:`REFRESH_SECONDS` of the given clock; a block takes effect within that on every replica.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .store.pool import StorePool

__all__ = ["Blocklist", "REFRESH_SECONDS"]

REFRESH_SECONDS = 2.0


class Blocklist:
    def __init__(self, db: StorePool, clock: Callable[[], float] = time.monotonic) -> None:
        self.db = db
        self.clock = clock
        self._read_at: float | None = None
        self._blocked: dict[str, str] = {}

    async def reason(self, *addresses: str) -> str | None:
        """Why the first blocked one of ``addresses`` is blocked (the operator's words, with
        the address), or None when none is."""
        now = self.clock()
        if self._read_at is None or not 0 <= now - self._read_at < REFRESH_SECONDS:
            self._blocked = await self.db.run(lambda s: s.blocked())
            self._read_at = now
        for address in addresses:
            why = self._blocked.get(address.lower())
            if why is not None:
                return f"{address} is blocked by the scheduler's operator: {why}"
        return None
