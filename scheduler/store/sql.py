"""The store's logic in SQL, once for both backends: :class:`SQLStore` is its rooms together.

The rooms, each a class of its own module, the later ones built on the earlier:

- ``sqlbase.py``: :class:`SQLBase`, the ground floor: the connection and transactions a backend
  gives, its dialect's words (``LOCK``, ``SKIP_LOCKED``, ``GREATEST``), the bank's reads, a
  job's policy and inputs, and the small steps several rooms share;
- ``jobs.py``: :class:`JobsRoom`, jobs and slices deployed, read, decided by votes, reset,
  cancelled, removed and collected;
- ``leases.py``: :class:`LeasesRoom`, leasing, heartbeats, failures, returns, expiry;
- ``results.py``: :class:`ResultsRoom`, acceptance and settlement, pricing, rejection;
- ``parties.py``: :class:`PartiesRoom`, owners' nonces and read tokens, groups, workers, payees.

Beside them, the bank (``ledger.py``) and the votes and reputations of replicated jobs
(``votes.py``) are functions over a connection. The backends (``sqlite.py``, ``postgres.py``)
subclass :class:`SQLStore`.
"""

from __future__ import annotations

from .parties import PartiesRoom
from .results import ResultsRoom
from .sqlbase import (
    ACTIVE_JOBS,
    PRICE_EXACT_WORKERS,
    PRICE_INTERVAL,
    PRICE_MIN_WORKERS,
    QUEUED_OF_JOB,
    QUEUED_REPLICAS_OF_JOB,
    REPLICA_SPREAD,
    SLICES_TO_SETTLE,
    SQLBase,
    replica_position,
)

__all__ = [
    "ACTIVE_JOBS",
    "PRICE_EXACT_WORKERS",
    "PRICE_INTERVAL",
    "PRICE_MIN_WORKERS",
    "QUEUED_OF_JOB",
    "QUEUED_REPLICAS_OF_JOB",
    "REPLICA_SPREAD",
    "SLICES_TO_SETTLE",
    "SQLBase",
    "SQLStore",
    "replica_position",
]


class SQLStore(ResultsRoom, PartiesRoom):
    """:class:`scheduler.store.Store` over SQL: every room. A backend subclasses it and gives the
    connection, the transactions and its dialect's words (see :class:`SQLBase`)."""
