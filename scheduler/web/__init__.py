"""The scheduler's web console (docs/console.md): server-rendered pages under ``/console/``
for operators and job owners, over the same store and the same read-token check as the
compute API (scheduler/api.py).

    Console(StorePool(store), connected, operator_token).add_routes(app)
"""

from __future__ import annotations

from .access import Visitor, load_operator_token, operator_token_path
from .views import Console

__all__ = ["Console", "Visitor", "load_operator_token", "operator_token_path"]
