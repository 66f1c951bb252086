"""The scheduler's store interface: jobs, slices, leases, the bank, groups, workers.
Backends implement :class:`Store`: scheduler/store/sqlite.py (the embedded default, one file)
and scheduler/store/postgres.py (one database shared by several replicas), both running the
statements of scheduler/store/sql.py; scheduler/store/backends.py's ``open_store`` picks one
by the ``--db`` value.

Exception tree::

    StoreError             root
    ├── DatabaseError      the database failed; nothing of the call happened (retry later)
    ├── UnknownJob         no such job
    ├── UnknownSlice       no such slice
    ├── StaleLease         the token is not the slice's current lease (fencing), or the slice
    │                      is already final
    ├── InsufficientFunds  a deploy's escrow exceeds the owner's balance; ``missing`` says by
    │                      how much (micro-credits)
    └── DuplicateGroup     a group with that join key exists

``code`` on each is the wire ErrorCode to answer with. Every method is one transaction: a crash
between two calls loses nothing that was acknowledged, and every movement of credits is a
ledger entry written in the same transaction as the state change it pays for.

Amounts are integers of micro-credits (10^-6 credit), so credits are conserved exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from dcp_protocol import DcpError, ErrorCode, LeaseRef, Limits, Metrics

from ..quorum import Redundancy
from .migrations import Migration

_T = TypeVar("_T")

MICRO = 1_000_000


def to_micro(credits: float) -> int:
    """Credits (a decimal number) to micro-credits, rounded to the nearest."""
    return round(credits * MICRO)


def credits(micro: int) -> float:
    return micro / MICRO


class StoreError(DcpError):
    code: ErrorCode = ErrorCode.INTERNAL


class DatabaseError(StoreError):
    """The database itself failed (unavailable, locked past the busy timeout, a lost
    connection, a statement refused): nothing of the call happened. Unlike the refusals below,
    it says nothing of the request: the same call may succeed later."""


class UnknownJob(StoreError):
    code = ErrorCode.UNKNOWN_SLICE


class UnknownSlice(StoreError):
    code = ErrorCode.UNKNOWN_SLICE


class StaleLease(StoreError):
    code = ErrorCode.STALE_LEASE


class VotesChanged(StoreError):
    """A replicated slice's votes changed between the comparison that gave a result its vote
    key and its acceptance (another replica's result was accepted meanwhile): compare with the
    votes as they are now and try again. Nothing of the result was stored."""


class InsufficientFunds(StoreError):
    code = ErrorCode.INSUFFICIENT_FUNDS

    def __init__(self, owner: str, needed: int, balance: int) -> None:
        super().__init__(
            f"{owner} has {credits(balance):.6f} credits; the job's escrow is "
            f"{credits(needed):.6f}: {credits(needed - balance):.6f} missing"
        )
        self.missing = needed - balance


class DuplicateGroup(StoreError):
    code = ErrorCode.INVALID_MESSAGE


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
    offer_micro: int
    data: tuple[bytes, ...]
    payload_sha256: str
    max_attempts: int = 2
    group: str = ""
    requirements: dict[str, Any] = field(default_factory=dict)
    verifier: bytes | None = None
    config: dict[str, Any] = field(default_factory=dict)
    #: What runs the verifier: "wasm" (a module), "python" or "js" (source).
    verifier_runtime: str = "wasm"
    #: Replication and voting (scheduler/quorum.py); None: one result per slice.
    redundancy: Redundancy | None = None
    #: The job's comparison function for votes (None: results agree when their bytes do) and
    #: what runs it (``wasm``, ``python`` or ``js``).
    compare: bytes | None = None
    compare_runtime: str = "wasm"
    #: Known answers (spot checks the owner supplies): slice index -> the right result.
    known: dict[int, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class Lease:
    job: str
    slice: int
    token: str
    attempt: int
    deadline: float
    datum: bytes
    offer_micro: int = 0


@dataclass(frozen=True)
class ResultLease:
    """What acceptance needs to know of the lease a result names, read before any verifier
    runs: its slice's state (``leased``; ``queued`` when it expired and no other lease was
    issued since; ``done`` when this result was accepted before), when it was granted (Unix
    time; None for a lease granted before schema 4) and the size of the datum it carried."""

    job: str
    slice: int
    state: str
    leased_at: float | None
    datum_bytes: int


@dataclass(frozen=True)
class ResultRow:
    """One result as acceptance stores it: the lease it answers (job, slice, token), its
    bytes, where its payment goes (a checksummed address), the worker's signature over them
    and the worker's measurements. The same record goes from the session to the store."""

    job: str
    slice: int
    token: str
    result: bytes
    payment_address: str
    signature: str
    metrics: Metrics
    #: A replicated job's vote: results with equal keys agree (None: by their bytes; set by
    #: acceptance from the job's comparison function).
    vote_key: str | None = None
    #: The keys of the votes that comparison saw (:meth:`Store.vote_representatives`), in
    #: order: acceptance refuses the result with VotesChanged unless they are still the
    #: slice's votes once it holds the slice's lock. None: not checked (no comparison).
    votes_seen: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Settled:
    """What accepting a result came to: ``accepted`` (``credited_micro`` paid to its payment
    address; 0 for a replica's result, paid once its slice's replicas agree) or ``duplicate``
    (the accepted result sent again: nothing paid)."""

    status: str
    credited_micro: int = 0


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
    offer_micro: int
    created: float
    finished: float | None
    total: int
    max_attempts: int
    group: str = ""
    requirements: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    has_verifier: bool = False
    escrow_micro: int = 0
    #: Measured cost of an accepted slice, None before the first one: for each field the
    #: (lower) median over the distinct workers of each worker's mean, so that no one worker
    #: moves it far (docs/protocol.md section 7, "Minimum wage").
    cost: Metrics | None = None
    counts: dict[str, int] = field(default_factory=dict)
    redundancy: Redundancy | None = None
    has_compare: bool = False


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
    #: Replicated jobs: agreeing results this slice needs now (None: not replicated).
    needed: int | None = None


