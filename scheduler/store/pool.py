"""Where a serving scheduler's store calls run: off its event loop where the backend allows.

A store call is synchronous: on PostgreSQL one to three round trips, and a round trip that is
slow (a lock another replica holds, a busy server, vacuum) would stall every session of the
replica if it ran on the event loop. :class:`StorePool` runs each call on one of a few
threads instead, each with a connection of its own (:meth:`Store.sibling`): a slow call then
delays its own request, and the loop goes on serving the others. Calls from one replica's
threads meet in the database exactly as calls from several replicas do, which is what the
store is written for (row locks, ``SKIP LOCKED``, advisory locks per connection).

SQLite has no siblings (one connection, in-process, microseconds a call): there the pool runs
each call inline, on the caller's thread, as before; a thread hop would cost more than the
call. On PostgreSQL it runs them inline too unless asked for threads (``serve
--db-connections N``): with the database on the replica's own CPUs, as on the 2-core machine
of docs/performance.md, the threads cost more (the hops, the GIL they share with the event
loop) than overlapping the round trips gains; with the database on a machine of its own, a
round trip is time the loop could serve others in.

Everything else (caches, sessions, wake-ups) stays on the event loop: only the call given to
:meth:`StorePool.run` crosses to a thread, and it touches nothing but the store it is handed.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from . import Store

__all__ = ["StorePool"]

_T = TypeVar("_T")


class StorePool:
    """Runs store calls: on ``connections`` threads, each with its own sibling of ``store``,
    or inline on ``store`` where it has no siblings or ``connections`` is 0.

    ``store`` itself stays the caller's (start-up, admin reads); the threads never use it.
    """

    def __init__(self, store: Store, connections: int = 0) -> None:
        if connections < 0:
            raise ValueError("connections must be at least 0")
        self.store = store
        self.connections = connections if connections and store.poolable else 0
        self._executor: ThreadPoolExecutor | None = None
        if self.connections:
            self._executor = ThreadPoolExecutor(
                max_workers=self.connections, thread_name_prefix="dcp-store"
            )
        self._local = threading.local()
        self._lock = threading.Lock()
        self._opened: list[Store] = []
        #: Calls begun on a thread and not yet done (``GET /api/v1/status``).
        self.in_flight = 0

    @property
    def threaded(self) -> bool:
        """Whether calls run on the pool's threads (else inline)."""
        return self._executor is not None

    async def run(self, call: Callable[[Store], _T]) -> _T:
        """``call(store)``, on a thread of the pool with that thread's store, or inline. What
        it raises (a StoreError) is raised here. A caller cancelled meanwhile does not stop a
        call under way: it ends (commits or rolls back) on its thread."""
        if self._executor is None:
            return call(self.store)
        self.in_flight += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._executor, self._call, call
            )
        finally:
            self.in_flight -= 1

    def _call(self, call: Callable[[Store], _T]) -> _T:
        store: Store | None = getattr(self._local, "store", None)
        if store is None:
            store = self.store.sibling()
            with self._lock:
                self._opened.append(store)
            self._local.store = store
        return call(store)

    def close(self) -> None:
        """Wait for the calls under way, then close the threads' connections (not
        ``store``'s)."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
        with self._lock:
            opened, self._opened = self._opened, []
        for store in opened:
            store.close()
