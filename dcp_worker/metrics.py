"""Opt-in Prometheus metrics (``metrics = "127.0.0.1:9101"``): ``GET /metrics`` on loopback.

A custom collector (prometheus-client) reads the supervisor's counters at scrape time, so
nothing is counted twice and the hot path pays nothing for it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .state import FETCH_BUCKETS

if TYPE_CHECKING:
    from .supervisor import Supervisor

__all__ = ["SupervisorCollector", "serve_metrics"]

log = logging.getLogger("dcp.worker.metrics")


class SupervisorCollector(Collector):
    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        sup = self.supervisor
        snap = sup.snapshot()
        stats = snap["statistics"]
        c = sup.metrics()
        slices = CounterMetricFamily("dcp_worker_slices", "Slices by outcome.", labels=["outcome"])
        slices.add_metric(["done"], stats["slices_done"])
        slices.add_metric(["failed"], stats["slices_failed"])
        slices.add_metric(["declined"], stats["slices_declined"])
        yield slices
        results = CounterMetricFamily(
            "dcp_worker_results", "Results by the scheduler's answer.", labels=["answer"]
        )
        results.add_metric(["accepted"], stats["results_accepted"])
        results.add_metric(["refused"], stats["results_refused"])
        yield results
        errors = CounterMetricFamily(
            "dcp_worker_errors",
            "Failures and refusals by event and reason.",
            labels=["event", "reason"],
        )
        for (event, code), n in sorted(c.reasons.items()):
            errors.add_metric([event, code], n)
        yield errors
        yield CounterMetricFamily(
            "dcp_worker_credits_earned",
            "Credits for accepted results.",
            value=stats["credits_earned"],
        )
        sandboxes = GaugeMetricFamily(
            "dcp_worker_sandboxes", "Sandboxes by state.", labels=["state"]
        )
        states: dict[str, int] = {"idle": 0, "working": 0}
        for box in snap["sandboxes"]:
            states[box["state"]] = states.get(box["state"], 0) + 1
        for state, n in sorted(states.items()):
            sandboxes.add_metric([state], n)
        yield sandboxes
        yield GaugeMetricFamily(
            "dcp_worker_queued_slices",
            "Slices leased, waiting for a sandbox.",
            value=stats["queued"],
        )
        yield GaugeMetricFamily(
            "dcp_worker_outbox_results",
            "Results finished, not yet acknowledged.",
            value=stats["outbox"],
        )
        yield GaugeMetricFamily(
            "dcp_worker_connected",
            "1 while a scheduler session is open.",
            value=int(stats["connected"]),
        )
        yield GaugeMetricFamily(
            "dcp_worker_paused", "1 while fetching is paused.", value=int(sup.paused)
        )
        buckets, total = [], 0
        for bound, n in zip((*FETCH_BUCKETS, float("inf")), c.fetch_buckets, strict=True):
            total += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), total))
        yield HistogramMetricFamily(
            "dcp_worker_fetch_seconds",
            "Fetch round trips (long polls wait for work, up to 10 s).",
            buckets=buckets,
            sum_value=c.fetch_seconds,
        )


async def serve_metrics(supervisor: Supervisor, listen: str) -> None:
    """Serve until cancelled. ``listen`` is HOST:PORT on loopback (checked by the config)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SupervisorCollector(supervisor))

    async def metrics(_request: web.Request) -> web.Response:
        body = generate_latest(registry)  # in the loop: the counters are not thread-safe
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    host, _, port = listen.rpartition(":")
    site = web.TCPSite(runner, host.strip("[]"), int(port))
    try:
        await site.start()
    except OSError as exc:
        log.error("metrics: cannot listen on %s: %s", listen, exc.strerror)
        await runner.cleanup()
        return
    log.info("metrics at http://%s/metrics", listen)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