@dataclass(frozen=True)
class ReplicaRecord:
    """One replica of a replicated job's slice (``input``): its own slice index and lease
    state, who computed it, its result and its vote once decided (``agreed``, ``disagreed``,
    ``forfeit``, ``spare``, ``inconclusive``; None while pending)."""

    job: str
    input: int
    slice: int
    state: str
    worker: str | None
    payment_address: str | None
    result: bytes | None
    vote: str | None
    accepted_at: float | None
    error_code: str | None = None

    @property
    def kind(self) -> str:
        """How it counts in its slice's quorum state: its vote, or before one ``pending``
        (its result is in) or its lease state (queued, leased, failed, cancelled)."""
        return self.vote or ("pending" if self.state == "done" else self.state)


@dataclass(frozen=True)
class LedgerEntry:
    seq: int
    at: float
    kind: str  # mint, escrow, payment, refund
    debit: str  # an address, "escrow:<job>", or "mint"
    credit: str
    amount_micro: int
    job: str | None
    slice: int | None


@dataclass(frozen=True)
class GroupRecord:
    join_key: str
    name: str
    join_hash: str
    created: float


@dataclass(frozen=True)
class ReadTokenRecord:
    """A read token the owner of ``job`` issued; only its SHA-256 is stored."""

    id: str
    job: str
    created: float
    expires: float
    revoked: float | None


@dataclass(frozen=True)
class WorkerRecord:
    address: str
    first_seen: float
    last_seen: float
    accepted: int
    rejected: int
    failed: int
    refused: int
    earned_micro: int
    #: Votes: results that agreed with a quorum, results outvoted (or caught by a known
    #: answer), and validated results in a row since the last bad one (the adaptive trust).
    valid: int = 0
    invalid: int = 0
    consecutive_valid: int = 0
    blocked: str | None = None

    @property
    def error_rate(self) -> float | None:
        """The share of its results that were bad: rejected by a verifier, failed, or
        outvoted (an outvoted vote was accepted first, so it is counted once), of all it
        returned or failed; None before it did any. (Rejections were left out of the whole,
        so a worker whose results a verifier refused showed rates above 1.)"""
        total = self.accepted + self.rejected + self.failed
        return (self.rejected + self.failed + self.invalid) / total if total else None


