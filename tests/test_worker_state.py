"""The worker's decisions without processes or sockets: feed a WorkerState events, check the
instructions it returns (as dask/distributed's ``test_worker_state_machine.py``)."""

from __future__ import annotations

import hashlib
import logging
from itertools import islice

import pytest

from dcp_protocol import (
    Error,
    ItemAck,
    JobSpec,
    LeaseRef,
    Limits,
    Metrics,
    Refusal,
    ResultsAck,
    SliceFailure,
    SliceLease,
    Wage,
    Work,
)
from dcp_protocol.evaluator_channel import SliceResult
from dcp_worker.config import WorkerConfig
from dcp_worker.result import LeaseKey, PendingResult
from dcp_worker.state import (
    BatchEnded,
    BatchFinished,
    Blocked,
    Connected,
    Decline,
    EvaluatorDescribed,
    Fetch,
    FinishRequested,
    GraceStarted,
    IllegalLeaseTransition,
    JobPaused,
    JobResumed,
    KeepResult,
    LeasesLost,
    LeasesReturned,
    LeaseStage,
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
    SlicesLeased,
    Snoozed,
    StopRequested,
    SubmitLater,
    TimePassed,
    WorkerState,
)
from dcp_worker.supervisor import backoff

CAPS = {"runtimes": {"wasm": {}, "opencl": {}}}
MODULE = b"\0asm"


def spec(job: str = "j", runtime: str = "wasm", **kw: object) -> JobSpec:
    return JobSpec(job, runtime, MODULE, hashlib.sha256(MODULE).hexdigest(), **kw)  # type: ignore[arg-type]


def lease(i: int, job: str = "j", offer: float = 1.0) -> SliceLease:
    return SliceLease(job, i, f"t{i}", 1, 0.0, b"%d" % i, offer=offer)


def make(sandboxes: int = 2, **config: object) -> WorkerState:
    state = WorkerState(WorkerConfig(**config), sandboxes, uniform=lambda _low, high: high)  # type: ignore[arg-type]
    state.handle(EvaluatorDescribed(CAPS))
    return state


def fetch(state: WorkerState, now: float = 0.0) -> Fetch:
    decision = state.next_fetch(now)
    assert isinstance(decision, Fetch), decision
    return decision


def lease_slices(state: WorkerState, *leases: SliceLease, jobs: tuple[JobSpec, ...] = ()) -> list:  # type: ignore[type-arg]
    work = Work(re=1, slices=leases, jobs=jobs)
    return state.handle(SlicesLeased(work, state.worker_terms(0.0)))


def done(wall: float = 0.001, cpu: float = 0.001) -> SliceResult:
    return SliceResult(b"ok", Metrics(cpu_seconds=cpu, wall_seconds=wall))


def run_next(state: WorkerState, sandbox: int = 0, now: float = 0.0) -> list:  # type: ignore[type-arg]
    return state.handle(SandboxFree(sandbox, now))


def pending(i: int) -> PendingResult:
    return PendingResult("j", i, f"t{i}", b"r", "ab" * 65, "0x" + "11" * 20, Metrics())


# --------------------------------------------------------------------------- fetching


def test_the_fetch_window_is_the_sandboxes_and_the_prefetch() -> None:
    state = make(sandboxes=2)
    first = fetch(state)
    assert first.max_slices == 4  # auto prefetch: one more per sandbox
    assert "opencl" in first.terms.capabilities["runtimes"]
    assert lease_slices(state, lease(0), lease(1), lease(2), jobs=(spec(),)) == []
    assert fetch(state).max_slices == 1
    assert fetch(state).known_jobs == ("j",)  # its spec is not sent again
    lease_slices(state, lease(3))
    assert state.next_fetch(0.0) is Blocked.FULL


def test_a_deep_window_is_refilled_in_chunks() -> None:
    state = make(sandboxes=2, prefetch=10)
    lease_slices(state, *(lease(i) for i in range(9)), jobs=(spec(),))
    assert fetch(state).max_slices == 3  # a quarter of the window of 12
    lease_slices(state, lease(9))
    assert state.next_fetch(0.0) is Blocked.FULL  # 2 missing: wait for more to finish


