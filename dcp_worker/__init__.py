"""dcp-worker: the volunteer's worker supervisor, its protocol, identity and outbox."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
