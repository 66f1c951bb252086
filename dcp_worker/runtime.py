"""The worker's runtime around a :class:`~dcp_worker.supervisor.Supervisor`: the signal ladder,
the control socket, systemd notifications, the metrics endpoint, and the exit codes.

``dcp-worker run`` (console output) and the dashboard both run a supervisor through
:func:`serve`; the dashboard handles its own keys instead of signals.

Exit codes: 0 stopped cleanly with every result delivered; 1 stopped with results left in the
outbox (they are sent on the next start); 2 bad configuration; 3 identity or passphrase
problem; 4 the scheduler refused this worker; 5 stopped by a second signal; 6 the evaluator
does not start.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import click

from .config import ConfigError
from .control import ControlError, ControlServer
from .logs import LogSetup
from .notify import Notifier
from .supervisor import Supervisor

__all__ = [
    "EXIT_CONFIG",
    "EXIT_EVALUATOR",
    "EXIT_FORCED",
    "EXIT_IDENTITY",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_UNFLUSHED",
    "serve",
]

EXIT_OK = 0
EXIT_UNFLUSHED = 1
EXIT_CONFIG = 2
EXIT_IDENTITY = 3
EXIT_REFUSED = 4
EXIT_FORCED = 5
EXIT_EVALUATOR = 6

log = logging.getLogger("dcp.worker")


async def serve(supervisor: Supervisor, logsetup: LogSetup, signals: bool = True) -> int:
    """Run ``supervisor`` with its control socket, systemd notifications and metrics; returns
    the exit code. ``signals``: install the signal ladder (the dashboard handles its keys)."""
    loop = asyncio.get_running_loop()
    count = 0

    def on_signal(signum: int) -> None:
        nonlocal count
        count += 1
        if count == 1 and signum != signal.SIGQUIT:
            log.warning("%s: graceful stop (send again to stop now)", signal.Signals(signum).name)
            supervisor.stop()
        elif count <= 2:
            supervisor.stop_now()
        else:
            os._exit(EXIT_FORCED)

    if signals:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
            loop.add_signal_handler(sig, on_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, logsetup.reopen)
    control = ControlServer(
        supervisor.config.control_path,
        supervisor.snapshot,
        {**supervisor.actions(), "stop_now": supervisor.stop_now},
        logsetup.recent,
        supervisor.commands(),
    )
    metrics = None
    if supervisor.config.metrics:
        from .metrics import MetricsServer

        metrics = MetricsServer(supervisor, supervisor.config.metrics)
    console = None
    if supervisor.config.console_port >= 0:
        from .web import ConsoleServer

        console = ConsoleServer(
            supervisor,
            logsetup.recent,
            supervisor.config.console_host,
            supervisor.config.console_port,
            supervisor.config.console_token_path,
        )
    # Every listener the configuration asks for opens before any work starts; one that
    # cannot is a configuration error, and the ones already open close again.
    try:
        await control.start()
        if metrics is not None:
            await metrics.start()
        if console is not None:
            await console.start()
            supervisor.console_url = console.url
    except (ControlError, ConfigError) as exc:
        log.error("%s", exc)
        click.echo(f"dcp-worker: {exc}", err=True)
        await control.close()
        if metrics is not None:
            await metrics.close()
        supervisor.outbox.close()
        return EXIT_CONFIG
    notifier = Notifier()
    helpers = [asyncio.create_task(notifier.run(supervisor.snapshot))]
    try:
        clean = await supervisor.run()
    finally:
        notifier.send("STOPPING=1")
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        if metrics is not None:
            await metrics.close()
        if console is not None:
            await console.close()
        await control.close()
    stats = supervisor.statistics()
    log.warning(
        "stopped: %d slice(s) done, %d failed, %d refused, %d result(s) accepted, "
        "%.6f credits earned, %d in the outbox",
        stats.slices_done,
        stats.slices_failed,
        stats.slices_declined,
        stats.results_accepted,
        stats.credits_earned,
        stats.outbox,
    )
    if supervisor.evaluator_broken:
        click.echo(f"dcp-worker: {supervisor.exit_reason}", err=True)
        return EXIT_EVALUATOR
    if supervisor.refused is not None:
        click.echo(f"dcp-worker: {supervisor.exit_reason}", err=True)
        return EXIT_REFUSED
    if clean:
        return EXIT_OK
    return EXIT_FORCED if supervisor.stopped_now else EXIT_UNFLUSHED
