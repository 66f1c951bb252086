"""The worker supervisor: fetch slices, run them in sandboxes, sign, keep, submit.

Tasks (all owned by :meth:`Supervisor.run`'s task group)::

    connection loop ── session: fetcher, heartbeater, submitter (one set per connection)
    runner x N       ── one per sandbox: queue -> evaluator -> sign -> unsaved list
    persister        ── group commit: unsaved results + acknowledgements -> outbox (fsync)
                        -> submit queue

What to fetch, run, decline, return and submit again is decided by a pure
:class:`~dcp_worker.state.WorkerState` (events in, instructions out); the supervisor owns the
tasks, timers, sessions, sandboxes and the outbox, and carries the instructions out.

Stopping: :meth:`stop` (first SIGINT/SIGTERM) stops fetching, returns queued slices, lets
running slices finish, flushes the outbox and ends within ``grace_seconds``;
:meth:`stop_now` (second signal) ends at once, leaving unsent results in the outbox for the
next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

from dcp_keys.identity import Identity
from dcp_protocol import (
    MAX_RESULTS_PER_FRAME,
    Error,
    ErrorCode,
    Heartbeat,
    HeartbeatAck,
    LeaseRef,
    Refusal,
    ResultItem,
    Results,
    Return,
    SliceFailed,
    SliceLease,
    Work,
    result_item_bytes,
    results_frame_bytes,
    signing,
)
from dcp_protocol import Decline as DeclineWire
from dcp_protocol import Fetch as FetchWire
from evaluator.client import Sandbox, SliceFailure, SliceOutcome, SliceWork

from .config import WorkerConfig
from .connection import Session, SessionError, open_session
from .earnings import Balance, BalanceReader
from .levels import NOTICE
from .outbox import GroupCommit, Outbox
from .result import LeaseKey, PendingResult
from .rotation import SchedulerRotation
from .state import (
    BUSY_CODES,
    BatchEnded,
    BatchFinished,
    Blocked,
    Connected,
    Counters,
    Decline,
    EvaluatorDescribed,
    Fetch,
    FetchAnswered,
    FinishRequested,
    GraceStarted,
    HeldLease,
    Instruction,
    JobPaused,
    JobResumed,
    KeepResult,
    LeasesLost,
    LeasesReturned,
    MachineBusy,
    MachineFree,
    OutboxFailed,
    OutboxWritten,
    Paused,
    RemoveFromOutbox,
    ReportFailure,
    ResultsAnswered,
    ResultUnsendable,
    Resumed,
    ReturnLeases,
    Run,
    SandboxFree,
    SliceProgressed,
    SlicesLeased,
    Snoozed,
    StopRequested,
    SubmitLater,
    TimePassed,
    WorkerState,
)

__all__ = ["Supervisor", "Statistics"]

log = logging.getLogger("dcp.worker")

_SUBMIT_WINDOW = 8  # result frames in flight (each up to 256 results, max_frame_bytes)
_IDLE_POLL = 1.0
#: How long the scheduler may hold an empty fetch (long poll) before answering.
_LONG_POLL = 10.0
_OUTBOX_RETRY = 2.0
_CLOSE_SECONDS = 2.0
_CLOSE_RESERVE = 5.0  # evaluators 2 s + session 2 s + the last commit


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
    #: Why the evaluator manager keeps the machine busy ("" while it does not); the name is
    #: the key ``status`` and the dashboard have always read.
    held_reason: str
    queued: int
    running: int
    outbox: int


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
        # Until the evaluator says which user it runs as: a guess for evaluators started here.
        local_root = (
            not config.evaluator
            and os.geteuid() == 0
            and self.sandboxes[0].hardening.target_ids() is None
        )
        #: Every decision: leases held, the run queue, batches, the fetch window, costs.
        self.state = WorkerState(
            config,
            len(self.sandboxes),
            opencl_privileged=local_root and not config.opencl_as_root,
        )
        self._session: Session | None = None
        self._submit_q: asyncio.Queue[PendingResult] | None = None
        self._inflight: set[LeaseKey] = set()
        self._work_queued = asyncio.Event()  # the state's run queue got slices
        self._capacity = asyncio.Event()  # a fetch may be due (slices taken, a stop)
        self._slice_ended = asyncio.Event()
        self._stopping = asyncio.Event()
        self._stop_now = asyncio.Event()
        self._resumed = asyncio.Event()
        #: Queued slices of a paused job, for the fetcher to give back on its session.
        self._to_return: list[HeldLease] = []
        #: Lifetime earnings, from the scheduler's ledger (``run`` keeps it fresh).
        self.balance_reader = BalanceReader(config.scheduler, self.payment_address)
        #: Which scheduler replica the connection loop is on, or tries next.
        self.rotation = SchedulerRotation(config.schedulers)
        #: The local web page's address (no token), once it listens; "" when off.
        self.console_url = ""
        # A GPU (or the OpenCL device) is lent to this many slices at once.
        self._opencl_slots = asyncio.Semaphore(max(1, config.opencl_slots))
        self._started = time.time()
        self.exit_reason = ""
        self.evaluator_broken = False
        self._fatal: SessionError | None = None
        #: The outbox written in groups; results go to the scheduler once committed.
        self.commit = GroupCommit(
            self.outbox,
            self._committed,
            lambda why: self.state.handle(OutboxFailed(why)),
            lambda: self.state.handle(OutboxWritten()),
            _OUTBOX_RETRY,
        )

    # ------------------------------------------------------------------ public

    def statistics(self) -> Statistics:
        state = self.state
        c = state.counters
        return Statistics(
            connected=self._session is not None,
            fetching=not self._stopping.is_set(),
            slices_done=c.done,
            slices_failed=c.failed,
            results_accepted=c.accepted,
            results_refused=c.refused,
            credits_earned=c.credits,
            slices_declined=c.declined_slices,
            held_reason=state.busy_reason,
            queued=len(state.queue),
            running=state.running,
            outbox=self.commit.undelivered,
        )

    def snapshot(self) -> dict[str, Any]:
        """Everything the dashboard, ``dcp-worker status`` and the metrics show (JSON-able)."""
        now = time.monotonic()
        wall = time.time() - now  # the state's clock (monotonic) to the wall clock
        stats = self.statistics()
        state = self.state
        sandboxes = []
        for sandbox in self.sandboxes:
            act = state.activity.get(sandbox.index)
            if act is None:
                sandboxes.append({"index": sandbox.index, "state": "idle"})
                continue
            progress = act.held.progress
            elapsed = now - act.started
            eta = None
            if progress is not None and 0 < progress < 1:
                eta = round(elapsed * (1 - progress) / progress, 1)  # at the rate so far
            moved = act.held.progressed if act.held.progressed is not None else act.started
            sandboxes.append(
                {
                    "index": sandbox.index,
                    "state": "working",
                    "job": act.job,
                    "job_name": act.job_name,
                    "slice": act.slice,
                    "progress": progress,
                    "elapsed": round(elapsed, 3),
                    "eta": eta,
                    "since_progress": round(now - moved, 1),
                }
            )
        snooze = state.snooze_left(now)
        return {
            "state": self.state.phase(stats.connected),
            # The replica connected to (or tried next), and every one configured.
            "scheduler": self.rotation.current,
            "schedulers": list(self.rotation.urls),
            "identity": self.identity.address,
            "payment_address": self.payment_address,
            "groups": sorted(self.config.group_hashes()),
            "public_group": not self.config.leave_public_group,
            "uptime": round(time.time() - self._started, 1),
            "slices_per_minute": self.state.slices_per_minute(now),
            "statistics": dataclasses.asdict(stats),
            "sandboxes": sandboxes,
            "console": self.console_url,
            "finishing": state.finishing,
            "snooze_left": None if snooze is None else round(snooze, 1),
            "paused_jobs": sorted(state.paused_jobs),
            "earnings": {
                "session": stats.credits_earned,
                # The payment address's balance at the scheduler (None: not known yet).
                "lifetime": self.balance.value,
                "lifetime_checked": (
                    None if self.balance.checked is None else round(self.balance.checked + wall, 1)
                ),
                "lifetime_error": self.balance.error,
            },
            "jobs": [
                {
                    **dataclasses.asdict(tally),
                    "paused": tally.job in state.paused_jobs,
                }
                for tally in state.tallies.values()
            ],
            "history": [
                {
                    **dataclasses.asdict(record),
                    "started": round(record.started + wall, 3),
                    "ended": round(record.ended + wall, 3),
                }
                for record in reversed(state.history)
            ],
        }

    @property
    def balance(self) -> Balance:
        return self.balance_reader.balance

    def metrics(self) -> Counters:
        """The running counters (read-only, for the metrics endpoint)."""
        return self.state.counters

    @property
    def paused(self) -> bool:
        return self.state.paused

    def pause(self) -> None:
        """Stop fetching; running and queued slices go on."""
        if not self.state.paused:
            log.warning("paused: no new slices until resumed")
        self.state.handle(Paused())
        self._resumed.clear()

    def resume(self) -> None:
        if self.state.paused:
            log.warning("resumed")
        self.state.handle(Resumed())
        self._resumed.set()

    def finish(self) -> None:
        """Let the slices held end, then stay paused (fahctl's ``finish``)."""
        log.warning("finishing: no new slices; the held ones run, then the worker pauses")
        self.state.handle(FinishRequested())
        self._resumed.clear()

    def snooze(self, seconds: float) -> None:
        """Pause for ``seconds``, then resume by itself.

        Raises:
            ValueError: ``seconds`` is not a positive number.
        """
        self.state.handle(Snoozed(seconds, time.monotonic()))
        log.warning("snoozed for %g s: no new slices until then", seconds)
        self._resumed.clear()
        self._capacity.set()  # the fetcher's wait learns the deadline

    def pause_job(self, job: str) -> None:
        """No new work from ``job``; its queued slices go back."""
        log.warning("job %s paused: no new work from it", job)
        for instruction in self.state.handle(JobPaused(job)):
            assert isinstance(instruction, ReturnLeases)
            self._to_return.extend(instruction.leases)
        self._capacity.set()

    def resume_job(self, job: str) -> None:
        if job in self.state.paused_jobs:
            log.warning("job %s resumed", job)
        self.state.handle(JobResumed(job))
        self._capacity.set()

    def actions(self) -> dict[str, Callable[[], None]]:
        """The commands without arguments that the control socket and the page offer."""
        return {
            "pause": self.pause,
            "resume": self.resume,
            "finish": self.finish,
            "stop": self.stop,
        }

    def commands(self) -> dict[str, Callable[[dict[str, Any]], None]]:
        """The control socket's commands that take arguments (a ValueError refuses one)."""

        def job_of(request: dict[str, Any]) -> str:
            job = request.get("job")
            if not isinstance(job, str) or not job:
                raise ValueError('"job": the id of a job')
            return job

        def seconds_of(request: dict[str, Any]) -> float:
            seconds = request.get("seconds")
            if isinstance(seconds, bool) or not isinstance(seconds, int | float):
                raise ValueError('"seconds": a number')
            return float(seconds)

        return {
            "pause_job": lambda r: self.pause_job(job_of(r)),
            "resume_job": lambda r: self.resume_job(job_of(r)),
            "snooze": lambda r: self.snooze(seconds_of(r)),
        }

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
        self.state.handle(StopRequested())
        self._stopping.set()
        self._capacity.set()

    def stop_now(self) -> None:
        """Immediate stop: unsent results stay in the outbox for the next start."""
        log.warning("stopping now")
        self.state.handle(StopRequested(immediate=True))
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
                return self.commit.unsent == 0 and not self._stop_now.is_set()
            try:
                self.state.handle(EvaluatorDescribed(describe.result()))
                break
            except SliceFailure as exc:
                if exc.code == ErrorCode.EVALUATOR_DIED.value and died < 2:
                    died += 1  # killed from outside (an OOM killer, an operator): once more
                    log.warning("the evaluator died while starting (%s); starting another", exc)
                    continue
                if exc.code not in BUSY_CODES:
                    log.error("the evaluator does not start: %s", exc)
                    self.exit_reason = f"the evaluator does not start: {exc}"
                    self.evaluator_broken = True
                    await self._close()
                    return False
                self.state.handle(MachineBusy(exc.message))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self.config.busy_retry_seconds)
                if self._stopping.is_set():
                    await self._close()
                    return self.commit.unsent == 0
        log.log(
            NOTICE,
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
                runners.append(tg.create_task(self.commit.run()))
                runners.append(tg.create_task(self.balance_reader.run()))
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
        return self.commit.unsent == 0 and not self._stop_now.is_set() and self._fatal is None

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
                self.commit.undelivered,
            )

    async def _graceful_end(self) -> None:
        # 1. Return slices that never started. 2. Wait for running slices. 3. Flush.
        for returned in self.state.handle(GraceStarted()):
            assert isinstance(returned, ReturnLeases)
            if self._session is not None:
                with contextlib.suppress(SessionError):
                    await self._return(self._session, returned.leases)
                    log.info("returned %d queued slice(s)", len(returned.leases))
            # Forgotten only once given back: an immediate stop meanwhile returns them itself.
            self.state.handle(LeasesReturned(returned.leases))
        while self.state.running:
            self._slice_ended.clear()
            await self._slice_ended.wait()
        while self.commit.undelivered and self._fatal is None:
            self.commit.changed.clear()
            await self.commit.changed.wait()

    async def _return_everything(self) -> None:
        """Immediate stop: give back every lease held, queued or running (best effort, 2 s);
        a lease not returned expires and its slice runs again elsewhere."""
        session = self._session
        leases = self.state.held_refs()
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
        self.commit.close()

    # ------------------------------------------------------------------ connection

    def _backoff(self) -> Iterator[float]:
        return backoff(
            self.config.reconnect_max_delay,
            bound=lambda: self.state.reconnect_bound(self.commit.undelivered),
        )

    async def _connection_loop(self) -> None:
        # Which replica next is the rotation's decision; the backoff only spaces whole rounds
        # of failures, so a dead replica among live ones costs one immediate retry.
        delays = self._backoff()
        rotation = self.rotation
        while True:
            url = rotation.current
            try:
                session = await open_session(
                    url,
                    self.identity,
                    self.payment_address,
                    groups=self.config.group_hashes(),
                    leave_public_group=self.config.leave_public_group,
                    json_frames=self.config.json_frames,
                )
            except SessionError as exc:
                if exc.fatal:
                    log.error("%s; giving up", exc)
                    self._fatal = exc
                    self.exit_reason = str(exc)
                    self.stop_now()
                    return
                if not rotation.failed():
                    log.warning("%s; trying %s next", exc, rotation.current)
                    continue
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
            rotation.connected()
            welcome = session.welcome
            self.state.handle(Connected(welcome.lease_timeout, welcome.max_result_bytes))
            self.balance_reader.use(url)
            self.balance_reader.want()
            log.log(
                NOTICE,
                "connected to %s (session %s) as %s",
                url,
                session.welcome.session,
                session.welcome.address,
            )
            self._session = session
            self._submit_q = asyncio.Queue()
            self._inflight.clear()
            # Every result not yet acknowledged goes again, on whichever replica this is: the
            # leases are in the shared database, so one it still holds is accepted here, one
            # accepted before the loss is answered duplicate, one that expired stale_lease.
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
            rotation.lost()
            if len(rotation.urls) > 1:
                log.warning("disconnected from %s; reconnecting to %s", url, rotation.current)
            else:
                log.warning("disconnected from the scheduler; reconnecting")

    async def _fetcher(self, session: Session) -> None:
        while True:
            self.state.handle(TimePassed(time.monotonic()))
            if self._to_return:
                leases, self._to_return = tuple(self._to_return), []
                try:
                    await self._return(session, leases)
                finally:
                    self.state.handle(LeasesReturned(leases))
            fetch = self.state.next_fetch(time.monotonic())
            if fetch is Blocked.STOPPING:
                return
            if fetch is Blocked.OUTBOX:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), _OUTBOX_RETRY)
                continue
            if fetch is Blocked.PAUSED:
                await self._wait_resumed()
                continue
            if fetch is Blocked.MACHINE_BUSY:
                await self._wait_machine_free()  # fetch nothing the manager would refuse
                continue
            if fetch is Blocked.FULL:
                self._capacity.clear()
                await self._capacity.wait()
                continue
            assert isinstance(fetch, Fetch)
            asked = time.monotonic()
            terms = fetch.terms
            reply = await session.request(
                partial(
                    FetchWire,
                    max_slices=fetch.max_slices,
                    capabilities=dict(terms.capabilities),
                    known_jobs=fetch.known_jobs,
                    wait_seconds=_LONG_POLL,
                    min_wage=terms.min_wage,
                    allowed_jobs=tuple(sorted(terms.allowed_jobs)),
                    allowed_owners=tuple(sorted(terms.allowed_owners)),
                    declined=tuple(DeclineWire(j, o) for j, o in terms.declined.items()),
                    excluded_jobs=tuple(sorted(terms.excluded_jobs)),
                )
            )
            self.state.handle(FetchAnswered(time.monotonic() - asked))
            if isinstance(reply, Error):
                log.warning("fetch refused: %s %s", reply.code, reply.message)
                await asyncio.sleep(_IDLE_POLL)
                continue
            if not isinstance(reply, Work):
                raise SessionError(f"the scheduler answered a fetch with {reply.type}")
            returns = self.state.handle(SlicesLeased(reply, terms))
            for returned in returns:
                # Stopped, paused or busy while this fetch was parked: give the slices back.
                assert isinstance(returned, ReturnLeases)
                await self._return(session, returned.leases)
            if returns and self._stopping.is_set():
                return
            if self.state.queue:
                self._work_queued.set()

    async def _wait_resumed(self) -> None:
        """Until resumed, stopped, a snooze's deadline, or something to give back."""
        self._capacity.clear()
        waits = {
            asyncio.ensure_future(self._stopping.wait()),
            asyncio.ensure_future(self._resumed.wait()),
            asyncio.ensure_future(self._capacity.wait()),
        }
        try:
            await asyncio.wait(
                waits,
                timeout=self.state.snooze_left(time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            for w in waits:
                w.cancel()

    async def _wait_machine_free(self) -> None:
        """While the machine is busy: ask the manager again every ``busy_retry_seconds`` (a describe
        on a connection of its own, beside the runners'), until it serves one or the worker
        stops."""
        probe = self.sandboxes[0].spare()
        while self.state.machine_busy and not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.config.busy_retry_seconds)
            if self._stopping.is_set():
                return
            try:
                await probe.describe()
            except SliceFailure as exc:
                # A manager that cannot be reached keeps work away too: nothing could run.
                busy = exc.code in BUSY_CODES
                self.state.handle(
                    MachineBusy(exc.message if busy else f"{exc.code}: {exc.message}")
                )
                continue
            finally:
                await probe.stop()
            self.state.handle(MachineFree())

    async def _heartbeater(self, session: Session) -> None:
        interval = session.welcome.heartbeat_interval
        while True:
            await asyncio.sleep(interval)
            refs = self.state.heartbeat_refs()
            if not refs:
                continue
            reply = await session.request(partial(Heartbeat, leases=refs))
            if isinstance(reply, HeartbeatAck):
                self.state.handle(LeasesLost(reply.lost))

    async def _return(self, session: Session, leases: tuple[HeldLease, ...]) -> None:
        refs = tuple(held.ref() for held in leases)
        await session.request(partial(Return, leases=refs))

    # ------------------------------------------------------------------ submitting

    async def _submitter(
        self, session: Session, queue: asyncio.Queue[PendingResult], tg: asyncio.TaskGroup
    ) -> None:
        # Up to _SUBMIT_WINDOW frames in flight; results that queue up meanwhile go together
        # in the next frame (one round trip and one scheduler transaction for many), as many
        # as fit in the session's max_frame_bytes (a result that does not waits for the next).
        window = asyncio.Semaphore(_SUBMIT_WINDOW)
        limit = session.max_frame_bytes
        binary = session.core.binary  # MessagePack frames: sizes counted as they go
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
                if results_frame_bytes(size + more.size, len(batch) + 1, binary) > limit:
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
        item = pending.item()
        binary = session.core.binary
        size = result_item_bytes(item, binary)
        limit = session.welcome.max_result_bytes
        if len(pending.result) > limit:
            why = f"{len(pending.result)} bytes, above max_result_bytes {limit} (not sent)"
        elif results_frame_bytes(size, 1, binary) > session.max_frame_bytes:
            why = f"a frame of {results_frame_bytes(size, 1, binary)} bytes, above max_frame_bytes"
        else:
            return _Outgoing(pending, item, size)
        self._carry_out(session, self.state.handle(ResultUnsendable(pending, why)))
        return None

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
        answered = ResultsAnswered(tuple(out.pending for out in batch), reply)
        accepted = self.state.counters.accepted
        self._carry_out(session, self.state.handle(answered))
        if self.state.counters.accepted > accepted:
            self.balance_reader.want()

    def _carry_out(self, session: Session, instructions: list[Instruction]) -> None:
        """What the state decided about results: drop them from the outbox (at the next
        commit) or send them again later on this session."""
        loop = asyncio.get_running_loop()
        for instruction in instructions:
            if isinstance(instruction, RemoveFromOutbox):
                self.commit.acknowledge(instruction.keys)
            elif isinstance(instruction, SubmitLater):
                loop.call_later(instruction.delay, self._resubmit, session, instruction.item)
            else:
                raise TypeError(f"not a submission instruction: {instruction!r}")

    def _committed(self, results: list[PendingResult]) -> None:
        """Results now on disk: to the scheduler, if a session is up (a new one sends the
        whole outbox anyway)."""
        if self._submit_q is not None:
            for item in results:
                self._submit_q.put_nowait(item)

    def _resubmit(self, session: Session, item: PendingResult) -> None:
        # A new session sends everything in the outbox anyway.
        if self._session is session and self._submit_q is not None:
            self._submit_q.put_nowait(item)

    # ------------------------------------------------------------------ running

    async def _runner(self, sandbox: Sandbox) -> None:
        while True:
            while not self.state.queue:
                self._work_queued.clear()
                await self._work_queued.wait()
            todo = self.state.handle(SandboxFree(sandbox.index, time.monotonic()))
            self._capacity.set()
            try:
                while todo:
                    instruction = todo.pop(0)
                    if isinstance(instruction, Decline):
                        # Never trust the scheduler alone: this slice reaches no evaluator.
                        await self._decline(instruction.lease, instruction.why)
                    else:
                        assert isinstance(instruction, Run)
                        await self._run(sandbox, instruction)
            finally:
                for instruction in todo:  # cancelled before the batch started
                    if isinstance(instruction, Run):
                        self.state.handle(BatchEnded(sandbox.index, instruction.batch))

    async def _run(self, sandbox: Sandbox, run: Run) -> None:
        batch, job = run.batch, run.job
        first = batch[0].lease
        log.debug(
            "running slice %s/%d (attempt %d)%s",
            first.job,
            first.slice,
            first.attempt,
            f" and {len(batch) - 1} more in one batch" if len(batch) > 1 else "",
            extra={"DCP_JOB": first.job, "DCP_SLICE": first.slice},
        )
        try:
            outcomes: list[SliceOutcome]

            def progress(index: int, fraction: float) -> None:
                self.state.handle(SliceProgressed(batch[index], fraction, time.monotonic()))

            items = [SliceWork(held.lease.slice, held.lease.datum) for held in batch]
            started = time.monotonic()
            if job.runtime == "opencl":
                async with self._opencl_slots:
                    outcomes = await sandbox.run_batch(job, run.limits, items, progress)
            else:
                outcomes = await sandbox.run_batch(job, run.limits, items, progress)
            ended = time.monotonic()
            for instruction in self.state.handle(
                BatchFinished(batch, outcomes, ended - started, ended)
            ):
                if isinstance(instruction, KeepResult):
                    self._keep(instruction)
                elif isinstance(instruction, ReportFailure):
                    await self._report_failure(instruction.lease, instruction.failure)
                else:
                    assert isinstance(instruction, Decline)
                    await self._decline(instruction.lease, instruction.why)
        finally:
            self.state.handle(BatchEnded(sandbox.index, batch))
            self._capacity.set()
            self._slice_ended.set()

    def _keep(self, kept: KeepResult) -> None:
        """Sign the result; it goes to the outbox at the next commit, then to the scheduler."""
        lease = kept.lease
        payload = signing.result_payload(
            lease.job, lease.slice, lease.token, kept.result, self.payment_address
        )
        self.commit.keep(
            PendingResult(
                job=lease.job,
                slice=lease.slice,
                token=lease.token,
                result=kept.result,
                signature=self.identity.sign(payload),
                payment_address=self.payment_address,
                metrics=kept.metrics,
            )
        )

    async def _decline(self, lease: SliceLease, why: Refusal) -> None:
        self._capacity.set()
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
                    code=str(exc.code),
                    message=exc.message[:2000],
                )
            )


def _ref(lease: SliceLease) -> LeaseRef:
    return LeaseRef(lease.job, lease.slice, lease.token)