def test_short_slices_deepen_the_window_and_go_in_batches() -> None:
    state = make(sandboxes=2)
    lease_slices(state, lease(0), jobs=(spec(),))
    (run,) = run_next(state)
    assert isinstance(run, Run) and [h.lease.slice for h in run.batch] == [0]  # wall unknown
    (keep,) = state.handle(BatchFinished(run.batch, [done()], 0.002, 1.0))
    assert isinstance(keep, KeepResult) and keep.metrics.wall_seconds == pytest.approx(0.002)
    state.handle(BatchEnded(0, run.batch))
    # Known to be short: a batch per sandbox in flight, twice.
    assert fetch(state).max_slices == 2 + 2 * 2 * 32
    lease_slices(state, *(lease(i) for i in range(1, 11)))
    (run,) = run_next(state)
    # 50 ms of work would be 50 slices; a fair share of 10 over 2 sandboxes is 5.
    assert isinstance(run, Run) and [h.lease.slice for h in run.batch] == [1, 2, 3, 4, 5]
    assert state.running == 5 and len(state.queue) == 5
    assert state.activity[0].slice == 1


@pytest.mark.parametrize(
    ("event", "blocked"),
    [
        (Paused(), Blocked.PAUSED),
        (StopRequested(), Blocked.STOPPING),
        (MachineBusy("a person at the keyboard"), Blocked.MACHINE_BUSY),
        (OutboxFailed("disk full"), Blocked.OUTBOX),
    ],
)
def test_nothing_is_fetched_or_kept_while_blocked(event: object, blocked: Blocked) -> None:
    state = make()
    terms = fetch(state).terms
    state.handle(event)  # type: ignore[arg-type]
    assert state.next_fetch(0.0) is blocked
    # A fetch parked meanwhile: its slices go straight back, never held (not for the outbox).
    if blocked is not Blocked.OUTBOX:
        (back,) = state.handle(SlicesLeased(Work(re=1, slices=(lease(0),)), terms))
        assert isinstance(back, ReturnLeases) and back.leases[0].lease == lease(0)
        assert state.held == {} and not state.queue


def test_blocks_lift() -> None:
    state = make()
    state.handle(Paused())
    state.handle(Resumed())
    state.handle(MachineBusy("busy"))
    assert state.phase(connected=True) == "held" and state.busy_reason == "busy"
    state.handle(MachineFree())
    state.handle(OutboxFailed("disk full"))
    state.handle(OutboxWritten())
    assert isinstance(state.next_fetch(0.0), Fetch)
    assert state.phase(connected=True) == "fetching" and state.busy_reason == ""


# --------------------------------------------------------------------------- leases


def test_a_lease_lost_while_queued_never_runs() -> None:
    state = make()
    lease_slices(state, lease(0), lease(1), jobs=(spec(),))
    state.handle(LeasesLost((LeaseRef("j", 0, "t0"),)))
    assert run_next(state) == []  # dropped, not declined: the scheduler gave it to another
    assert [r.slice for r in state.heartbeat_refs()] == [1]


def test_a_graceful_stop_returns_the_queue_and_holds_it_until_sent() -> None:
    state = make(sandboxes=1)
    lease_slices(state, lease(0), lease(1), jobs=(spec(),))
    (run,) = run_next(state)
    state.handle(StopRequested())
    (back,) = state.handle(GraceStarted())
    assert isinstance(back, ReturnLeases) and [h.lease.slice for h in back.leases] == [1]
    # Still held: an immediate stop meanwhile returns it with the running one.
    assert [r.slice for r in state.held_refs()] == [0, 1]
    state.handle(LeasesReturned(back.leases))
    assert [r.slice for r in state.held_refs()] == [0]
    with pytest.raises(IllegalLeaseTransition):
        state.handle(LeasesReturned(run.batch))  # a running lease is not being returned
    state.handle(BatchEnded(0, run.batch))
    assert state.held == {} and state.running == 0
    assert run.batch[0].stage is LeaseStage.GONE


def test_reconnects_stay_within_the_lease_while_slices_or_results_wait() -> None:
    state = make()
    state.handle(Connected(lease_timeout=15.0))
    assert state.reconnect_bound(results_waiting=0) == float("inf")  # nothing waits
    lease_slices(state, lease(0), jobs=(spec(),))
    assert state.reconnect_bound(results_waiting=0) == 15.0 / 4
    delays = backoff(30.0, bound=lambda: state.reconnect_bound(0))
    assert max(islice(delays, 50)) <= 15.0 / 4
    state.handle(StopRequested())
    state.handle(LeasesReturned(state.handle(GraceStarted())[0].leases))  # type: ignore[attr-defined]
    assert state.reconnect_bound(results_waiting=0) == float("inf")
    assert state.reconnect_bound(results_waiting=3) == 15.0 / 4  # results in the outbox


