"""What an operator sets of a scheduler (:class:`SchedulerConfig`, from the command line of
scheduler/cli.py), read by every room: the sessions, result acceptance, the compute API and the
server that wires them together."""

from __future__ import annotations

from dataclasses import dataclass

from dcp_protocol import MAX_FRAME_BYTES, limits

from .limits import ConnectionLimits, RefusalLimits

__all__ = ["MAX_FETCH_WAIT", "SchedulerConfig"]

#: The longest a fetch may be parked waiting for work (the worker asks for less), and the
#: longest a compute API read of results may wait for one more final slice.
MAX_FETCH_WAIT = 30.0


@dataclass(frozen=True)
class SchedulerConfig:
    name: str = "dcp-scheduler"
    heartbeat_interval: float = 3.0
    lease_timeout: float = 15.0
    max_result_bytes: int = 16 * 1024 * 1024
    #: The largest frame of a session, announced in ``welcome``: at most MAX_FRAME_BYTES,
    #: and room for one result of ``max_result_bytes`` (limits.result_frame_bytes).
    max_frame_bytes: int = MAX_FRAME_BYTES
    expiry_interval: float = 1.0
    verifier_wall_seconds: float = 10.0
    #: Evaluator processes that run verifiers; 0: half the CPUs.
    verifier_sandboxes: int = 0
    #: At most this many of one session's results are verified at once; the rest wait their
    #: turn, and a free sandbox goes to the session served least recently.
    verifications_per_session: int = 2
    #: Result metrics must be plausible (scheduler/plausibility.py): wall time within the
    #: lease's age plus the slack; CPU and GPU time within wall time x parallelism plus it.
    metrics_slack_seconds: float = 1.0
    metrics_parallelism: float = 64.0
    #: Finished and cancelled jobs are removed this long after they end (damocles: 25 h).
    job_lifetime: float = 25 * 3600.0
    gc_interval: float = 60.0
    #: Unauthenticated connections: per address, in total, and the websocket auth deadline.
    limits: ConnectionLimits = ConnectionLimits()
    #: Seconds a connection has to send a complete request line and headers (also the idle
    #: limit of a keep-alive connection between requests): aiohttp's ``keepalive_timeout``.
    http_header_timeout: float = 10.0
    #: Seconds a request has to send its whole body once its headers are in.
    http_body_timeout: float = 60.0
    #: Refused frames a session may send at once, and per second past that burst.
    refusals: RefusalLimits = RefusalLimits()
    #: Leases one worker identity may hold at once (BOINC's "max tasks in progress"): a
    #: session fetching with capabilities that fit everything would otherwise hold every
    #: queued slice until its leases expired, again and again.
    max_leases_per_worker: int = 4096
    #: Threads, each with its own database connection, that a replica's store calls run on
    #: off its event loop (PostgreSQL; scheduler/store/pool.py); SQLite, or 0: inline, which
    #: measured faster with the database on the replica's own two cores (docs/performance.md).
    db_connections: int = 0

    def __post_init__(self) -> None:
        if self.max_leases_per_worker < 1:
            raise ValueError("max_leases_per_worker must be at least 1")
        if not 0 <= self.db_connections <= 64:
            raise ValueError("db_connections must be within 0..64")
        if not 1 <= self.max_frame_bytes <= MAX_FRAME_BYTES:
            raise ValueError(f"max_frame_bytes must be within 1..{MAX_FRAME_BYTES}")
        if not 1 <= self.max_result_bytes or (
            limits.result_frame_bytes(self.max_result_bytes) > self.max_frame_bytes
        ):
            raise ValueError(
                f"max_result_bytes must be >= 1 and leave a frame of max_frame_bytes room for"
                f" one result: at most {_largest_result(self.max_frame_bytes)} here"
            )


def _largest_result(max_frame_bytes: int) -> int:
    """The largest ``max_result_bytes`` that a frame limit carries."""
    return max(0, (max_frame_bytes - limits.RESULT_FIELDS_BYTES) // 4 * 3)
