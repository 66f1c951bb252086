"""The reference scheduler: store, leasing, result acceptance, compute API, admin CLI."""

from __future__ import annotations

from .server import Scheduler, SchedulerConfig
from .sqlite_store import SQLiteStore
from .store import NewJob, StaleLease, Store, StoreError, UnknownJob, UnknownSlice

__all__ = [
    "NewJob",
    "Scheduler",
    "SchedulerConfig",
    "SQLiteStore",
    "StaleLease",
    "Store",
    "StoreError",
    "UnknownJob",
    "UnknownSlice",
]
