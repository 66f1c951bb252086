"""Who waits for what the store changed: parked fetches wait for slices to lease, long-polled
compute API reads of results wait for slices to become final.

Each is an :class:`asyncio.Event` replaced when it is set: a waiter takes the current one
before it reads the store, so a change between its read and its wait still wakes it.

Replicas on one database tell each other (:attr:`Wakeups.publish`, set by the server to
PostgreSQL's NOTIFY, scheduler/store/postgres.py); what another replica tells is
:meth:`Wakeups.woken`, which wakes this replica's waiters without telling anyone again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["RESULTS", "WORK", "Wakeups"]

#: The channels (PostgreSQL NOTIFY channel names): slices available, results final.
WORK = "dcp_work"
RESULTS = "dcp_results"


class Wakeups:
    """The two events the rooms set and the long polls wait on."""

    def __init__(self) -> None:
        #: Set when slices became available (a deploy, a return, an expiry, a rejection).
        self.work = asyncio.Event()
        #: Set when slices became final (accepted, failed, cancelled) or leases expired.
        self.results = asyncio.Event()
        #: Tells the other replicas (a channel name); None: there are none.
        self.publish: Callable[[str], None] | None = None

    def wake_work(self) -> None:
        """Slices became available: wake every parked fetch, here and in other replicas."""
        self._wake_work()
        if self.publish is not None:
            self.publish(WORK)

    def wake_results(self) -> None:
        """Results changed: wake every long-polled read of results, here and elsewhere."""
        self._wake_results()
        if self.publish is not None:
            self.publish(RESULTS)

    def woken(self, channel: str | None) -> None:
        """Another replica said ``channel`` changed (None: anything may have)."""
        if channel in (WORK, None):
            self._wake_work()
        if channel in (RESULTS, None):
            self._wake_results()

    def _wake_work(self) -> None:
        self.work.set()
        self.work = asyncio.Event()

    def _wake_results(self) -> None:
        self.results.set()
        self.results = asyncio.Event()
