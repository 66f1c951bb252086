"""The worker's decisions without I/O: what to fetch, run, submit again, decline and return.

A :class:`WorkerState` is changed only by :meth:`WorkerState.handle`, which takes one event
(something that happened: slices leased, a batch finished, results answered, a pause, ...)
and returns the instructions the supervisor carries out (run this batch, decline that slice,
return these leases, ...). It reads no clock (times come in the events), opens nothing and
awaits nothing, so tests feed it events and check its instructions, with no process or
socket (as dask/distributed's ``worker_state_machine.py``).

A lease the worker holds moves through a table of stages (a missing entry is an error)::

    queued --start--> running --end--> gone
      |  \\--drop (lost) / decline--> gone
      +--return--> returning --returned--> gone
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import hashlib
import json
import logging
import math
import random
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from dcp_protocol import (
    DcpError,
    ErrorCode,
    ItemAck,
    JobSpec,
    LeaseRef,
    Limits,
    Message,
    Metrics,
    Refusal,
    ResultsAck,
    SliceFailure,
    SliceLease,
    Work,
    policy,
)
from dcp_protocol.evaluator_channel import SliceOutcome, SliceResult
from dcp_protocol.limits import MAX_UINT64
from dcp_protocol.policy import WorkerTerms

from .config import WorkerConfig
from .levels import NOTICE
from .result import LeaseKey, PendingResult

__all__ = [
    "BUSY_CODES",
    "FETCH_BUCKETS",
    "Counters",
    "HISTORY",
    "JobTally",
    "SliceRecord",
    "WorkerState",
    "HeldLease",
    "LeaseStage",
    "LeaseEvent",
    "LEASE_TRANSITIONS",
    "Blocked",
    "IllegalLeaseTransition",
    # events
    "Event",
    "EvaluatorDescribed",
    "MachineBusy",
    "MachineFree",
    "Connected",
    "StopRequested",
    "GraceStarted",
    "Paused",
    "Resumed",
    "FinishRequested",
    "Snoozed",
    "TimePassed",
    "JobPaused",
    "JobResumed",
    "OutboxFailed",
    "OutboxWritten",
    "FetchAnswered",
    "SlicesLeased",
    "LeasesLost",
    "LeasesReturned",
    "SandboxFree",
    "SliceProgressed",
    "BatchFinished",
    "BatchEnded",
    "ResultsAnswered",
    "ResultUnsendable",
    # instructions
    "Instruction",
    "Fetch",
    "ReturnLeases",
    "Decline",
    "Run",
    "ReportFailure",
    "KeepResult",
    "RemoveFromOutbox",
    "SubmitLater",
]

log = logging.getLogger("dcp.worker")

#: Codes of an evaluator manager that keeps the machine busy (its owner needs it): not the
#: slice's fault, so the slice goes back and the worker fetches nothing until it is free.
BUSY_CODES = frozenset({ErrorCode.MACHINE_BUSY.value, ErrorCode.EVALUATOR_PREEMPTED.value})
_OPENCL_WINDOW = 20 * 60.0
_JOB_CACHE = 16
_SPEC_PRINTS = 4096
_BATCH_SHORT = 0.02  # slices shorter than this (evaluator wall time) are batched
_BATCH_WORK = 0.05  # ... about this much work per evaluator request
_BATCH_MAX = 32
_RETRY_MAX = 10.0  # the longest wait before a refused-for-now result is sent again
#: While results wait, a reconnect is tried at least this often per lease timeout.
_RECONNECTS_PER_LEASE = 4
#: Refusals after which a result can never be accepted: drop it from the outbox.
_FINAL_REFUSALS = {
    ErrorCode.RESULT_REJECTED.value,
    ErrorCode.VERIFIER_FAILED.value,
    ErrorCode.STALE_LEASE.value,
    ErrorCode.UNKNOWN_SLICE.value,
    ErrorCode.BAD_SIGNATURE.value,
    ErrorCode.RESULT_TOO_LARGE.value,
    ErrorCode.METRICS_IMPLAUSIBLE.value,
}

#: Finished and failed slices kept for the dashboard's and the page's history.
HISTORY = 200
_TALLIES = 256  # jobs whose counts are kept

FETCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


# --------------------------------------------------------------------------- leases


class LeaseStage(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    RETURNING = "returning"
    GONE = "gone"


class LeaseEvent(StrEnum):
    START = "start"
    END = "end"
    DROP = "drop"
    DECLINE = "decline"
    RETURN = "return"
    RETURNED = "returned"


class IllegalLeaseTransition(DcpError):
    """``event`` is not allowed for a lease in ``stage``."""

    def __init__(self, stage: LeaseStage, event: LeaseEvent) -> None:
        super().__init__(f"lease event {event.value!r} is not allowed in stage {stage.value!r}")
        self.stage = stage
        self.event = event


_S, _E = LeaseStage, LeaseEvent
LEASE_TRANSITIONS: dict[tuple[LeaseStage, LeaseEvent], LeaseStage] = {
    (_S.QUEUED, _E.START): _S.RUNNING,
    (_S.QUEUED, _E.DROP): _S.GONE,  # lost while it waited: the scheduler gave it to another
    (_S.QUEUED, _E.DECLINE): _S.GONE,
    (_S.QUEUED, _E.RETURN): _S.RETURNING,
    (_S.RUNNING, _E.END): _S.GONE,
    # Held until the return is sent: an immediate stop meanwhile returns it itself.
    (_S.RETURNING, _E.RETURNED): _S.GONE,
}
del _S, _E


@dataclass
class HeldLease:
    """A slice leased from the scheduler and not yet resolved (run, declined or returned)."""

    lease: SliceLease
    #: What this worker offered in the fetch that leased the slice.
    offered: WorkerTerms
    stage: LeaseStage = LeaseStage.QUEUED
    #: The scheduler said another holds it now (a heartbeat's ``lost``).
    lost: bool = False
    progress: float | None = None
    #: When progress last moved (the events' clock), or None before any.
    progressed: float | None = None

    @property
    def key(self) -> LeaseKey:
        return LeaseKey(self.lease.job, self.lease.slice, self.lease.token)

    def ref(self, progress: float | None = None) -> LeaseRef:
        return LeaseRef(self.lease.job, self.lease.slice, self.lease.token, progress)


@dataclass
class Activity:
    """What one sandbox is doing, for the dashboard and ``status``."""

    job: str
    job_name: str
    slice: int
    started: float
    held: HeldLease


@dataclass
class SliceRecord:
    """One finished or failed slice, for the history (times are the events' clock)."""

    job: str
    job_name: str
    slice: int
    started: float
    ended: float
    #: "done" (result kept, not yet answered), "accepted", "refused", "failed" or "returned".
    outcome: str
    code: str = ""
    credit: float = 0.0


@dataclass
class JobTally:
    """Per-job counts and earnings of this run."""

    job: str
    name: str = ""
    done: int = 0
    failed: int = 0
    accepted: int = 0
    refused: int = 0
    credits: float = 0.0


@dataclass
class Counters:
    """Running totals for ``statistics()`` and the metrics endpoint."""

    done: int = 0
    failed: int = 0
    accepted: int = 0
    refused: int = 0
    credits: float = 0.0
    declined_slices: int = 0
    #: (event, code) -> count: slice_failed, slice_declined, result_refused, result_retried.
    reasons: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    #: Fetch round trips (long polls included): counts per upper bound of FETCH_BUCKETS.
    fetch_buckets: list[int] = field(default_factory=lambda: [0] * (len(FETCH_BUCKETS) + 1))
    fetch_seconds: float = 0.0


class Blocked(StrEnum):
    """Why no fetch goes out now (see :meth:`WorkerState.next_fetch`)."""

    STOPPING = "stopping"
    OUTBOX = "outbox"  # the last commit failed (a full disk): take no work we cannot keep
    PAUSED = "paused"
    MACHINE_BUSY = "machine_busy"  # the evaluator manager would refuse it
    FULL = "full"  # enough slices are held for the sandboxes and the prefetch


# --------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Event:
    """Something that happened to the worker."""


@dataclass(frozen=True)
class EvaluatorDescribed(Event):
    """The first evaluator answered ``describe``: what it can run."""

    capabilities: dict[str, Any]


@dataclass(frozen=True)
class MachineBusy(Event):
    """The evaluator manager refuses work (or cannot be reached): ``reason`` says why."""

    reason: str


@dataclass(frozen=True)
class MachineFree(Event):
    """The evaluator manager serves evaluators again."""


@dataclass(frozen=True)
class Connected(Event):
    """A scheduler session opened; its lease timeout bounds reconnect delays, and the
    largest result it takes (``max_result_bytes``, None: not said) bounds every slice's
    output: a larger one could only be dropped, its lease left to expire."""

    lease_timeout: float
    max_result_bytes: int | None = None


@dataclass(frozen=True)
class StopRequested(Event):
    """A graceful stop (``immediate=False``) or an immediate one."""

    immediate: bool = False


@dataclass(frozen=True)
class GraceStarted(Event):
    """A graceful stop begins its grace period: the slices that never started go back."""


@dataclass(frozen=True)
class Paused(Event):
    """Fetch nothing until resumed; running and queued slices go on."""


@dataclass(frozen=True)
class Resumed(Event):
    """Fetch again (ends a pause, a finish and a snooze)."""


@dataclass(frozen=True)
class FinishRequested(Event):
    """Let held slices (running and queued) end, then stay paused (fahctl's ``finish``)."""


@dataclass(frozen=True)
class Snoozed(Event):
    """Pause for ``seconds`` from ``now``; the pause ends by itself at that deadline."""

    seconds: float
    now: float


@dataclass(frozen=True)
class TimePassed(Event):
    """The clock reads ``now``: a snooze whose deadline passed ends."""

    now: float


@dataclass(frozen=True)
class JobPaused(Event):
    """No new work from ``job``: fetches exclude it, its queued slices go back."""

    job: str


@dataclass(frozen=True)
class JobResumed(Event):
    job: str


@dataclass(frozen=True)
class OutboxFailed(Event):
    """A commit to the outbox failed (``error`` says why)."""

    error: str


@dataclass(frozen=True)
class OutboxWritten(Event):
    """A commit to the outbox succeeded."""


@dataclass(frozen=True)
class FetchAnswered(Event):
    """The scheduler answered a fetch after ``seconds`` (long polls included)."""

    seconds: float


@dataclass(frozen=True)
class SlicesLeased(Event):
    """A fetch's ``work`` answer: ``offered`` is what that fetch said about this worker."""

    work: Work
    offered: WorkerTerms


@dataclass(frozen=True)
class LeasesLost(Event):
    """A heartbeat's answer named leases another worker holds now."""

    refs: tuple[LeaseRef, ...]


@dataclass(frozen=True)
class LeasesReturned(Event):
    """The held leases of a :class:`ReturnLeases` were given back (or that was tried)."""

    leases: tuple[HeldLease, ...]


@dataclass(frozen=True)
class SandboxFree(Event):
    """Sandbox ``sandbox`` can take a batch now (the queue is not empty)."""

    sandbox: int
    now: float


@dataclass(frozen=True)
class SliceProgressed(Event):
    held: HeldLease
    fraction: float
    now: float | None = None


@dataclass(frozen=True)
class BatchFinished(Event):
    """The sandbox answered a batch: one outcome per slice, in order, after ``elapsed`` s."""

    batch: tuple[HeldLease, ...]
    outcomes: list[SliceOutcome]
    elapsed: float
    now: float


@dataclass(frozen=True)
class BatchEnded(Event):
    """Sandbox ``sandbox`` is done with ``batch``, finished or not (a cancellation)."""

    sandbox: int
    batch: tuple[HeldLease, ...]


@dataclass(frozen=True)
class ResultsAnswered(Event):
    """The scheduler answered a ``results`` frame holding ``items`` (in order)."""

    items: tuple[PendingResult, ...]
    reply: Message


@dataclass(frozen=True)
class ResultUnsendable(Event):
    """``item`` can never go on this session's frames (``why``): the scheduler would refuse
    it as too large."""

    item: PendingResult
    why: str


# --------------------------------------------------------------------------- instructions


@dataclass(frozen=True)
class Instruction:
    """Something the supervisor is to do."""


@dataclass(frozen=True)
class Fetch(Instruction):
    """Ask for up to ``max_slices`` under ``terms`` (the fetch says exactly these terms,
    and its slices are checked against them)."""

    max_slices: int
    terms: WorkerTerms
    known_jobs: tuple[str, ...]


@dataclass(frozen=True)
class ReturnLeases(Instruction):
    """Give these leases back unrun. Those still held (see :class:`GraceStarted`) are
    forgotten once :class:`LeasesReturned` says the return was sent."""

    leases: tuple[HeldLease, ...]


@dataclass(frozen=True)
class Decline(Instruction):
    """Return one slice with the reason it must not run here (never reaches an evaluator)."""

    lease: SliceLease
    why: Refusal


@dataclass(frozen=True)
class Run(Instruction):
    """Run ``batch`` (slices of ``job``, under ``limits``) in sandbox ``sandbox``."""

    sandbox: int
    job: JobSpec
    limits: Limits
    batch: tuple[HeldLease, ...]


@dataclass(frozen=True)
class ReportFailure(Instruction):
    """Tell the scheduler the slice failed in the sandbox."""

    lease: SliceLease
    failure: SliceFailure


@dataclass(frozen=True)
class KeepResult(Instruction):
    """Sign ``result`` and keep it for the outbox (then submit it)."""

    lease: SliceLease
    result: bytes
    metrics: Metrics


@dataclass(frozen=True)
class RemoveFromOutbox(Instruction):
    """Results acknowledged (or refused for good): delete them at the next commit."""

    keys: tuple[LeaseKey, ...]


@dataclass(frozen=True)
class SubmitLater(Instruction):
    """Send ``item`` again on the same session after ``delay`` seconds."""

    item: PendingResult
    delay: float


# --------------------------------------------------------------------------- the state


def _fields(job: str, slice_: int, code: str | None = None) -> dict[str, object]:
    """Structured log fields (the journal keeps them: ``journalctl DCP_JOB=...``)."""
    fields: dict[str, object] = {"DCP_JOB": job, "DCP_SLICE": slice_}
    if code is not None:
        fields["DCP_CODE"] = code
    return fields


class WorkerState:
    """Everything the worker decides with, and the decisions.

    Args:
        config: the worker's settings (wage, allow-lists, groups, OpenCL, prefetch, limits).
        sandboxes: how many sandboxes run slices.
        opencl_privileged: whether OpenCL kernels would run as root, until the evaluator says
            which user it runs as.
        uniform: draws the jitter of retry delays (a fixed one in tests).
    """

    def __init__(
        self,
        config: WorkerConfig,
        sandboxes: int,
        *,
        opencl_privileged: bool = False,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.config = config
        self.sandboxes = sandboxes
        self._uniform = uniform
        self.capabilities: dict[str, Any] = {}
        self.opencl_privileged = opencl_privileged
        #: Job specs the scheduler sent (bounded; least recently used first).
        self.jobs: OrderedDict[str, JobSpec] = OrderedDict()
        #: Job -> a fingerprint of the first spec the scheduler sent for it (kept after the
        #: spec itself is dropped from the cache): a job's spec never changes.
        self._prints: OrderedDict[str, str] = OrderedDict()
        #: Jobs whose spec the scheduler changed: their slices are refused.
        self._changed: set[str] = set()
        #: Skipped jobs already logged, as (job, code).
        self._reported: set[tuple[str, str]] = set()
        # The first slices leased and the first result accepted are logged at NOTICE (the
        # default verbosity shows them): a volunteer sees the worker work, once, not per slice.
        self._first_work = self._first_result = True
        self.held: dict[LeaseKey, HeldLease] = {}
        self.queue: collections.deque[HeldLease] = collections.deque()
        self.running = 0
        self.activity: dict[int, Activity] = {}  # sandbox index -> its slice
        #: Job -> a moving average of its slices' evaluator wall time (sizes batches).
        self._walls: dict[str, float] = {}
        self._costs: dict[str, tuple[int, Metrics]] = {}  # job -> (slices, summed metrics)
        self._declined: dict[str, float] = {}  # job -> the offer it was declined at
        self._opencl_used: collections.deque[tuple[float, float]] = collections.deque()
        #: Results the scheduler could not take for now (``internal``): tries so far, by key.
        self._retries: dict[LeaseKey, int] = {}
        self.counters = Counters()
        self.finished: collections.deque[float] = collections.deque(maxlen=10_000)
        self.paused = False
        #: A finish was asked: paused, and the phase says so while held slices end.
        self.finishing = False
        #: When a snooze ends (the events' clock), or None.
        self.snooze_until: float | None = None
        #: Jobs the operator paused ("no new work from this job").
        self.paused_jobs: set[str] = set()
        self.history: collections.deque[SliceRecord] = collections.deque(maxlen=HISTORY)
        self._records: dict[LeaseKey, SliceRecord] = {}  # done, waiting for the answer
        self.tallies: OrderedDict[str, JobTally] = OrderedDict()
        self.stopping = False
        self.stopped_now = False
        self.outbox_failing = False
        self.machine_busy = False
        #: Why the evaluator manager keeps the machine busy ("" while it does not).
        self.busy_reason = ""
        self.lease_timeout: float | None = None  # the last scheduler's, from its welcome
        self.max_result_bytes: int | None = None  # likewise
        self._handlers: dict[type[Event], Callable[[Any], list[Instruction]]] = {
            EvaluatorDescribed: self._on_evaluator_described,
            MachineBusy: self._on_machine_busy,
            MachineFree: self._on_machine_free,
            Connected: self._on_connected,
            StopRequested: self._on_stop_requested,
            GraceStarted: self._on_grace_started,
            Paused: self._on_paused,
            Resumed: self._on_resumed,
            FinishRequested: self._on_finish_requested,
            Snoozed: self._on_snoozed,
            TimePassed: self._on_time_passed,
            JobPaused: self._on_job_paused,
            JobResumed: self._on_job_resumed,
            OutboxFailed: self._on_outbox_failed,
            OutboxWritten: self._on_outbox_written,
            FetchAnswered: self._on_fetch_answered,
            SlicesLeased: self._on_slices_leased,
            LeasesLost: self._on_leases_lost,
            LeasesReturned: self._on_leases_returned,
            SandboxFree: self._on_sandbox_free,
            SliceProgressed: self._on_slice_progressed,
            BatchFinished: self._on_batch_finished,
            BatchEnded: self._on_batch_ended,
            ResultsAnswered: self._on_results_answered,
            ResultUnsendable: self._on_result_unsendable,
        }

    def handle(self, event: Event) -> list[Instruction]:
        """Apply ``event``; returns what to do about it, in order."""
        return self._handlers[type(event)](event)

    # ------------------------------------------------------------------ queries

    def next_fetch(self, now: float) -> Fetch | Blocked:
        """The fetch to send now, or why none goes out."""
        if self.stopping:
            return Blocked.STOPPING
        if self.outbox_failing:
            return Blocked.OUTBOX
        if self.paused:
            return Blocked.PAUSED
        if self.machine_busy:
            return Blocked.MACHINE_BUSY
        want = self.sandboxes + self._prefetch()
        held = len(self.queue) + self.running
        deficit = want - held
        # A deep window is refilled in chunks, not a fetch per finished slice.
        if deficit <= 0 or (held and deficit < want // 4):
            return Blocked.FULL
        return Fetch(deficit, self.worker_terms(now), tuple(self.jobs))

    def worker_terms(self, now: float) -> WorkerTerms:
        """What this worker agrees to now (a fetch says it; each slice is checked against it)."""
        c = self.config
        return WorkerTerms(
            groups=frozenset(c.group_hashes()),
            leave_public_group=c.leave_public_group,
            capabilities=self._offered_capabilities(now),
            min_wage=c.min_wage,
            allowed_jobs=frozenset(c.job_ids),
            allowed_owners=frozenset(c.job_owners),
            excluded_jobs=frozenset(self.paused_jobs),
            declined=dict(self._declined),
        )

    def heartbeat_refs(self) -> tuple[LeaseRef, ...]:
        """Every lease held, with its progress: a heartbeat extends them."""
        return tuple(h.ref(h.progress) for h in self.held.values())

    def held_refs(self) -> tuple[LeaseRef, ...]:
        return tuple(h.ref() for h in self.held.values())

    def reconnect_bound(self, results_waiting: int) -> float:
        """The longest reconnect delay now: a fraction of the lease timeout while slices are
        held or results wait (they are lost to the lease, or refused as stale, past it)."""
        if self.lease_timeout is None or not (self.held or results_waiting):
            return math.inf
        return self.lease_timeout / _RECONNECTS_PER_LEASE

    def phase(self, connected: bool) -> str:
        """One word for the dashboard and ``status``."""
        if self.stopped_now:
            return "stopping now"
        if self.stopping:
            return "stopping"
        if self.finishing and (self.running or self.queue):
            return "finishing"
        if self.snooze_until is not None:
            return "snoozed"
        if self.paused:
            return "paused"
        if self.machine_busy:
            return "held"  # the word operators read in ``status`` since the first release
        if self.running:
            return "working"
        return "fetching" if connected else "connecting"

    def slices_per_minute(self, now: float) -> int:
        return sum(1 for t in self.finished if t > now - 60)

    # ------------------------------------------------------------------ the evaluator

    def _on_evaluator_described(self, event: EvaluatorDescribed) -> list[Instruction]:
        self.capabilities = event.capabilities
        self._on_machine_free(MachineFree())
        uid = self.capabilities.get("uid")
        if isinstance(uid, int) and not isinstance(uid, bool):
            # Measured by the evaluator, here or behind a manager (whose own rule may differ).
            self.opencl_privileged = uid == 0 and not self.config.opencl_as_root
        for runtime, why in self.capabilities.get("withheld", {}).items():
            log.warning("the evaluator manager does not offer %s: %s", runtime, why)
        if self.opencl_privileged and "opencl" in self.capabilities.get("runtimes", {}):
            log.warning(
                "OpenCL is not offered: evaluators would run kernels as root (no "
                "unprivileged account to drop to); see opencl_as_root"
            )
        return []

    def _on_machine_busy(self, event: MachineBusy) -> list[Instruction]:
        # Logged once per busy spell, and when its reason changes.
        if not self.machine_busy or event.reason != self.busy_reason:
            log.warning("work held by the evaluator manager: %s", event.reason)
        self.machine_busy = True
        self.busy_reason = event.reason
        return []

    def _on_machine_free(self, _event: MachineFree) -> list[Instruction]:
        if self.machine_busy:
            log.warning("work resumes: the evaluator manager starts evaluators again")
        self.machine_busy = False
        self.busy_reason = ""
        return []

    def _offered_capabilities(self, now: float) -> dict[str, Any]:
        """The evaluator's capabilities, less OpenCL while its time budget is used up or when
        kernels would run as root."""
        off = self.config.opencl_slots == 0  # --cores N,0: lend no GPU
        if not (self._opencl_over_budget(now) or self.opencl_privileged or off):
            return self.capabilities
        runtimes = {k: v for k, v in self.capabilities.get("runtimes", {}).items() if k != "opencl"}
        return {**self.capabilities, "runtimes": runtimes}

    def _opencl_over_budget(self, now: float) -> bool:
        """DCP's rule: OpenCL (GPU) work may use ``opencl_share`` of a 20-minute window."""
        if self.config.opencl_share >= 1.0:
            return False
        horizon = now - _OPENCL_WINDOW
        while self._opencl_used and self._opencl_used[0][0] < horizon:
            self._opencl_used.popleft()
        used = sum(seconds for _t, seconds in self._opencl_used)
        return used >= self.config.opencl_share * _OPENCL_WINDOW

    # ------------------------------------------------------------------ session and stops

    def _on_connected(self, event: Connected) -> list[Instruction]:
        self.lease_timeout = event.lease_timeout
        self.max_result_bytes = event.max_result_bytes
        return []

    def _on_stop_requested(self, event: StopRequested) -> list[Instruction]:
        self.stopping = True
        self.stopped_now = self.stopped_now or event.immediate
        return []

    def _on_grace_started(self, _event: GraceStarted) -> list[Instruction]:
        """The slices that never started go back; they stay held until the return is sent
        (an immediate stop meanwhile returns them with the rest)."""
        returned = tuple(self.queue)
        self.queue.clear()
        for held in returned:
            self._move(held, LeaseEvent.RETURN)
        return [ReturnLeases(returned)] if returned else []

    def _on_paused(self, _event: Paused) -> list[Instruction]:
        self.paused = True
        return []

    def _on_resumed(self, _event: Resumed) -> list[Instruction]:
        self.paused = self.finishing = False
        self.snooze_until = None
        return []

    def _on_finish_requested(self, _event: FinishRequested) -> list[Instruction]:
        self.paused = self.finishing = True
        return []

    def _on_snoozed(self, event: Snoozed) -> list[Instruction]:
        if not (event.seconds > 0 and math.isfinite(event.seconds)):
            raise ValueError(f"snooze: {event.seconds!r} is not a positive number of seconds")
        self.paused = True
        self.snooze_until = event.now + event.seconds
        return []

    def _on_time_passed(self, event: TimePassed) -> list[Instruction]:
        if self.snooze_until is not None and event.now >= self.snooze_until:
            log.warning("snooze over: fetching again")
            self._on_resumed(Resumed())
        return []

    def _on_job_paused(self, event: JobPaused) -> list[Instruction]:
        """Queued slices of the job go back (as on a stop); running ones end."""
        self.paused_jobs.add(event.job)
        self.tally(event.job)
        returned = tuple(h for h in self.queue if h.lease.job == event.job)
        if not returned:
            return []
        self.queue = collections.deque(h for h in self.queue if h.lease.job != event.job)
        for held in returned:
            self._move(held, LeaseEvent.RETURN)
        return [ReturnLeases(returned)]

    def _on_job_resumed(self, event: JobResumed) -> list[Instruction]:
        self.paused_jobs.discard(event.job)
        return []

    def snooze_left(self, now: float) -> float | None:
        """Seconds until the snooze ends, or None when not snoozed."""
        return None if self.snooze_until is None else max(0.0, self.snooze_until - now)

    def tally(self, job_id: str) -> JobTally:
        # In the order first seen (the oldest go first): the views list jobs in a stable order.
        tally = self.tallies.get(job_id)
        if tally is None:
            tally = self.tallies[job_id] = JobTally(job_id)
            while len(self.tallies) > _TALLIES:
                self.tallies.popitem(last=False)
        job = self.jobs.get(job_id)
        if job is not None and job.name:
            tally.name = job.name
        return tally

    def _record(
        self, lease: SliceLease, started: float, ended: float, outcome: str, code: str = ""
    ) -> SliceRecord:
        job = self.jobs.get(lease.job)
        record = SliceRecord(
            lease.job, job.name if job else "", lease.slice, started, ended, outcome, code
        )
        self.history.append(record)
        return record

    def _on_outbox_failed(self, event: OutboxFailed) -> list[Instruction]:
        if not self.outbox_failing:
            log.error("%s; not fetching new slices until results can be stored", event.error)
        self.outbox_failing = True
        return []

    def _on_outbox_written(self, _event: OutboxWritten) -> list[Instruction]:
        if self.outbox_failing:
            log.warning("the outbox can be written again; fetching resumes")
            self.outbox_failing = False
        return []

    # ------------------------------------------------------------------ fetching

    def _prefetch(self) -> int:
        """Slices leased ahead of the sandboxes: as configured, or (auto) one per sandbox,
        and a batch per sandbox while a job's slices are short (many in flight hide the round
        trips to the scheduler and to the evaluators)."""
        if self.config.prefetch >= 0:
            return self.config.prefetch
        n = self.sandboxes
        if any(wall <= _BATCH_SHORT for wall in self._walls.values()):
            return 2 * n * _BATCH_MAX
        return n

    def _on_fetch_answered(self, event: FetchAnswered) -> list[Instruction]:
        c = self.counters
        c.fetch_seconds += event.seconds
        c.fetch_buckets[bisect.bisect_left(FETCH_BUCKETS, event.seconds)] += 1
        return []

    def _on_slices_leased(self, event: SlicesLeased) -> list[Instruction]:
        work = event.work
        for job in work.jobs:
            if self._spec_changed(job):
                continue  # the first spec stays; the job's slices are refused
            self.jobs[job.job] = job
        for why in work.skipped:
            if (why.subject, why.code) not in self._reported:
                self._reported.add((why.subject, why.code))
                log.info("not offered job %s: %s %s", why.subject, why.code, why.message)
        self._forget_jobs(keep={lease.job for lease in work.slices})
        leased = tuple(HeldLease(lease, event.offered) for lease in work.slices)
        if (self.stopping or self.paused or self.machine_busy) and leased:
            # Stopped, paused or busy while this fetch was parked: give the slices back.
            return [ReturnLeases(leased)]
        unwanted = tuple(h for h in leased if h.lease.job in self.paused_jobs)
        if unwanted:
            # Its job was paused while this fetch was parked (or the scheduler ignored that).
            leased = tuple(h for h in leased if h.lease.job not in self.paused_jobs)
            if not leased:
                return [ReturnLeases(unwanted)]
        for held in leased:
            self.held[held.key] = held
            self.queue.append(held)
            self.tally(held.lease.job)
        if leased:
            log.debug("fetched %d slice(s)", len(leased))
            self._log_first_work(leased)
        return [ReturnLeases(unwanted)] if unwanted else []

    def _log_first_work(self, leased: tuple[HeldLease, ...]) -> None:
        if self._first_work:
            self._first_work = False
            first = leased[0].lease.job
            log.log(
                NOTICE,
                "first work: %d slice(s) leased, of job %s",
                len(leased),
                self._job_label(first),
                extra={"DCP_JOB": first},
            )

    def _job_label(self, job_id: str) -> str:
        job = self.jobs.get(job_id)
        return f"{job.name} ({job_id})" if job is not None and job.name else job_id

    def _forget_jobs(self, keep: set[str]) -> None:
        """Bound the job-spec cache (modules can be large), never dropping a job in use."""
        in_use = keep | {held.lease.job for held in self.held.values()}
        for job_id in list(self.jobs):
            if len(self.jobs) <= _JOB_CACHE:
                break
            if job_id not in in_use:
                del self.jobs[job_id]
                self._walls.pop(job_id, None)

    def _spec_changed(self, job: JobSpec) -> bool:
        """Whether the scheduler sent a different spec for a job it described before (the
        owner, group, runtime or module a slice is checked against would change under it)."""
        fields = {k: v for k, v in dataclasses.asdict(job).items() if k != "module"}
        digest = hashlib.sha256(
            json.dumps(fields, sort_keys=True, default=repr).encode()
        ).hexdigest()
        first = self._prints.setdefault(job.job, digest)
        self._prints.move_to_end(job.job)
        while len(self._prints) > _SPEC_PRINTS:
            self._prints.popitem(last=False)
        if first == digest:
            return False
        if job.job not in self._changed:
            log.warning(
                "the scheduler changed the spec of job %s; refusing its slices (%s)",
                job.job,
                ErrorCode.JOB_SPEC_CHANGED.value,
            )
        self._changed.add(job.job)
        return True

    def _on_leases_lost(self, event: LeasesLost) -> list[Instruction]:
        for ref in event.refs:
            held = self.held.get(LeaseKey(ref.job, ref.slice, ref.token))
            if held is not None:
                held.lost = True
                log.warning("lease on %s/%d lost", ref.job, ref.slice)
        return []

    def _on_leases_returned(self, event: LeasesReturned) -> list[Instruction]:
        for held in event.leases:
            self._move(held, LeaseEvent.RETURNED)
        return []

    def _move(self, held: HeldLease, event: LeaseEvent) -> None:
        try:
            stage = LEASE_TRANSITIONS[(held.stage, event)]
        except KeyError:
            raise IllegalLeaseTransition(held.stage, event) from None
        held.stage = stage
        if stage is LeaseStage.GONE:
            self.held.pop(held.key, None)

    # ------------------------------------------------------------------ running

    def _on_sandbox_free(self, event: SandboxFree) -> list[Instruction]:
        """The next batch for the sandbox: consecutive slices of the head's job, each checked
        again here (never trust the scheduler alone); a refused one reaches no evaluator."""
        first = self.queue.popleft()
        batch = [first]
        size = self._batch_size(first)
        while self.queue and len(batch) < size and self.queue[0].lease.job == first.lease.job:
            batch.append(self.queue.popleft())
        job = self.jobs.get(first.lease.job)
        if job is not None:
            self.jobs.move_to_end(job.job)
        # Once per batch: the terms now and the job's measured cost are the same for each.
        terms = self.worker_terms(event.now)
        cost = None if job is None else self._mean_cost(job.job)
        out: list[Instruction] = []
        runnable: list[HeldLease] = []
        for held in batch:
            if held.lost:
                self._move(held, LeaseEvent.DROP)
                continue
            why = self._slice_refusal(job, held, terms, cost)
            if why is not None:
                self._move(held, LeaseEvent.DECLINE)
                out.append(self._decline(held.lease, why))
                continue
            runnable.append(held)
        if runnable and job is not None:
            for held in runnable:
                self._move(held, LeaseEvent.START)
            self.running += len(runnable)
            head = runnable[0].lease
            self.activity[event.sandbox] = Activity(
                head.job, job.name, head.slice, event.now, runnable[0]
            )
            out.append(Run(event.sandbox, job, self._clamp(job.limits), tuple(runnable)))
        return out

    def _batch_size(self, first: HeldLease) -> int:
        """How many slices of this job one evaluator request should carry: 1 until its slices
        are known to be short, then enough for about 50 ms of work (at most _BATCH_MAX), and
        never more than a fair share of the queue across the sandboxes."""
        job = self.jobs.get(first.lease.job)
        wall = self._walls.get(first.lease.job)
        if job is None or job.runtime != "wasm" or wall is None or wall > _BATCH_SHORT:
            return 1
        fair = -(-(len(self.queue) + 1) // self.sandboxes)
        return max(1, min(_BATCH_MAX, int(_BATCH_WORK / max(wall, 1e-5)), fair))

    def _clamp(self, limits: Limits) -> Limits:
        c = self.config
        return replace(
            limits,
            wall_seconds=min(limits.wall_seconds, c.max_wall_seconds),
            memory_bytes=min(limits.memory_bytes, c.max_memory_bytes),
            output_bytes=min(
                limits.output_bytes, c.max_output_bytes, self.max_result_bytes or MAX_UINT64
            ),
        )

    def _slice_refusal(
        self, job: JobSpec | None, held: HeldLease, now: WorkerTerms, cost: Metrics | None
    ) -> Refusal | None:
        """Why this slice must not run: checked against what the fetch that leased it offered
        (the scheduler may have ignored it) and against the terms ``now`` (a job declined
        since, an OpenCL budget used up). The wage is judged by the worker's own measurements
        (``cost``)."""
        lease = held.lease
        if job is None:
            return Refusal(
                lease.job, ErrorCode.UNKNOWN_SLICE.value, "the scheduler sent no spec for the job"
            )
        if job.job in self.paused_jobs:
            return Refusal(
                job.job,
                ErrorCode.JOB_NOT_ALLOWED.value,
                "paused by the operator (no new work from this job)",
            )
        if job.job in self._changed:
            return Refusal(
                job.job,
                ErrorCode.JOB_SPEC_CHANGED.value,
                "the scheduler sent another spec for this job than before",
            )
        for terms in (held.offered, now):
            why = policy.slice_refusal(job, lease, terms, cost)
            if why is not None:
                return why
        return None

    def _slice_label(self, lease: SliceLease) -> str:
        """How a log line names a slice: by its job's name, which the volunteer knows, and
        its id, which the commands take (``slice 3 of job 'puzzle' (0a1b...)``)."""
        job = self.jobs.get(lease.job)
        if job is not None and job.name:
            return f"slice {lease.slice} of job {job.name!r} ({lease.job})"
        return f"slice {lease.slice} of job {lease.job}"

    def _decline(self, lease: SliceLease, why: Refusal) -> Decline:
        self.counters.declined_slices += 1
        self.counters.reasons["slice_declined", why.code] += 1
        log.warning(
            "refusing %s: %s %s",
            self._slice_label(lease),
            why.code,
            why.message,
            extra=_fields(lease.job, lease.slice, why.code),
        )
        return Decline(lease, why)

    def _on_slice_progressed(self, event: SliceProgressed) -> list[Instruction]:
        if event.fraction != event.held.progress:
            event.held.progressed = event.now
        event.held.progress = event.fraction
        return []

    def _on_batch_finished(self, event: BatchFinished) -> list[Instruction]:
        job = self.jobs.get(event.batch[0].lease.job) if event.batch else None
        if job is not None and job.runtime == "opencl":
            # The batch held an OpenCL slot (the device) for its whole round trip.
            self._opencl_used.append((event.now, event.elapsed))
        # Each slice is charged its evaluator time plus an equal share of the round trip.
        outcomes = event.outcomes
        inside = sum(o.metrics.wall_seconds for o in outcomes if isinstance(o, SliceResult))
        extra = max(0.0, event.elapsed - inside) / len(event.batch)
        out: list[Instruction] = []
        started = event.now - event.elapsed
        for held, outcome in zip(event.batch, outcomes, strict=True):
            out.append(self._outcome(held.lease, outcome, extra, event.now))
            instruction = out[-1]
            tally = self.tally(held.lease.job)
            if isinstance(instruction, KeepResult):
                tally.done += 1
                record = self._record(held.lease, started, event.now, "done")
                self._records[held.key] = record
                if len(self._records) > 4 * HISTORY:  # answers that never came (a lost session)
                    self._records.pop(next(iter(self._records)))
            elif isinstance(instruction, ReportFailure):
                tally.failed += 1
                self._record(held.lease, started, event.now, "failed", instruction.failure.code)
            else:
                code = instruction.why.code if isinstance(instruction, Decline) else ""
                self._record(held.lease, started, event.now, "returned", code)
        return out

    def _outcome(
        self,
        lease: SliceLease,
        outcome: SliceOutcome,
        extra: float,
        now: float,
    ) -> Instruction:
        """One slice's outcome: a result to sign and keep, or its failure to report."""
        if isinstance(outcome, SliceFailure):
            if outcome.code in BUSY_CODES:
                # The machine's owner needs it: give the slice back, lose nothing.
                self._on_machine_busy(MachineBusy(outcome.message))
                return self._decline(lease, Refusal(lease.job, outcome.code, outcome.message))
            self.counters.failed += 1
            self.counters.reasons["slice_failed", outcome.code] += 1
            log.warning(
                "%s failed: %s %s",
                self._slice_label(lease),
                outcome.code,
                outcome.message,
                extra=_fields(lease.job, lease.slice, outcome.code),
            )
            return ReportFailure(lease, outcome)
        result, metrics = outcome.result, outcome.metrics
        inside = metrics.wall_seconds
        metrics = replace(metrics, wall_seconds=inside + extra)
        self.counters.done += 1
        self.finished.append(now)
        previous = self._walls.get(lease.job, inside)
        self._walls[lease.job] = 0.8 * previous + 0.2 * inside
        self._measure(lease, metrics)
        return KeepResult(lease, result, metrics)

    def _on_batch_ended(self, event: BatchEnded) -> list[Instruction]:
        self.activity.pop(event.sandbox, None)
        self.running -= len(event.batch)
        for held in event.batch:
            self._move(held, LeaseEvent.END)
        return []

    # ------------------------------------------------------------------ costs

    def _mean_cost(self, job: str) -> Metrics | None:
        total = self._costs.get(job)
        if total is None:
            return None
        n, m = total
        return Metrics(
            cpu_seconds=m.cpu_seconds / n,
            gpu_seconds=m.gpu_seconds / n,
            bytes_in=m.bytes_in // n,
            bytes_out=m.bytes_out // n,
        )

    def _measure(self, lease: SliceLease, metrics: Metrics) -> None:
        """Keep the job's measured cost; decline the job once it pays below the wage."""
        n, total = self._costs.get(lease.job, (0, Metrics()))
        self._costs[lease.job] = (
            n + 1,
            Metrics(
                cpu_seconds=total.cpu_seconds + metrics.cpu_seconds,
                gpu_seconds=total.gpu_seconds + metrics.gpu_seconds,
                bytes_in=total.bytes_in + metrics.bytes_in,
                bytes_out=total.bytes_out + metrics.bytes_out,
            ),
        )
        mean = self._mean_cost(lease.job)
        assert mean is not None
        price = self.config.min_wage.cost(mean)
        if price > lease.offer and self._declined.get(lease.job, -1.0) < lease.offer:
            self._declined[lease.job] = lease.offer
            log.warning(
                "declining job %s: it offers %g credits per slice, a slice costs %.6g at this "
                "worker's minimum wage (%s)",
                lease.job,
                lease.offer,
                price,
                ErrorCode.WAGE_BELOW_MINIMUM.value,
            )

    # ------------------------------------------------------------------ submitting

    def _on_results_answered(self, event: ResultsAnswered) -> list[Instruction]:
        reply, items = event.reply, event.items
        acks: Iterable[ItemAck]
        if isinstance(reply, ResultsAck) and len(reply.acks) == len(items):
            acks = reply.acks
        else:  # the whole frame was refused (e.g. internal): every result waits and goes again
            code = getattr(reply, "code", reply.type)
            acks = [ItemAck("retry", code=code, message=getattr(reply, "message", ""))] * len(items)
        done: list[LeaseKey] = []
        later: list[Instruction] = []
        for item, ack in zip(items, acks, strict=True):
            record = self._records.pop(item.key, None)
            tally = self.tally(item.job)
            if ack.status in ("accepted", "duplicate"):
                self.counters.accepted += 1
                self.counters.credits += ack.credited
                tally.accepted += 1
                tally.credits += ack.credited
                if record is not None:
                    record.outcome, record.credit = "accepted", ack.credited
                log.debug("result %s/%d %s", item.job, item.slice, ack.status)
                if self._first_result:
                    self._first_result = False
                    log.log(
                        NOTICE,
                        "first result accepted: slice %d of job %s, %g credits",
                        item.slice,
                        self._job_label(item.job),
                        ack.credited,
                        extra={"DCP_JOB": item.job, "DCP_SLICE": item.slice},
                    )
            elif ack.status == "refused" and ack.code in _FINAL_REFUSALS:
                self._count_refused(item, ack.code, ack.message)
                tally.refused += 1
                if record is not None:
                    record.outcome, record.code = "refused", ack.code
            else:
                # Not taken for now (the scheduler's database is busy, say): it stays in the
                # outbox and goes again on this session after a backoff, or on the next one.
                tries = self._retries[item.key] = self._retries.get(item.key, 0) + 1
                self.counters.reasons["result_retried", ack.code] += 1
                delay = self._uniform(0.5, 1.0) * min(0.5 * 2 ** (tries - 1), _RETRY_MAX)
                log.warning(
                    "result %s/%d not accepted now (%s); retrying in %.1f s",
                    item.job,
                    item.slice,
                    ack.code,
                    delay,
                )
                later.append(SubmitLater(item, delay))
                if record is not None:
                    self._records[item.key] = record
                continue
            self._retries.pop(item.key, None)
            done.append(item.key)
        return [*later, RemoveFromOutbox(tuple(done))]

    def _on_result_unsendable(self, event: ResultUnsendable) -> list[Instruction]:
        self._count_refused(event.item, ErrorCode.RESULT_TOO_LARGE.value, event.why)
        self.tally(event.item.job).refused += 1
        record = self._records.pop(event.item.key, None)
        if record is not None:
            record.outcome, record.code = "refused", ErrorCode.RESULT_TOO_LARGE.value
        self._retries.pop(event.item.key, None)
        return [RemoveFromOutbox((event.item.key,))]

    def _count_refused(self, item: PendingResult, code: str, message: str) -> None:
        """A result that can never be accepted: counted and logged (it leaves the outbox)."""
        self.counters.refused += 1
        self.counters.reasons["result_refused", code] += 1
        log.warning(
            "result %s/%d refused: %s %s",
            item.job,
            item.slice,
            code,
            message,
            extra=_fields(item.job, item.slice, code),
        )
