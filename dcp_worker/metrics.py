"""Opt-in Prometheus metrics (``metrics = "127.0.0.1:9101"``): ``GET /metrics`` on loopback.

A custom collector (prometheus-client) reads the supervisor's counters at scrape time, so
nothing is counted twice and the hot path pays nothing for it.
"""

from __future__ import annotations

import logging
import os
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

from .config import ConfigError
from .state import FETCH_BUCKETS

if TYPE_CHECKING:
    from .supervisor import Supervisor

__all__ = ["MetricsServer", "SupervisorCollector"]

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


class MetricsServer:
    """``GET /metrics`` on ``listen`` (HOST:PORT on loopback, checked by the config)."""

    def __init__(self, supervisor: Supervisor, listen: str) -> None:
        self.listen = listen
        registry = CollectorRegistry(auto_describe=False)
        registry.register(SupervisorCollector(supervisor))

        async def metrics(_request: web.Request) -> web.Response:
            body = generate_latest(registry)  # in the loop: the counters are not thread-safe
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)

    async def start(self) -> None:
        """Listen, or fail before the worker starts: the configuration asked for it.

        Raises:
            ConfigError: the address cannot be listened on (in use, say); nothing is left
                listening.
        """
        await self._runner.setup()
        host, _, port = self.listen.rpartition(":")
        site = web.TCPSite(self._runner, host.strip("[]"), int(port))
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            why = os.strerror(exc.errno) if exc.errno else str(exc)  # asyncio rewrites strerror
            raise ConfigError(f"metrics {self.listen}: cannot listen: {why}") from None
        log.info("metrics at http://%s/metrics", self.listen)

    async def close(self) -> None:
        await self._runner.cleanup()
