"""The worker supervisor: fetch slices, run them in sandboxes, sign, keep, submit.

Tasks (all owned by :meth:`Supervisor.run`'s task group)::

    connection loop ── session: fetcher, heartbeater, submitter (one set per connection)
    runner x N       ── one per sandbox: queue -> evaluator -> sign -> unsaved list
    persister        ── group commit: unsaved results + acknowledgements -> outbox (fsync)
                        -> submit queue

Stopping: :meth:`stop` (first SIGINT/SIGTERM) stops fetching, returns queued slices, lets
running slices finish, flushes the outbox and ends within ``grace_seconds``;
:meth:`stop_now` (second signal) ends at once, leaving unsent results in the outbox for the
next start.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from dcp_keys.identity import Identity
from dcp_protocol import (
    MAX_RESULTS_PER_FRAME,
    Decline,
    Error,
    ErrorCode,
    Fetch,
    Heartbeat,
    HeartbeatAck,
    ItemAck,
    JobSpec,
    LeaseRef,
    Limits,
    Metrics,
    Refusal,
    ResultItem,
    Results,
    ResultsAck,
    Return,
    SliceFailed,
    SliceLease,
    Work,
    policy,
    result_item_bytes,
    results_frame_bytes,
    signing,
)
from dcp_protocol.policy import WorkerTerms
from evaluator.client import Sandbox, SliceFailure

from .config import WorkerConfig
from .connection import Session, SessionError, open_session
from .outbox import Outbox, OutboxError, PendingResult

__all__ = ["Supervisor", "Statistics"]

log = logging.getLogger("dcp.worker")

_SUBMIT_WINDOW = 8  # result frames in flight (each up to 256 results, max_frame_bytes)
_IDLE_POLL = 1.0
#: How long the scheduler may hold an empty fetch (long poll) before answering.
_LONG_POLL = 10.0
#: Codes of an evaluator manager that holds work (the machine is busy); not the slice's fault.
HELD_CODES = frozenset({ErrorCode.MACHINE_BUSY.value, ErrorCode.EVALUATOR_PREEMPTED.value})
_HELD_BACKOFF = 5.0
_OPENCL_WINDOW = 20 * 60.0
_OUTBOX_RETRY = 2.0
_CLOSE_SECONDS = 2.0
_CLOSE_RESERVE = 5.0  # evaluators 2 s + session 2 s + the last commit
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


@dataclass(frozen=True)
class _Outgoing:
    """A result from the outbox as it goes in a ``results`` frame, with the bytes it takes."""

    pending: PendingResult
    item: ResultItem
    size: int


@dataclass(frozen=True)
class Statistics:
    connected: bool
    fetching: bool
    slices_done: int
    slices_failed: int
    results_accepted: int
    results_refused: int
    credits_earned: float
    slices_declined: int
    #: Why the evaluator manager holds work now ("" while it does not).
    held_reason: str
    queued: int
    running: int
    outbox: int


class _SliceQueue:
    """Leased slices waiting for a sandbox, first in first out; a runner may take several
    consecutive slices of one job at once (a batch)."""

    def __init__(self) -> None:
        self._items: collections.deque[_Held] = collections.deque()
        self._ready = asyncio.Event()

    def put_nowait(self, item: _Held) -> None:
        self._items.append(item)
        self._ready.set()

    async def get(self) -> _Held:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()

    def get_nowait(self) -> _Held:
        return self._items.popleft()

    def take(self, job: str, n: int) -> list[_Held]:
        """Up to ``n`` more slices of ``job`` from the head of the queue."""
        taken: list[_Held] = []
        while self._items and len(taken) < n and self._items[0].lease.job == job:
            taken.append(self._items.popleft())
        return taken

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items


@dataclass
class _Activity:
    """What one sandbox is doing, for the dashboard and ``status``."""

    job: str
    job_name: str
    slice: int
    started: float
    held: _Held


@dataclass
class _Held:
    lease: SliceLease
    #: What this worker offered in the fetch that leased the slice.
    offered: WorkerTerms
    lost: bool = False
    progress: float | None = None


FETCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class _Counters:
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


def backoff(
    max_delay: float,
    initial: float = 0.25,
    factor: float = 2.0,
    *,
    bound: Callable[[], float] = lambda: math.inf,
    uniform: Callable[[float, float], float] = random.uniform,
) -> Iterator[float]:
    """Reconnect delays: exponential with full jitter, capped (as websockets' ``backoff``).

    ``bound()`` caps each delay when it is drawn: the supervisor keeps delays well under the
    scheduler's lease timeout while results wait, so a restarted scheduler sees the worker
    back before its leases expire (a 30 s cap once made a 15 s restart cost every held lease).
    """
    delay = initial
    while True:
        yield uniform(0, min(delay, bound()))
        delay = min(delay * factor, max_delay)


class Supervisor:
    def __init__(
        self, config: WorkerConfig, identity: Identity, evaluator_command: list[str] | None = None
    ) -> None:
        self.config = config
        self.identity = identity
        self.payment_address = signing.checksum(config.payment_address or identity.address)
        self.outbox = Outbox(config.outbox_path)
        self.sandboxes = [
            Sandbox(
                i,
                evaluator_command,
                config.slices_per_evaluator,
                endpoint=config.evaluator or None,
                token_file=config.evaluator_token_file,
            )
            for i in range(config.effective_sandboxes)
        ]
        self._jobs: OrderedDict[str, JobSpec] = OrderedDict()
        #: Job -> a fingerprint of the first spec the scheduler sent for it (kept after the
        #: spec itself is dropped from the cache): a job's spec never changes.
        self._prints: OrderedDict[str, str] = OrderedDict()
        #: Jobs whose spec the scheduler changed: their slices are refused.
        self._changed: set[str] = set()
        self._queue = _SliceQueue()
        #: Job -> a moving average of its slices' evaluator wall time (sizes batches).
        self._walls: dict[str, float] = {}
        self._held: dict[tuple[str, int, str], _Held] = {}
        self._session: Session | None = None
        self._submit_q: asyncio.Queue[PendingResult] | None = None
        self._inflight: set[tuple[str, int, str]] = set()
        #: Results the scheduler could not take for now (``internal``): tries so far, by key.
        self._retries: dict[tuple[str, int, str], int] = {}
        self._capacity = asyncio.Event()
        self._slice_ended = asyncio.Event()
        self._running = 0
        self._outbox_changed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._stop_now = asyncio.Event()
        self._counters = _Counters()
        self._capabilities: dict[str, Any] = {}
        self._declined: dict[str, float] = {}  # job -> the offer it was declined at
        self._costs: dict[str, tuple[int, Metrics]] = {}  # job -> (slices, summed metrics)
        self._reported: set[tuple[str, str]] = set()
        self._held_until = 0.0  # monotonic time until which the manager holds work
        # A GPU (or the OpenCL device) is lent to this many slices at once.
        self._opencl_slots = asyncio.Semaphore(max(1, config.opencl_slots))
        self._outbox_failing = False  # the last commit failed (a full disk): do not fetch
        self._opencl_used: collections.deque[tuple[float, float]] = collections.deque()
        # Until the evaluator says which user it runs as: a guess for evaluators started here.
        local_root = (
            not config.evaluator
            and os.geteuid() == 0
            and self.sandboxes[0].hardening.target_ids() is None
        )
        self._opencl_privileged = local_root and not config.opencl_as_root
        self._opencl_off = config.opencl_slots == 0  # --cores N,0: lend no GPU
        self._activity: dict[int, _Activity] = {}  # sandbox index -> its slice
        self._finished: collections.deque[float] = collections.deque(maxlen=10_000)
        self._paused = False
        self._resumed = asyncio.Event()
        self._started = time.time()
        self._lease_timeout: float | None = None  # the last scheduler's, from its welcome
        self.held_reason = ""
        self.exit_reason = ""
        self.evaluator_broken = False
        self._fatal: SessionError | None = None
        # Group commit: results not yet on disk, and acknowledged keys not yet deleted.
        self._unsaved: list[PendingResult] = []
        self._acked: list[tuple[str, int, str]] = []
        self._persist_wanted = asyncio.Event()
        self._unsent = len(self.outbox)  # results on disk, not yet acknowledged
        self._saving = 0  # results in the commit under way

    # ------------------------------------------------------------------ public

    def statistics(self) -> Statistics:
        running = self._running
        return Statistics(
            connected=self._session is not None,
            fetching=not self._stopping.is_set(),
            slices_done=self._counters.done,
            slices_failed=self._counters.failed,
            results_accepted=self._counters.accepted,
            results_refused=self._counters.refused,
            credits_earned=self._counters.credits,
            slices_declined=self._counters.declined_slices,
            held_reason=self.held_reason,
            queued=self._queue.qsize(),
            running=running,
            outbox=self._undelivered(),
        )

    def snapshot(self) -> dict[str, Any]:
        """Everything the dashboard, ``dcp-worker status`` and the metrics show (JSON-able)."""
        now = time.monotonic()
        stats = self.statistics()
        minute = sum(1 for t in self._finished if t > now - 60)
        if self._stop_now.is_set():
            state = "stopping now"
        elif self._stopping.is_set():
            state = "stopping"
        elif self._paused:
            state = "paused"
        elif self._held_until > now:
            state = "held"
        elif self._running:
            state = "working"
        else:
            state = "fetching" if stats.connected else "connecting"
        sandboxes = []
        for sandbox in self.sandboxes:
            act = self._activity.get(sandbox.index)
            sandboxes.append(
                {"index": sandbox.index, "state": "idle"}
                if act is None
                else {
                    "index": sandbox.index,
                    "state": "working",
                    "job": act.job,
                    "job_name": act.job_name,
                    "slice": act.slice,
                    "progress": act.held.progress,
                    "elapsed": round(now - act.started, 3),
                }
            )
        return {
            "state": state,
            "scheduler": self.config.scheduler,
            "identity": self.identity.address,
            "payment_address": self.payment_address,
            "groups": sorted(self.config.group_hashes()),
            "public_group": not self.config.leave_public_group,
            "uptime": round(time.time() - self._started, 1),
            "slices_per_minute": minute,
            "statistics": dataclasses.asdict(stats),
            "sandboxes": sandboxes,
        }

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self) -> None:
        """Stop fetching; running and queued slices go on."""
        if not self._paused:
            log.warning("paused: no new slices until resumed")
        self._paused = True
        self._resumed.clear()

    def resume(self) -> None:
        if self._paused:
            log.warning("resumed")
        self._paused = False
        self._resumed.set()

    @property
    def stopped_now(self) -> bool:
        """An immediate stop was asked for (second signal, SIGQUIT, or a refusal)."""
        return self._stop_now.is_set()

    @property
    def refused(self) -> SessionError | None:
        """Why the scheduler refused this worker for good, if it did."""
        return self._fatal

    def stop(self) -> None:
        """Graceful stop: stop fetching, return queued slices, finish, flush, exit."""
        if not self._stopping.is_set():
            log.info(
                "stopping: no new slices; finishing running ones (grace %g s)",
                self.config.grace_seconds,
            )
        self._stopping.set()
        self._capacity.set()

    def stop_now(self) -> None:
        """Immediate stop: unsent results stay in the outbox for the next start."""
        log.warning("stopping now")
        self._stopping.set()
        self._stop_now.set()
        self._capacity.set()

    async def run(self) -> bool:
        """Work until stopped. Returns True when everything was flushed (a clean stop)."""
        died = 0
        while True:
            describe = asyncio.ensure_future(self.sandboxes[0].describe())
            stopping = asyncio.ensure_future(self._stopping.wait())
            await asyncio.wait({describe, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not describe.done():  # stopped while the evaluator starts: nothing to wait for
                describe.cancel()
                with contextlib.suppress(asyncio.CancelledError, SliceFailure):
                    await describe
                await self._close()
                return self._unsent == 0 and not self._stop_now.is_set()
            try:
                self._capabilities = describe.result()
                self._machine_released()
                break
            except SliceFailure as exc:
                if exc.code == ErrorCode.EVALUATOR_DIED.value and died < 2:
                    died += 1  # killed from outside (an OOM killer, an operator): once more
                    log.warning("the evaluator died while starting (%s); starting another", exc)
                    continue
                if exc.code not in HELD_CODES:
                    log.error("the evaluator does not start: %s", exc)
                    self.exit_reason = f"the evaluator does not start: {exc}"
                    self.evaluator_broken = True
                    await self._close()
                    return False
                self._machine_held(exc.message)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), _HELD_BACKOFF)
                if self._stopping.is_set():
                    await self._close()
                    return self._unsent == 0
        uid = self._capabilities.get("uid")
        if isinstance(uid, int) and not isinstance(uid, bool):
            # Measured by the evaluator, here or behind a manager (whose own rule may differ).
            self._opencl_privileged = uid == 0 and not self.config.opencl_as_root
        for runtime, why in self._capabilities.get("withheld", {}).items():
            log.warning("the evaluator manager does not offer %s: %s", runtime, why)
        if self._opencl_privileged and "opencl" in self._capabilities.get("runtimes", {}):
            log.warning(
                "OpenCL is not offered: evaluators would run kernels as root (no "
                "unprivileged account to drop to); see opencl_as_root"
            )
        log.info(
            "worker %s paying %s, %d sandbox(es), outbox %s (%d pending)",
            self.identity.address,
            self.payment_address,
            len(self.sandboxes),
            self.outbox.path,
            len(self.outbox),
        )
        try:
            async with asyncio.TaskGroup() as tg:
                runners = [tg.create_task(self._runner(s)) for s in self.sandboxes]
                runners.append(tg.create_task(self._persister()))
                conn = tg.create_task(self._connection_loop())
                await self._stopping.wait()
                # The whole stop fits in grace_seconds: closing takes up to _CLOSE_RESERVE more.
                grace = max(1.0, self.config.grace_seconds - _CLOSE_RESERVE)
                await self._wait_for(self._graceful_end(), grace)
                if self._stop_now.is_set():
                    await self._return_everything()
                conn.cancel()
                for task in runners:
                    task.cancel()
        finally:
            await self._close()
        return self._unsent == 0 and not self._stop_now.is_set() and self._fatal is None

    async def _wait_for(self, coro: Any, timeout: float) -> None:
        task = asyncio.ensure_future(coro)
        stop_now = asyncio.ensure_future(self._stop_now.wait())
        try:
            await asyncio.wait(
                {task, stop_now}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for t in (task, stop_now):
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
        if not task.done() or task.cancelled():
            log.warning(
                "graceful stop did not complete: %d result(s) stay in the outbox",
                self._undelivered(),
            )

    async def _graceful_end(self) -> None:
        # 1. Return slices that never started. 2. Wait for running slices. 3. Flush.
        returned = []
        while not self._queue.empty():
            returned.append(self._queue.get_nowait().lease)
        if returned and self._session is not None:
            with contextlib.suppress(SessionError):
                leases = tuple(_ref(lease) for lease in returned)
                await self._session.request(partial(Return, leases=leases))
                log.info("returned %d queued slice(s)", len(returned))
        # Forgotten only once given back: an immediate stop meanwhile returns them itself.
        for lease in returned:
            self._held.pop(_key(lease), None)
        while self._running:
            self._slice_ended.clear()
            await self._slice_ended.wait()
        while self._undelivered() and self._fatal is None:
            self._outbox_changed.clear()
            await self._outbox_changed.wait()

    async def _return_everything(self) -> None:
        """Immediate stop: give back every lease held, queued or running (best effort, 2 s);
        a lease not returned expires and its slice runs again elsewhere."""
        session = self._session
        leases = tuple(_ref(held.lease) for held in self._held.values())
        if session is None or not leases:
            return
        with contextlib.suppress(SessionError, TimeoutError):
            await asyncio.wait_for(session.request(partial(Return, leases=leases)), 2.0)
            log.warning("returned %d slice(s) on an immediate stop", len(leases))

    async def _close(self) -> None:
        # Bounded: evaluators get 2 s together, the session 2 s (a dead peer cannot hold us).
        await asyncio.gather(
            *(sandbox.stop(graceful=not self._stop_now.is_set()) for sandbox in self.sandboxes)
        )
        if self._session is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._session.close(), _CLOSE_SECONDS)
        # Whatever finished but was not committed yet still goes to disk.
        try:
            self.outbox.commit(self._unsaved, self._acked)
            self._unsaved, self._acked = [], []
        except OutboxError as exc:
            log.error(
                "%s: %d finished result(s) could not be stored and will be computed again",
                exc,
                len(self._unsaved),
            )
        try:
            self._unsent = len(self.outbox)  # exact, whatever a cancelled commit managed
        finally:
            self.outbox.close()

    # ------------------------------------------------------------------ connection

    def _reconnect_bound(self) -> float:
        """The longest reconnect delay now: a fraction of the lease timeout while slices are
        held or results wait (they are lost to the lease, or refused as stale, past it)."""
        if self._lease_timeout is None or not (self._held or self._undelivered()):
            return math.inf
        return self._lease_timeout / _RECONNECTS_PER_LEASE

    def _backoff(self) -> Iterator[float]:
        return backoff(self.config.reconnect_max_delay, bound=self._reconnect_bound)

    async def _connection_loop(self) -> None:
        delays = self._backoff()
        while True:
            try:
                session = await open_session(
                    self.config.scheduler,
                    self.identity,
                    self.payment_address,
                    groups=self.config.group_hashes(),
                    leave_public_group=self.config.leave_public_group,
                )
            except SessionError as exc:
                if exc.fatal:
                    log.error("%s; giving up", exc)
                    self._fatal = exc
                    self.exit_reason = str(exc)
                    self.stop_now()
                    return
                delay = next(delays)
                if self._stopping.is_set():
                    delay = min(delay, 1.0)  # stopping: results wait to be flushed
                log.warning("%s; retrying in %.1f s", exc, delay)
                if self._stopping.is_set():
                    await asyncio.sleep(delay)
                else:  # a stop cuts the wait short, to flush the outbox sooner
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), delay)
                continue
            delays = self._backoff()
            self._lease_timeout = session.welcome.lease_timeout
            log.info("connected to %s as %s", self.config.scheduler, session.welcome.address)
            self._session = session
            self._submit_q = asyncio.Queue()
            self._inflight.clear()
            for item in self.outbox.pending():
                self._submit_q.put_nowait(item)
            try:
                async with asyncio.TaskGroup() as tg:
                    tasks = [
                        tg.create_task(self._fetcher(session)),
                        tg.create_task(self._heartbeater(session)),
                        tg.create_task(self._submitter(session, self._submit_q, tg)),
                    ]
                    await session.closed.wait()
                    for task in tasks:
                        task.cancel()
            except* SessionError as group:
                log.warning("session lost: %s", group.exceptions[0])
            finally:
                self._session = None
                self._submit_q = None
                await session.close()
            log.warning("disconnected from the scheduler; reconnecting")

    async def _fetcher(self, session: Session) -> None:
        while not self._stopping.is_set():
            if self._outbox_failing:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), _OUTBOX_RETRY)
                continue
            if self._paused:
                waits = {
                    asyncio.ensure_future(self._stopping.wait()),
                    asyncio.ensure_future(self._resumed.wait()),
                }
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waits:
                        w.cancel()
                continue
            if self._held_until > time.monotonic():
                await self._wait_released()  # fetch nothing the manager would refuse
                continue
            want = len(self.sandboxes) + self._prefetch()
            held = self._queue.qsize() + self._running
            deficit = want - held
            # A deep window is refilled in chunks, not a fetch per finished slice.
            if deficit <= 0 or (held and deficit < want // 4):
                self._capacity.clear()
                await self._capacity.wait()
                continue
            asked = time.monotonic()
            # The fetch says exactly what these terms hold; its slices are checked against them.
            offered = self._worker_terms()
            reply = await session.request(
                partial(
                    Fetch,
                    max_slices=deficit,
                    capabilities=dict(offered.capabilities),
                    known_jobs=tuple(self._jobs),
                    wait_seconds=_LONG_POLL,
                    min_wage=offered.min_wage,
                    allowed_jobs=tuple(sorted(offered.allowed_jobs)),
                    allowed_owners=tuple(sorted(offered.allowed_owners)),
                    declined=tuple(Decline(j, o) for j, o in offered.declined.items()),
                )
            )
            self._fetch_took(time.monotonic() - asked)
            if isinstance(reply, Error):
                log.warning("fetch refused: %s %s", reply.code, reply.message)
                await asyncio.sleep(_IDLE_POLL)
                continue
            if not isinstance(reply, Work):
                raise SessionError(f"the scheduler answered a fetch with {reply.type}")
            for job in reply.jobs:
                if self._spec_changed(job):
                    continue  # the first spec stays; the job's slices are refused
                self._jobs[job.job] = job
            for why in reply.skipped:
                if (why.subject, why.code) not in self._reported:
                    self._reported.add((why.subject, why.code))
                    log.info("not offered job %s: %s %s", why.subject, why.code, why.message)
            self._forget_jobs(keep={lease.job for lease in reply.slices})
            held = self._held_until > time.monotonic()
            if (self._stopping.is_set() or self._paused or held) and reply.slices:
                # Stopped, paused or held while this fetch was parked: give the slices back.
                leases = tuple(_ref(lease) for lease in reply.slices)
                await session.request(partial(Return, leases=leases))
                if self._stopping.is_set():
                    return
                continue
            for lease in reply.slices:
                held_slice = _Held(lease, offered)
                self._held[_key(lease)] = held_slice
                self._queue.put_nowait(held_slice)
            if reply.slices:
                log.debug("fetched %d slice(s)", len(reply.slices))

    def _prefetch(self) -> int:
        """Slices leased ahead of the sandboxes: as configured, or (auto) one per sandbox,
        and a batch per sandbox while a job's slices are short (many in flight hide the round
        trips to the scheduler and to the evaluators)."""
        if self.config.prefetch >= 0:
            return self.config.prefetch
        n = len(self.sandboxes)
        if any(wall <= _BATCH_SHORT for wall in self._walls.values()):
            return 2 * n * _BATCH_MAX
        return n

    def _fetch_took(self, seconds: float) -> None:
        c = self._counters
        c.fetch_seconds += seconds
        c.fetch_buckets[bisect.bisect_left(FETCH_BUCKETS, seconds)] += 1

    def metrics(self) -> _Counters:
        """The running counters (read-only, for the metrics endpoint)."""
        return self._counters

    def _forget_jobs(self, keep: set[str]) -> None:
        """Bound the job-spec cache (modules can be large), never dropping a job in use."""
        in_use = keep | {held.lease.job for held in self._held.values()}
        for job_id in list(self._jobs):
            if len(self._jobs) <= _JOB_CACHE:
                break
            if job_id not in in_use:
                del self._jobs[job_id]
                self._walls.pop(job_id, None)

    async def _heartbeater(self, session: Session) -> None:
        interval = session.welcome.heartbeat_interval
        while True:
            await asyncio.sleep(interval)
            refs = tuple(_ref(h.lease, h.progress) for h in self._held.values())
            if not refs:
                continue
            reply = await session.request(partial(Heartbeat, leases=refs))
            if isinstance(reply, HeartbeatAck):
                for ref in reply.lost:
                    held = self._held.get((ref.job, ref.slice, ref.token))
                    if held is not None:
                        held.lost = True
                        log.warning("lease on %s/%d lost", ref.job, ref.slice)

    async def _submitter(
        self, session: Session, queue: asyncio.Queue[PendingResult], tg: asyncio.TaskGroup
    ) -> None:
        # Up to _SUBMIT_WINDOW frames in flight; results that queue up meanwhile go together
        # in the next frame (one round trip and one scheduler transaction for many), as many
        # as fit in the session's max_frame_bytes (a result that does not waits for the next).
        window = asyncio.Semaphore(_SUBMIT_WINDOW)
        limit = session.max_frame_bytes
        next_up: _Outgoing | None = None
        while True:
            first = next_up or self._outgoing(session, await queue.get())
            next_up = None
            if first is None:
                continue
            await window.acquire()
            batch, size, keys = [first], first.size, {first.pending.key}
            while len(batch) < MAX_RESULTS_PER_FRAME and not queue.empty():
                more = self._outgoing(session, queue.get_nowait())
                if more is None or more.pending.key in keys:
                    continue
                if results_frame_bytes(size + more.size, len(batch) + 1) > limit:
                    next_up = more
                    break
                batch.append(more)
                size += more.size
                keys.add(more.pending.key)
            self._inflight.update(keys)
            tg.create_task(self._submit(session, batch, window))

    def _outgoing(self, session: Session, pending: PendingResult) -> _Outgoing | None:
        """``pending`` as it will go in a ``results`` frame, with its size; None when it is
        in flight already, or can never go on this session's frames (dropped from the
        outbox as ``result_too_large``, as the scheduler would refuse it)."""
        if pending.key in self._inflight:
            return None
        item = ResultItem(
            job=pending.job,
            slice=pending.slice,
            token=pending.token,
            result=pending.result,
            payment_address=pending.payment_address,
            signature=pending.signature,
            metrics=pending.metrics,
        )
        size = result_item_bytes(item)
        limit = session.welcome.max_result_bytes
        if len(pending.result) > limit:
            why = f"{len(pending.result)} bytes, above max_result_bytes {limit} (not sent)"
        elif results_frame_bytes(size, 1) > session.max_frame_bytes:
            why = f"a frame of {results_frame_bytes(size, 1)} bytes, above max_frame_bytes"
        else:
            return _Outgoing(pending, item, size)
        self._drop_refused(pending, ErrorCode.RESULT_TOO_LARGE.value, why)
        self._persist_wanted.set()
        return None

    def _drop_refused(self, item: PendingResult, code: str, message: str) -> None:
        """A result that can never be accepted leaves the outbox (at the next commit)."""
        self._counters.refused += 1
        self._counters.reasons["result_refused", code] += 1
        log.warning(
            "result %s/%d refused: %s %s",
            item.job,
            item.slice,
            code,
            message,
            extra=_fields(item.job, item.slice, code),
        )
        self._retries.pop(item.key, None)
        self._acked.append(item.key)

    async def _submit(
        self, session: Session, batch: list[_Outgoing], window: asyncio.Semaphore
    ) -> None:
        try:
            reply = await session.request(
                lambda rid: Results(id=rid, results=tuple(out.item for out in batch))
            )
        finally:
            window.release()
            self._inflight.difference_update(out.pending.key for out in batch)
        if isinstance(reply, ResultsAck) and len(reply.acks) == len(batch):
            acks = list(reply.acks)
        else:  # the whole frame was refused (e.g. internal): every result waits and goes again
            code = getattr(reply, "code", reply.type)
            acks = [ItemAck("retry", code=code, message=getattr(reply, "message", ""))] * len(batch)
        for item, ack in zip((out.pending for out in batch), acks, strict=True):
            if ack.status in ("accepted", "duplicate"):
                self._counters.accepted += 1
                self._counters.credits += ack.credited
                log.debug("result %s/%d %s", item.job, item.slice, ack.status)
            elif ack.status == "refused" and ack.code in _FINAL_REFUSALS:
                self._drop_refused(item, ack.code, ack.message)
                continue
            else:
                # Not taken for now (the scheduler's database is busy, say): it stays in the
                # outbox and goes again on this session after a backoff, or on the next one.
                tries = self._retries[item.key] = self._retries.get(item.key, 0) + 1
                self._counters.reasons["result_retried", ack.code] += 1
                delay = random.uniform(0.5, 1.0) * min(0.5 * 2 ** (tries - 1), _RETRY_MAX)
                log.warning(
                    "result %s/%d not accepted now (%s); retrying in %.1f s",
                    item.job,
                    item.slice,
                    ack.code,
                    delay,
                )
                asyncio.get_running_loop().call_later(delay, self._resubmit, session, item)
                continue
            self._retries.pop(item.key, None)
            self._acked.append(item.key)
        self._persist_wanted.set()

    def _resubmit(self, session: Session, item: PendingResult) -> None:
        # A new session sends everything in the outbox anyway.
        if self._session is session and self._submit_q is not None:
            self._submit_q.put_nowait(item)

    # ------------------------------------------------------------------ running

    def _clamp(self, limits: Limits) -> Limits:
        c = self.config
        return replace(
            limits,
            wall_seconds=min(limits.wall_seconds, c.max_wall_seconds),
            memory_bytes=min(limits.memory_bytes, c.max_memory_bytes),
            output_bytes=min(limits.output_bytes, c.max_output_bytes),
        )

    def _undelivered(self) -> int:
        """Results computed and not yet acknowledged, wherever they are."""
        return len(self._unsaved) + self._saving + self._unsent

    async def _persister(self) -> None:
        """Group commit: one transaction (one fsync) for everything finished or acknowledged
        since the last one; results are submitted only once committed."""
        while True:
            await self._persist_wanted.wait()
            self._persist_wanted.clear()
            puts, self._unsaved = self._unsaved, []
            removes, self._acked = self._acked, []
            self._saving = len(puts)
            try:
                removed = await asyncio.to_thread(self.outbox.commit, puts, removes)
            except OutboxError as exc:
                # A full (or failing) disk: keep what we have in memory, stop taking work we
                # could not keep, and try again shortly. Nothing is submitted until it is on disk.
                self._unsaved[:0], self._acked[:0] = puts, removes
                if not self._outbox_failing:
                    log.error("%s; not fetching new slices until results can be stored", exc)
                self._outbox_failing = True
                await asyncio.sleep(_OUTBOX_RETRY)
                self._persist_wanted.set()
                continue
            except BaseException:
                self._unsaved[:0], self._acked[:0] = puts, removes  # kept for _close
                raise
            finally:
                self._saving = 0
            if self._outbox_failing:
                log.warning("the outbox can be written again; fetching resumes")
                self._outbox_failing = False
            self._unsent += len(puts) - removed
            if self._submit_q is not None:
                for item in puts:
                    self._submit_q.put_nowait(item)
            self._outbox_changed.set()

    async def _runner(self, sandbox: Sandbox) -> None:
        while True:
            first = await self._queue.get()
            batch = [first, *self._queue.take(first.lease.job, self._batch_size(first) - 1)]
            self._capacity.set()
            job = self._jobs.get(first.lease.job)
            if job is not None:
                self._jobs.move_to_end(job.job)
            runnable = []
            # Once per batch: the terms now and the job's measured cost are the same for each.
            terms = self._worker_terms()
            cost = None if job is None else self._mean_cost(job.job)
            for held in batch:
                lease = held.lease
                if held.lost:
                    self._held.pop(_key(lease), None)
                    continue
                why = self._slice_refusal(job, held, terms, cost)
                if why is not None:
                    # Never trust the scheduler alone: this slice reaches no evaluator.
                    self._held.pop(_key(lease), None)
                    self._capacity.set()
                    await self._refuse(lease, why)
                    continue
                runnable.append(held)
            if runnable and job is not None:
                await self._run(sandbox, job, runnable)

    def _batch_size(self, first: _Held) -> int:
        """How many slices of this job one evaluator request should carry: 1 until its slices
        are known to be short, then enough for about 50 ms of work (at most _BATCH_MAX), and
        never more than a fair share of the queue across the sandboxes."""
        job = self._jobs.get(first.lease.job)
        wall = self._walls.get(first.lease.job)
        if job is None or job.runtime != "wasm" or wall is None or wall > _BATCH_SHORT:
            return 1
        fair = -(-(self._queue.qsize() + 1) // len(self.sandboxes))
        return max(1, min(_BATCH_MAX, int(_BATCH_WORK / max(wall, 1e-5)), fair))

    async def _run(self, sandbox: Sandbox, job: JobSpec, batch: list[_Held]) -> None:
        first = batch[0].lease
        self._running += len(batch)
        self._activity[sandbox.index] = _Activity(
            first.job, job.name, first.slice, time.monotonic(), batch[0]
        )
        log.debug(
            "running slice %s/%d (attempt %d)%s",
            first.job,
            first.slice,
            first.attempt,
            f" and {len(batch) - 1} more in one batch" if len(batch) > 1 else "",
            extra=_fields(first.job, first.slice),
        )
        try:
            outcomes: list[tuple[bytes, Metrics] | SliceFailure]
            limits = self._clamp(job.limits)

            def progress(index: int, fraction: float) -> None:
                batch[index].progress = fraction

            items = [(held.lease.slice, held.lease.datum) for held in batch]
            started = time.monotonic()
            if job.runtime == "opencl":
                async with self._opencl_slots:
                    outcomes = await sandbox.run_batch(job, limits, items, progress)
            else:
                outcomes = await sandbox.run_batch(job, limits, items, progress)
            elapsed = time.monotonic() - started
            # Each slice is charged its evaluator time plus an equal share of the round trip.
            inside = sum(o[1].wall_seconds for o in outcomes if not isinstance(o, BaseException))
            extra = max(0.0, elapsed - inside) / len(batch)
            for held, outcome in zip(batch, outcomes, strict=True):
                await self._settle(held.lease, outcome, extra)
        finally:
            self._activity.pop(sandbox.index, None)
            self._running -= len(batch)
            for held in batch:
                self._held.pop(_key(held.lease), None)
            self._capacity.set()
            self._slice_ended.set()

    async def _settle(
        self, lease: SliceLease, outcome: tuple[bytes, Metrics] | SliceFailure, extra: float
    ) -> None:
        """One slice's outcome: a signed result for the outbox, or its failure reported."""
        if isinstance(outcome, SliceFailure):
            exc = outcome
            if exc.code in HELD_CODES:
                # The machine's owner needs it: give the slice back, lose nothing.
                self._machine_held(exc.message)
                await self._refuse(lease, Refusal(lease.job, exc.code, exc.message))
                return
            self._counters.failed += 1
            self._counters.reasons["slice_failed", exc.code] += 1
            log.warning(
                "slice %s/%d failed: %s %s",
                lease.job,
                lease.slice,
                exc.code,
                exc.message,
                extra=_fields(lease.job, lease.slice, exc.code),
            )
            await self._report_failure(lease, exc)
            return
        result, metrics = outcome
        inside = metrics.wall_seconds
        metrics = replace(metrics, wall_seconds=inside + extra)
        payload = signing.result_payload(
            lease.job, lease.slice, lease.token, result, self.payment_address
        )
        self._unsaved.append(
            PendingResult(
                lease.job,
                lease.slice,
                lease.token,
                result,
                self.identity.sign(payload),
                self.payment_address,
                metrics,
            )
        )
        self._persist_wanted.set()
        self._counters.done += 1
        self._finished.append(time.monotonic())
        previous = self._walls.get(lease.job, inside)
        self._walls[lease.job] = 0.8 * previous + 0.2 * inside
        self._measure(lease, metrics)

    # ------------------------------------------------------------------ policy

    def _worker_terms(self) -> WorkerTerms:
        c = self.config
        return WorkerTerms(
            groups=frozenset(c.group_hashes()),
            leave_public_group=c.leave_public_group,
            capabilities=self._offered_capabilities(),
            min_wage=c.min_wage,
            allowed_jobs=frozenset(c.job_ids),
            allowed_owners=frozenset(c.job_owners),
            declined=dict(self._declined),
        )

    def _offered_capabilities(self) -> dict[str, Any]:
        """The evaluator's capabilities, less OpenCL while its time budget is used up or when
        kernels would run as root."""
        if not (self._opencl_over_budget() or self._opencl_privileged or self._opencl_off):
            return self._capabilities
        runtimes = {
            k: v for k, v in self._capabilities.get("runtimes", {}).items() if k != "opencl"
        }
        return {**self._capabilities, "runtimes": runtimes}

    def _opencl_over_budget(self) -> bool:
        """DCP's rule: OpenCL (GPU) work may use ``opencl_share`` of a 20-minute window."""
        if self.config.opencl_share >= 1.0:
            return False
        horizon = time.monotonic() - _OPENCL_WINDOW
        while self._opencl_used and self._opencl_used[0][0] < horizon:
            self._opencl_used.popleft()
        used = sum(seconds for _t, seconds in self._opencl_used)
        return used >= self.config.opencl_share * _OPENCL_WINDOW

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

    def _slice_refusal(
        self, job: JobSpec | None, held: _Held, now: WorkerTerms, cost: Metrics | None
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

    def _machine_held(self, reason: str) -> None:
        """The evaluator manager holds work: fetch nothing until it lets work through again
        (logged once per hold, and when its reason changes)."""
        if self._held_until <= time.monotonic() or reason != self.held_reason:
            log.warning("work held by the evaluator manager: %s", reason)
        self._held_until = math.inf
        self.held_reason = reason

    def _machine_released(self) -> None:
        if self._held_until > time.monotonic():
            log.warning("work resumes: the evaluator manager starts evaluators again")
        self._held_until = 0.0
        self.held_reason = ""

    async def _wait_released(self) -> None:
        """While held: ask the manager again every _HELD_BACKOFF s (a describe on a connection
        of its own, beside the runners'), until it serves one or the worker stops."""
        probe = self.sandboxes[0].spare()
        while self._held_until > time.monotonic() and not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), _HELD_BACKOFF)
            if self._stopping.is_set():
                return
            try:
                await probe.describe()
            except SliceFailure as exc:
                # A manager that cannot be reached holds work too: nothing could run.
                held = exc.code in HELD_CODES
                self._machine_held(exc.message if held else f"{exc.code}: {exc.message}")
                continue
            finally:
                await probe.stop()
            self._machine_released()

    async def _refuse(self, lease: SliceLease, why: Refusal) -> None:
        self._counters.declined_slices += 1
        self._counters.reasons["slice_declined", why.code] += 1
        log.warning(
            "refusing slice %s/%d: %s %s",
            lease.job,
            lease.slice,
            why.code,
            why.message,
            extra=_fields(lease.job, lease.slice, why.code),
        )
        session = self._session
        if session is None:
            return  # the lease expires; the scheduler will not offer it again after a refusal
        with contextlib.suppress(SessionError):
            await session.request(
                partial(Return, leases=(_ref(lease),), code=why.code, message=why.message)
            )

    async def _report_failure(self, lease: SliceLease, exc: SliceFailure) -> None:
        session = self._session
        if session is None:
            return  # the lease will expire and the slice run again
        with contextlib.suppress(SessionError):
            await session.request(
                lambda rid: SliceFailed(
                    id=rid,
                    job=lease.job,
                    slice=lease.slice,
                    token=lease.token,
                    code=exc.code,
                    message=exc.message[:2000],
                )
            )


def _fields(job: str, slice_: int, code: str | None = None) -> dict[str, object]:
    """Structured log fields (the journal keeps them: ``journalctl DCP_JOB=...``)."""
    fields: dict[str, object] = {"DCP_JOB": job, "DCP_SLICE": slice_}
    if code is not None:
        fields["DCP_CODE"] = code
    return fields


def _key(lease: SliceLease) -> tuple[str, int, str]:
    return (lease.job, lease.slice, lease.token)


def _ref(lease: SliceLease, progress: float | None = None) -> LeaseRef:
    return LeaseRef(lease.job, lease.slice, lease.token, progress)