def test_a_slices_output_is_bounded_by_the_largest_result_the_scheduler_takes() -> None:
    """A result above the welcome's max_result_bytes could only be dropped unsent, its lease
    left to expire: the slice's output limit is the smaller of the two, so such a slice
    fails by name (the output limit) and is reported."""
    state = make()
    state.handle(Connected(lease_timeout=15.0, max_result_bytes=1000))
    lease_slices(state, lease(0), jobs=(spec(limits=Limits(output_bytes=1 << 20)),))
    (run,) = run_next(state)
    assert isinstance(run, Run) and run.limits.output_bytes == 1000


# --------------------------------------------------------------------------- declining


def test_a_slice_without_a_spec_or_with_a_changed_one_is_declined() -> None:
    state = make()
    lease_slices(state, lease(0, job="nospec"))
    assert run_next(state) == [
        Decline(
            lease(0, job="nospec"),
            Refusal("nospec", "unknown_slice", "the scheduler sent no spec for the job"),
        )
    ]
    lease_slices(state, lease(1), jobs=(spec(),))
    lease_slices(state, lease(2), jobs=(spec(name="renamed"),))
    declines = run_next(state) + run_next(state)
    assert [d.why.code for d in declines] == ["job_spec_changed", "job_spec_changed"]
    assert state.counters.declined_slices == 3
    assert state.counters.reasons["slice_declined", "job_spec_changed"] == 2
    assert state.held == {}


def test_a_job_that_costs_more_than_it_pays_is_declined_from_then_on() -> None:
    state = make(sandboxes=1, min_wage=Wage(cpu_hour=3600.0))  # 1 credit per CPU-second
    lease_slices(state, lease(0, offer=0.5), lease(1, offer=0.5), jobs=(spec(),))
    (run,) = run_next(state)
    state.handle(BatchFinished(run.batch, [done(wall=0.5, cpu=2.0)], 0.5, 1.0))
    state.handle(BatchEnded(0, run.batch))
    assert state.worker_terms(1.0).declined == {"j": 0.5}  # the next fetch says so
    (decline,) = run_next(state)
    assert isinstance(decline, Decline) and decline.why.code == "wage_below_minimum"


def test_each_slice_is_checked_against_the_terms_it_was_leased_under() -> None:
    state = make(sandboxes=1, opencl_slots=0)  # --cores N,0: lend no GPU
    assert "opencl" not in fetch(state).terms.capabilities["runtimes"]
    lease_slices(state, lease(0, job="gpu"), jobs=(spec("gpu", "opencl"),))
    (decline,) = run_next(state)  # the scheduler ignored what the fetch said
    assert isinstance(decline, Decline) and decline.why.code == "requirement_unmet"


def test_opencl_is_not_offered_when_kernels_would_run_as_root() -> None:
    state = WorkerState(WorkerConfig(), 1)
    state.handle(EvaluatorDescribed({**CAPS, "uid": 0}))
    assert set(state.worker_terms(0.0).capabilities["runtimes"]) == {"wasm"}
    state = WorkerState(WorkerConfig(opencl_as_root=True), 1)
    state.handle(EvaluatorDescribed({**CAPS, "uid": 0}))
    assert "opencl" in state.worker_terms(0.0).capabilities["runtimes"]


# --------------------------------------------------------------------------- outcomes


def test_each_slice_of_a_batch_gets_its_own_outcome() -> None:
    state = make(sandboxes=1, max_wall_seconds=10.0)
    job = spec(limits=Limits(wall_seconds=60.0))
    lease_slices(state, lease(0), lease(1), lease(2), jobs=(job,))
    (run,) = run_next(state)
    assert isinstance(run, Run) and run.limits.wall_seconds == 10.0  # clamped to the worker's
    failure = SliceFailure("output_too_large", "too long")
    busy = SliceFailure("machine_busy", "a person at the keyboard")
    # Three singles in turn (nothing measured yet): one result, one failure, one busy machine.
    outcomes = [done(wall=0.5), failure, busy]
    kinds = []
    for outcome in outcomes:
        (instruction,) = state.handle(BatchFinished(run.batch, [outcome], 0.01, 1.0))
        kinds.append(type(instruction))
        state.handle(BatchEnded(0, run.batch))
        if state.queue:
            (run,) = run_next(state)
    assert kinds == [KeepResult, ReportFailure, Decline]
    assert (state.counters.done, state.counters.failed, state.counters.declined_slices) == (1, 1, 1)
    assert state.next_fetch(2.0) is Blocked.MACHINE_BUSY and state.busy_reason.startswith(
        "a person"
    )
    assert state.slices_per_minute(30.0) == 1 and state.slices_per_minute(100.0) == 0