@dataclass(frozen=True)
class PayeeRecord:
    """The reputation of a payment address, over every identity that paid to it."""

    address: str
    valid: int
    invalid: int
    consecutive_valid: int
    earned_micro: int
    blocked: str | None = None

    @property
    def error_rate(self) -> float | None:
        """The share of its votes that were outvoted or caught; None before any."""
        total = self.valid + self.invalid
        return self.invalid / total if total else None


@dataclass(frozen=True)
class RefusalRecord:
    job: str
    worker: str
    code: str
    count: int
    message: str
    last: float


class CallRunner(Protocol):
    """Where store calls run (scheduler/store/pool.py's StorePool): on threads with
    connections of their own (``threaded``), or inline."""

    @property
    def threaded(self) -> bool: ...

    async def run(self, call: Callable[[Store], _T]) -> _T: ...


class PeerNotifier(Protocol):
    """How replicas on one database wake each other's waiters (scheduler/wakeups.py)."""

    def publish(self, channel: str) -> None:
        """Tell the other replicas that ``channel`` changed (coalesced; never raises)."""
        ...

    async def listen(self) -> None:
        """Call the ``wake`` it was made with for what the others publish, until cancelled."""
        ...


class Store(Protocol):
    """What the scheduler needs from a backend. See scheduler/store/sql.py."""

    #: Where the data is, for messages (a path, or a PostgreSQL URL without its password).
    where: str
    #: The schema migrations that opening this store applied (scheduler/store/migrations.py).
    applied: tuple[Migration, ...]
    #: Whether :meth:`sibling` opens another connection, so that calls may run on several
    #: threads at once (scheduler/store/pool.py); false where one connection serves all
    #: (SQLite).
    poolable: bool

    def sibling(self) -> Store:
        """Another store on the same database, with a connection of its own (opened on its
        first call), for one thread of a pool; only where :attr:`poolable`."""
        ...

    def schema_version(self) -> int: ...
    def notifier(
        self,
        channels: tuple[str, ...],
        wake: Callable[[str | None], None],
        pool: CallRunner | None = None,
    ) -> PeerNotifier | None:
        """What tells other replicas of this database, and hears them; None where the
        backend has no replicas (SQLite). Its NOTIFYs go through ``pool`` where given (off
        the event loop), else on this store's connection."""
        ...

    # jobs
    def create_job(self, job: NewJob, now: float) -> str: ...
    def job(self, job_id: str, counts: bool = True) -> JobRecord:
        """The job; its slice counts by state unless ``counts`` is false (they cost a scan of
        its slices)."""
        ...

    def job_state(self, job_id: str) -> str: ...
    def job_module(self, job_id: str) -> bytes: ...
    def job_verifier(self, job_id: str) -> tuple[bytes, str] | None:
        """The job's verifier and what runs it (``wasm``, ``python`` or ``js``), or None."""
        ...

    def job_compare(self, job_id: str) -> tuple[bytes, str] | None:
        """A replicated job's comparison function and what runs it, or None."""
        ...

    def datum(self, job_id: str, slice_: int) -> bytes: ...
    def list_jobs(self) -> list[JobRecord]: ...
    def active_jobs(self) -> list[JobRecord]: ...
    def has_queued(self) -> bool:
        """Whether any slice of any job is queued (one index probe)."""
        ...

    def slices(
        self,
        job_id: str,
        after: int = -1,
        limit: int = 1000,
        final_prefix: bool = False,
        max_bytes: int | None = None,
    ) -> list[SliceRecord]:
        """Slices after index ``after`` in order; with ``final_prefix``, only up to the first
        one that is not final (done, failed, cancelled); with ``max_bytes``, none after the
        one whose result brings their results past that many bytes."""
        ...

    # leases and results
    def lease(
        self,
        worker: str,
        max_slices: int,
        now: float,
        timeout: float,
        jobs: list[str] | None = None,
        max_held: int | None = None,
        payee: str | None = None,
        network: str | None = None,
    ) -> list[Lease]:
        """Queued slices for ``worker`` (paid to ``payee``, connected from ``network``): never a
        replica of a slice whose other replica this identity or payment address holds or
        computed, nor, where the job asks for distinct networks, this network."""
        ...

    def heartbeat(
        self, worker: str, refs: list[LeaseRef], now: float, timeout: float
    ) -> list[LeaseRef]: ...
    def result_lease(self, job_id: str, slice_: int, token: str, worker: str) -> ResultLease:
        """The lease a result from ``worker`` names, if a result under it can be accepted.

        Raises:
            StaleLease: ``token`` is not the slice's current lease, ``worker`` does not hold
                it, or the slice is final otherwise than by this lease's accepted result.
            UnknownSlice: no such slice.
        """
        ...

    def result_leases(
        self, worker: str, refs: Sequence[LeaseRef]
    ) -> list[ResultLease | StoreError]:
        """:meth:`result_lease` for each of ``refs`` at once, in order: each lease, or the
        refusal that :meth:`result_lease` would raise for it. Raises only
        :class:`DatabaseError` (for all of them)."""
        ...

    def accept_result(self, worker: str, row: ResultRow, now: float) -> Settled: ...
    def accept_results(
        self, worker: str, rows: list[ResultRow], now: float
    ) -> list[Settled | StoreError]: ...
    def reject_result(
        self,
        job_id: str,
        slice_: int,
        token: str,
        worker: str,
        code: str,
        message: str,
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
    def return_slices(
        self,
        worker: str,
        refs: list[LeaseRef],
        code: str = "",
        message: str = "",
        now: float = 0.0,
    ) -> int: ...
    def expire_leases(self, now: float) -> int: ...
    def extend_leases(self, deadline: float, now: float) -> int: ...

    # admin
    def reset_job(self, job_id: str, now: float = 0.0) -> int: ...
    def cancel_job(self, job_id: str, now: float) -> int: ...
    def remove_job(self, job_id: str, now: float = 0.0) -> None: ...
    def collect_garbage(self, now: float, lifetime: float) -> list[str]: ...

    # bank
    def mint(self, address: str, amount_micro: int, now: float) -> int: ...
    def balance(self, address: str) -> int: ...
    def ledger(self, account: str | None = None, limit: int = 1000) -> list[LedgerEntry]: ...
    def totals(self) -> dict[str, int]: ...

    # owner requests: nonces, read tokens
    def use_nonce(self, address: str, nonce: str, now: float, keep_until: float) -> bool:
        """Spend ``nonce`` of ``address``: False if it was spent before and is still
        remembered. It is remembered until ``keep_until``; nonces past theirs are removed."""
        ...

    def create_read_token(
        self, job_id: str, token_sha256: str, now: float, expires: float
    ) -> ReadTokenRecord:
        """Store a read token for ``job_id`` by its hash. Raises UnknownJob."""
        ...

    def read_token(self, token_sha256: str) -> ReadTokenRecord | None: ...
    def revoke_read_token(self, job_id: str, token_id: str, now: float) -> bool:
        """Revoke a token of ``job_id``; False if it has no such token."""
        ...

    # groups, workers, refusals
    def create_group(self, name: str, join_key: str, join_hash: str, now: float) -> None: ...
    def groups(self) -> list[GroupRecord]: ...
    def seen_worker(self, address: str, now: float) -> None: ...
    def workers(self) -> list[WorkerRecord]: ...
    def worker(self, address: str) -> WorkerRecord | None: ...
    def payee(self, address: str) -> PayeeRecord | None: ...
    def block(self, address: str, reason: str, now: float) -> None:
        """Block ``address`` as a worker identity and as a payment address."""
        ...

    def unblock(self, address: str) -> bool: ...
    def blocked(self) -> dict[str, str]:
        """Every blocked address (lowercase) with the operator's reason."""
        ...

    def replicas(self, job_id: str, input_: int | None = None) -> list[ReplicaRecord]:
        """The replicas of a replicated job's slices (of one slice with ``input_``), in order."""
        ...

    def vote_representatives(self, job_id: str, slice_: int) -> list[tuple[str, bytes]]: ...
    def disagreements(self, address: str, limit: int = 20) -> list[ReplicaRecord]: ...

    def record_refusal(
        self, job_id: str, worker: str, code: str, message: str, now: float
    ) -> None: ...
    def refusals(self, job_id: str | None = None) -> list[RefusalRecord]: ...

    def close(self) -> None: ...
