"""``dcp-scheduler``: serve workers and the compute API; administer jobs."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import signal
import sys
import time
from typing import Any

import click
from aiohttp import web

from .server import Scheduler, SchedulerConfig
from .sqlite_store import SQLiteStore
from .store import StoreError

EXIT_OK = 0
EXIT_STORE_ERROR = 2
EXIT_UNKNOWN_JOB = 3


def _parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise click.BadParameter(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _open(db: str) -> SQLiteStore:
    try:
        return SQLiteStore(db)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
@click.option("-v", "--verbose", count=True, help="-v for info, -vv for debug logs.")
def main(verbose: int) -> None:
    """The reference scheduler: job store, slice leasing, result acceptance, admin."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(
        stream=sys.stderr, level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )


@main.command()
@click.option("--db", required=True, type=click.Path(dir_okay=False), help="SQLite database file.")
@click.option(
    "--listen",
    default="127.0.0.1:8500",
    show_default=True,
    help="HOST:PORT for the worker websocket (/worker) and the compute API (/api/v1).",
)
@click.option(
    "--lease-timeout",
    type=click.FloatRange(min=0.1),
    default=15.0,
    show_default=True,
    help="Seconds a lease lives without a heartbeat.",
)
@click.option(
    "--heartbeat-interval",
    type=click.FloatRange(min=0.05),
    default=3.0,
    show_default=True,
    help="Seconds between worker heartbeats.",
)
@click.option(
    "--name",
    default="dcp-scheduler",
    show_default=True,
    help="Server name bound into session challenges.",
)
def serve(db: str, listen: str, lease_timeout: float, heartbeat_interval: float, name: str) -> None:
    """Serve workers and the compute API until SIGINT or SIGTERM."""
    host, port = _parse_listen(listen)
    store = _open(db)
    config = SchedulerConfig(
        name=name, lease_timeout=lease_timeout, heartbeat_interval=heartbeat_interval
    )
    try:
        asyncio.run(_serve(Scheduler(store, config), host, port))
    finally:
        store.close()


async def _serve(scheduler: Scheduler, host: str, port: int) -> None:
    runner = web.AppRunner(scheduler.app(), handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    bound = runner.addresses[0]
    url = f"http://{bound[0]}:{bound[1]}"
    click.echo(
        f"dcp-scheduler listening on {url} (workers: ws://{bound[0]}:{bound[1]}/worker)", nl=True
    )
    sys.stdout.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


@main.group()
def jobs() -> None:
    """Inspect and administer jobs in a scheduler's database."""


_db = click.option(
    "--db",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="SQLite database file of the scheduler.",
)


@jobs.command("list")
@_db
@click.option("--json", "as_json", is_flag=True, help="One JSON object per job.")
def jobs_list(db: str, as_json: bool) -> None:
    """List jobs with their slice counts."""
    store = _open(db)
    for job in store.list_jobs():
        counts = job.counts
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "job": job.id,
                        "name": job.name,
                        "state": job.state,
                        "slices": job.total,
                        "counts": counts,
                    }
                )
            )
        else:
            summary = " ".join(f"{k}={v}" for k, v in sorted(counts.items()))
            click.echo(f"{job.id}  {job.state:<9}  {job.total:>7} slices  {summary}  {job.name}")


@jobs.command("show")
@_db
@click.argument("job")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per slice.")
def jobs_show(db: str, job: str, as_json: bool) -> None:
    """Show a job and each slice's state, attempts, worker and error."""
    store = _open(db)
    try:
        record = store.job(job)
    except StoreError as exc:
        click.echo(f"dcp-scheduler: {exc}", err=True)
        sys.exit(EXIT_UNKNOWN_JOB)
    if not as_json:
        click.echo(f"job {record.id} ({record.name}) {record.state}, owner {record.owner}")
        click.echo(
            f"runtime {record.runtime} module sha256 {record.module_sha256} "
            f"argv {list(record.argv)} max_attempts {record.max_attempts}"
        )
    after = -1
    while True:
        batch = store.slices(job, after, 1000)
        if not batch:
            break
        for s in batch:
            row: dict[str, Any] = {
                "slice": s.slice,
                "state": s.state,
                "attempts": s.attempts,
                "worker": s.worker,
                "error": s.error_code,
                "message": s.error,
                "progress": s.progress if s.state == "leased" else None,
            }
            if as_json:
                if s.result is not None:
                    row["result_base64"] = base64.b64encode(s.result).decode()
                click.echo(json.dumps(row))
            else:
                err = f"  {s.error_code}: {s.error}" if s.error_code else ""
                shown = s.state == "leased" and s.progress is not None
                progress = f"  progress={s.progress:.0%}" if shown else ""
                click.echo(
                    f"{s.slice:>7}  {s.state:<9}  attempts={s.attempts}  "
                    f"worker={s.worker or '-'}{progress}{err}"
                )
        after = batch[-1].slice


def _admin(action: str, db: str, job: str) -> None:
    store = _open(db)
    try:
        if action == "reset":
            click.echo(f"reset {store.reset_job(job)} failed slice(s) of {job}")
        elif action == "cancel":
            click.echo(f"cancelled {store.cancel_job(job, time.time())} slice(s) of {job}")
        else:
            store.remove_job(job)
            click.echo(f"removed {job}")
    except StoreError as exc:
        click.echo(f"dcp-scheduler: {exc}", err=True)
        sys.exit(EXIT_UNKNOWN_JOB)


@jobs.command("reset")
@_db
@click.argument("job")
def jobs_reset(db: str, job: str) -> None:
    """Put a job's failed slices back in the queue with fresh attempts."""
    _admin("reset", db, job)


@jobs.command("cancel")
@_db
@click.argument("job")
def jobs_cancel(db: str, job: str) -> None:
    """Cancel a job: its queued and leased slices will not run."""
    _admin("cancel", db, job)


@jobs.command("remove")
@_db
@click.argument("job")
def jobs_remove(db: str, job: str) -> None:
    """Delete a job and its slices and results."""
    _admin("remove", db, job)