# --------------------------------------------------------------------------- results


def test_results_answered_leave_the_outbox_or_go_again() -> None:
    state = make()
    items = (pending(0), pending(1), pending(2))
    acks = ResultsAck(
        re=1,
        acks=(
            ItemAck("accepted", credited=2.5),
            ItemAck("refused", code="stale_lease", message="too late"),
            ItemAck("retry", code="internal"),
        ),
    )
    later, remove = state.handle(ResultsAnswered(items, acks))
    assert remove == RemoveFromOutbox((LeaseKey("j", 0, "t0"), LeaseKey("j", 1, "t1")))
    assert later == SubmitLater(items[2], 0.5)
    assert (state.counters.accepted, state.counters.refused, state.counters.credits) == (1, 1, 2.5)
    # Again and again: the delay doubles, up to 10 s.
    delays = [
        state.handle(ResultsAnswered(items[2:], Error(re=2, code="internal")))[0].delay  # type: ignore[attr-defined]
        for _ in range(6)
    ]
    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert state.counters.reasons["result_retried", "internal"] == 7


def test_a_result_too_large_for_the_session_is_dropped() -> None:
    state = make()
    (remove,) = state.handle(ResultUnsendable(pending(0), "above max_result_bytes"))
    assert remove == RemoveFromOutbox((LeaseKey("j", 0, "t0"),))
    assert state.counters.reasons["result_refused", "result_too_large"] == 1


# --------------------------------------------------------------------------- the rule


@pytest.mark.parametrize("module", ["state.py", "result.py"])
def test_the_state_does_no_io_and_reads_no_clock(module: str) -> None:
    """Only the supervisor reaches sockets, processes, the disk and the clock."""
    import ast
    from pathlib import Path

    import dcp_worker

    forbidden = {"asyncio", "socket", "subprocess", "sqlite3", "time", "websockets", "aiohttp"}
    io_modules = {"supervisor", "connection", "outbox", "control", "dashboard", "runtime"}
    io_modules |= {"cli", "metrics", "notify", "logs", "evaluator"}
    tree = ast.parse((Path(dcp_worker.__file__).parent / module).read_text())
    for node in tree.body:  # the imports at run time (``if TYPE_CHECKING:`` is for mypy)
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        for name in names:
            assert name.split(".")[0] not in forbidden | io_modules, (module, name)


def test_an_opencl_batch_spends_the_opencl_budget_of_a_20_minute_window() -> None:
    """The budget was only ever fed by tests: no batch the worker ran counted against it, so
    ``opencl_share < 1`` never withheld OpenCL. A finished OpenCL batch now spends its time."""
    state = make(sandboxes=1, opencl_share=0.25)
    lease_slices(state, lease(0, job="gpu"), jobs=(spec("gpu", "opencl"),))
    (run,) = run_next(state, now=10.0)
    state.handle(BatchFinished(run.batch, [done(wall=300.0, cpu=1.0)], 300.0, 310.0))
    state.handle(BatchEnded(0, run.batch))
    assert "opencl" not in state.worker_terms(310.0).capabilities["runtimes"]
    assert "opencl" in state.worker_terms(311.0 + 1200.0).capabilities["runtimes"]  # window passed


def test_a_wasm_batch_spends_nothing_of_the_opencl_budget() -> None:
    state = make(sandboxes=1, opencl_share=0.25)
    lease_slices(state, lease(0), jobs=(spec(),))
    (run,) = run_next(state, now=10.0)
    state.handle(BatchFinished(run.batch, [done(wall=300.0, cpu=300.0)], 300.0, 310.0))
    assert "opencl" in state.worker_terms(310.0).capabilities["runtimes"]


