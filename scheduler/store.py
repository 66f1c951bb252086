"""The scheduler's store interface: jobs, slices, leases. Backends implement :class:`Store`.

Exception tree::

    StoreError             root
    ├── UnknownJob         no such job
    ├── UnknownSlice       no such slice
    └── StaleLease         the token is not the slice's current lease (fencing), or the slice
                           is already final; ``code`` is the wire ErrorCode to answer with

Every method is one transaction: a crash between two calls loses nothing that was acknowledged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from dcp_worker.protocol import ErrorCode, LeaseRef, Limits, Metrics


class StoreError(Exception):
    code: ErrorCode = ErrorCode.INTERNAL


class UnknownJob(StoreError):
    code = ErrorCode.UNKNOWN_SLICE


class UnknownSlice(StoreError):
    code = ErrorCode.UNKNOWN_SLICE


class StaleLease(StoreError):
    code = ErrorCode.STALE_LEASE


@dataclass(frozen=True)
class NewJob:
    """A validated job, ready to store."""

    owner: str
    name: str
    runtime: str
    module: bytes
    module_sha256: str
    argv: tuple[str, ...]
    limits: Limits
    offer: float
    data: tuple[bytes, ...]
    payload_sha256: str
    max_attempts: int = 2


@dataclass(frozen=True)
class Lease:
    job: str
    slice: int
    token: str
    attempt: int
    deadline: float
    datum: bytes


@dataclass(frozen=True)
class JobRecord:
    id: str
    owner: str
    name: str
    state: str
    runtime: str
    module_sha256: str
    argv: tuple[str, ...]
    limits: Limits
    offer: float
    created: float
    finished: float | None
    total: int
    max_attempts: int
    counts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class SliceRecord:
    job: str
    slice: int
    state: str
    attempts: int
    worker: str | None
    deadline: float | None
    error_code: str | None
    error: str | None
    result: bytes | None
    payment_address: str | None
    accepted_at: float | None
    metrics: Metrics | None
    progress: float | None = None


class Store(Protocol):
    """What the scheduler needs from a backend. See scheduler/sqlite_store.py."""

    def create_job(self, job: NewJob, now: float) -> str: ...
    def job(self, job_id: str) -> JobRecord: ...
    def job_module(self, job_id: str) -> bytes: ...
    def list_jobs(self) -> list[JobRecord]: ...
    def job_state(self, job_id: str) -> str: ...
    def slices(
        self, job_id: str, after: int = -1, limit: int = 1000, final_prefix: bool = False
    ) -> list[SliceRecord]:
        """Slices after index ``after`` in order; with ``final_prefix``, only up to the first
        one that is not final (done, failed, cancelled)."""
        ...

    def lease(self, worker: str, max_slices: int, now: float, timeout: float) -> list[Lease]: ...
    def heartbeat(
        self, worker: str, refs: list[LeaseRef], now: float, timeout: float
    ) -> list[LeaseRef]: ...
    def accept_result(
        self,
        job_id: str,
        slice_: int,
        token: str,
        worker: str,
        result: bytes,
        payment_address: str,
        signature: str,
        metrics: Metrics,
        now: float,
    ) -> str: ...
    def fail_slice(
        self,
        job_id: str,
        slice_: int,
        token: str,
        worker: str,
        code: str,
        message: str,
        now: float,
    ) -> str: ...
    def return_slices(self, worker: str, refs: list[tuple[str, int, str]]) -> int: ...
    def expire_leases(self, now: float) -> int: ...
    def reset_job(self, job_id: str) -> int: ...
    def cancel_job(self, job_id: str, now: float) -> int: ...
    def remove_job(self, job_id: str) -> None: ...
    def close(self) -> None: ...
