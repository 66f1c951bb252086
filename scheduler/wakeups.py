"""Who waits for what the store changed: parked fetches wait for slices to lease, long-polled
compute API reads of results wait for slices to become final.

Each is an :class:`asyncio.Event` replaced when it is set: a waiter takes the current one
before it reads the store, so a change between its read and its wait still wakes it.
"""

from __future__ import annotations

import asyncio

__all__ = ["Wakeups"]


class Wakeups:
    """The two events the rooms set and the long polls wait on."""

    def __init__(self) -> None:
        #: Set when slices became available (a deploy, a return, an expiry, a rejection).
        self.work = asyncio.Event()
        #: Set when slices became final (accepted, failed, cancelled) or leases expired.
        self.results = asyncio.Event()

    def wake_work(self) -> None:
        """Slices became available: wake every parked fetch."""
        self.work.set()
        self.work = asyncio.Event()

    def wake_results(self) -> None:
        """Results changed: wake every long-polled read of results."""
        self.results.set()
        self.results = asyncio.Event()