def test_failure_lines_name_the_job_by_its_name_and_its_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A volunteer knows a job by its name; the commands take its id: the line has both."""
    state = make(sandboxes=1)
    lease_slices(state, lease(3, job="j"), jobs=(spec("j", name="puzzle"),))
    (run,) = run_next(state)
    with caplog.at_level(logging.WARNING, logger="dcp.worker"):
        state.handle(BatchFinished(run.batch, [SliceFailure("wasm_trap", "unreachable")], 0.1, 1.0))
    assert "slice 3 of job 'puzzle' (j) failed: wasm_trap unreachable" in caplog.text


# --------------------------------------------------------------------------- operator's keys


def test_finish_lets_held_slices_end_then_stays_paused() -> None:
    state = make(sandboxes=1)
    lease_slices(state, lease(0), lease(1), jobs=(spec(),))
    (run,) = run_next(state)
    state.handle(FinishRequested())
    assert state.next_fetch(0.0) is Blocked.PAUSED
    assert state.phase(True) == "finishing"
    state.handle(BatchFinished(run.batch, [done()], 0.01, 1.0))
    state.handle(BatchEnded(0, run.batch))
    (run,) = run_next(state)  # the queued slice runs too: it was taken
    assert state.phase(True) == "finishing"
    state.handle(BatchFinished(run.batch, [done()], 0.01, 2.0))
    state.handle(BatchEnded(0, run.batch))
    assert state.phase(True) == "paused" and state.next_fetch(3.0) is Blocked.PAUSED
    state.handle(Resumed())
    assert isinstance(state.next_fetch(3.0), Fetch) and not state.finishing


def test_a_snooze_ends_by_itself_at_its_deadline() -> None:
    state = make()
    state.handle(Snoozed(1800.0, now=100.0))
    assert state.phase(True) == "snoozed" and state.snooze_left(400.0) == 1500.0
    state.handle(TimePassed(1899.0))
    assert state.next_fetch(1899.0) is Blocked.PAUSED
    state.handle(TimePassed(1900.0))
    assert isinstance(state.next_fetch(1900.0), Fetch) and state.snooze_left(1900.0) is None
    with pytest.raises(ValueError, match="not a positive number"):
        state.handle(Snoozed(0.0, now=0.0))


def test_a_resume_ends_a_snooze_early() -> None:
    state = make()
    state.handle(Snoozed(60.0, now=0.0))
    state.handle(Resumed())
    assert isinstance(state.next_fetch(1.0), Fetch)
    state.handle(TimePassed(100.0))  # the old deadline does nothing
    assert not state.paused


def test_a_paused_job_gets_no_new_work_and_its_queued_slices_go_back() -> None:
    state = make(sandboxes=1, prefetch=4)
    lease_slices(state, lease(0, "a"), lease(1, "b"), lease(2, "a"), jobs=(spec("a"), spec("b")))
    (run,) = run_next(state)
    assert [h.lease.job for h in run.batch] == ["a"]
    (back,) = state.handle(JobPaused("a"))
    assert isinstance(back, ReturnLeases) and [h.lease.slice for h in back.leases] == [2]
    assert [h.lease.job for h in state.queue] == ["b"]
    state.handle(LeasesReturned(back.leases))
    assert LeaseKey("a", 2, "t2") not in state.held
    # The fetch declines the job at any offer, so the scheduler offers none of its slices.
    terms = fetch(state).terms
    assert terms.excluded_jobs == {"a"} and not terms.declined
    # Slices of it that come anyway go straight back, and never run.
    (back,) = lease_slices(state, lease(3, "a"), lease(4, "b"))
    assert [h.lease.slice for h in back.leases] == [3]
    assert [h.lease.slice for h in state.queue] == [1, 4]
    state.handle(JobResumed("a"))
    assert not fetch(state).terms.excluded_jobs


def test_a_queued_slice_of_a_paused_job_is_refused_with_its_reason() -> None:
    state = make(sandboxes=1)
    lease_slices(state, lease(0, "a"), jobs=(spec("a"),))
    state.paused_jobs.add("a")  # as if the pause came between the check and the run
    (decline,) = run_next(state)
    assert isinstance(decline, Decline) and decline.why.code == "job_not_allowed"
    assert "paused by the operator" in decline.why.message


def test_history_and_per_job_earnings() -> None:
    state = make(sandboxes=1)
    lease_slices(state, lease(0), lease(1), jobs=(spec(name="puzzle"),))
    (run,) = run_next(state, now=10.0)
    state.handle(BatchFinished(run.batch, [done()], 2.0, 12.0))
    state.handle(BatchEnded(0, run.batch))
    (run,) = run_next(state, now=12.0)
    state.handle(BatchFinished(run.batch, [SliceFailure("trap", "unreachable")], 1.0, 13.0))
    state.handle(BatchEnded(0, run.batch))
    first, second = state.history
    assert (first.job_name, first.slice, first.started, first.ended) == ("puzzle", 0, 10.0, 12.0)
    assert first.outcome == "done" and (second.outcome, second.code) == ("failed", "trap")
    state.handle(
        ResultsAnswered((pending(0),), ResultsAck(re=1, acks=(ItemAck("accepted", credited=0.07),)))
    )
    assert (first.outcome, first.credit) == ("accepted", 0.07)
    tally = state.tallies["j"]
    assert (tally.name, tally.done, tally.failed, tally.accepted, tally.credits) == (
        "puzzle",
        1,
        1,
        1,
        0.07,
    )
