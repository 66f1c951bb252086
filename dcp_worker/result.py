"""A signed result as the worker keeps it: built when a slice finishes, stored in the outbox,
read back from it, and sent in ``results`` frames until the scheduler acknowledges it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from dcp_protocol import Metrics, ResultItem

__all__ = ["PendingResult", "LeaseKey"]


class LeaseKey(NamedTuple):
    """Names a lease, and so the result computed under it (the outbox's primary key)."""

    job: str
    slice: int
    token: str


@dataclass(frozen=True)
class PendingResult:
    """One result, signed, not yet acknowledged: the fields of the wire's ``ResultItem``."""

    job: str
    slice: int
    token: str
    result: bytes
    signature: str
    payment_address: str
    metrics: Metrics

    @property
    def key(self) -> LeaseKey:
        return LeaseKey(self.job, self.slice, self.token)

    def item(self) -> ResultItem:
        """The result as it goes in a ``results`` frame."""
        return ResultItem(
            job=self.job,
            slice=self.slice,
            token=self.token,
            result=self.result,
            payment_address=self.payment_address,
            signature=self.signature,
            metrics=self.metrics,
        )
