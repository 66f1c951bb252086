"""Whether a result's metrics could be true of the lease it names (docs/protocol.md section 3,
"Result acceptance"): a pure rule, checked before any verifier runs or any credit moves.

The scheduler knows the datum and the result exactly, and when it granted the lease by its own
clock; a worker's metrics that contradict those are a lie (or a broken worker) and are refused,
never clamped: clamped metrics would still feed the job's cost with numbers nobody measured.
"""

from __future__ import annotations

from dataclasses import dataclass

from dcp_protocol import Limits, Metrics

from .store import ResultLease

#: CPU seconds a wall second of a one-threaded (wasm, python, js) slice may hold.
SINGLE_THREAD = 1.5


@dataclass(frozen=True)
class MetricsRules:
    """``slack_seconds``: what the wall time may exceed the lease's age and the slice's own
    wall-clock limit by (clock steps, rounding) and what CPU and GPU time may exceed their
    bound by; ``parallelism``: how many CPU (or GPU) seconds one wall second of an OpenCL
    slice may hold (PoCL runs one kernel on every core). A slice of any other runtime runs
    in one wasm thread: its CPU seconds are at most :data:`SINGLE_THREAD` per wall second
    (the evaluator's clock and reader threads beside it)."""

    slack_seconds: float = 1.0
    parallelism: float = 64.0

    def problem(
        self,
        metrics: Metrics,
        lease: ResultLease,
        result_bytes: int,
        now: float,
        runtime: str = "wasm",
        limits: Limits | None = None,
    ) -> str | None:
        """Why ``metrics`` cannot be true of a result of ``result_bytes`` bytes under
        ``lease`` received at ``now`` (Unix time, the scheduler's clock), for a slice of
        ``runtime`` under ``limits`` (the job's; None: not known); None if they can."""
        if metrics.bytes_in != lease.datum_bytes:
            return f"metrics.bytes_in is {metrics.bytes_in}; the datum has {lease.datum_bytes}"
        if metrics.bytes_out != result_bytes:
            return f"metrics.bytes_out is {metrics.bytes_out}; the result has {result_bytes}"
        if lease.leased_at is not None:
            age = max(0.0, now - lease.leased_at)
            if metrics.wall_seconds > age + self.slack_seconds:
                return (
                    f"metrics.wall_seconds is {metrics.wall_seconds:g}; the lease was granted "
                    f"{age:.3f} s ago"
                )
        if limits is not None and metrics.wall_seconds > limits.wall_seconds + self.slack_seconds:
            return (
                f"metrics.wall_seconds is {metrics.wall_seconds:g}; the slice's limit is "
                f"{limits.wall_seconds:g} s"
            )
        threads = self.parallelism if runtime == "opencl" else SINGLE_THREAD
        bound = metrics.wall_seconds * threads + self.slack_seconds
        for name in ("cpu_seconds", "gpu_seconds"):
            value = getattr(metrics, name)
            if value > bound:
                return (
                    f"metrics.{name} is {value:g}; at most {bound:g} for a wall time of "
                    f"{metrics.wall_seconds:g} s"
                )
        return None
