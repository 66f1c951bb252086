"""The reference scheduler: store, leasing, result acceptance, compute API, admin CLI.

Names are imported lazily, so the compute client does not pay for the server's imports.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "NewJob": "store",
    "StaleLease": "store",
    "Store": "store",
    "StoreError": "store",
    "UnknownJob": "store",
    "UnknownSlice": "store",
    "SQLiteStore": "store.sqlite",
    "PostgresStore": "store.postgres",
    "open_store": "store.backends",
    "Scheduler": "server",
    "SchedulerConfig": "config",
    "ComputeClient": "client",
    "ComputeError": "client",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'scheduler' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
