"""``dcp-scheduler``: serve workers and the compute API; administer jobs."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import secrets
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import click
from aiohttp import web

from dcp_protocol import MAX_FRAME_BYTES, nesting, policy, signing

from .limits import ConnectionLimits, RefusalLimits
from .listener import GuardedSite
from .server import Scheduler, SchedulerConfig
from .store import Store, StoreError, credits, to_micro
from .store.backends import is_postgres, open_store
from .store.migrations import LATEST, MIGRATIONS
from .terminal import detach_from_terminal, in_terminal_background, log_path
from .web import load_operator_token, operator_token_path

EXIT_OK = 0
EXIT_STORE_ERROR = 2
EXIT_UNKNOWN_JOB = 3
EXIT_BOOKS = 5
EXIT_FORCED = 5  # serve: stopped by a second signal or SIGQUIT
SHUTDOWN_SECONDS = 10.0


def _parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise click.BadParameter(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _open(db: str, busy_timeout: float = 10.0, upgrade: bool = False) -> Store:
    try:
        return open_store(db, upgrade=upgrade, busy_timeout=busy_timeout)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None


_DB_HELP = (
    "The scheduler's database: a SQLite file, or postgresql://USER@HOST/DB (libpq's URL, e.g."
    " ?host=/run/postgresql for its socket) shared by several replicas. Also DCP_SCHEDULER_DB."
)


def _existing_db(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """Admin commands open what exists: a missing SQLite file is a typo, not a new store."""
    if not is_postgres(value) and not Path(value).is_file():
        raise click.BadParameter(f"no database file {value!r}", ctx, param)
    return value


def _state_base(db: str, state_dir: str | None) -> Path:
    """The path whose ``.log`` and ``.console-token`` siblings ``serve`` writes: beside a
    SQLite file; for PostgreSQL (no file of ours) in ``state_dir`` or
    ~/.local/state/dcp-scheduler, named for the database."""
    if not is_postgres(db) and state_dir is None:
        return Path(db)
    if is_postgres(db):
        name = db.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] or "postgres"
    else:
        name = Path(db).name
    directory = Path(state_dir or "~/.local/state/dcp-scheduler").expanduser()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    return directory / name


def _defaults(group: click.Group, values: dict[str, Any]) -> dict[str, Any]:
    """click's default_map for ``group`` from a flat table of option values: each command
    (and subcommand) gets the values of the options it has."""
    out: dict[str, Any] = {}
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            out[name] = _defaults(command, values)
        else:
            params = {p.name for p in command.params}
            out[name] = {k: v for k, v in values.items() if k in params}
    return out


def _option_names(group: click.Group) -> set[str]:
    names: set[str] = set()
    for command in group.commands.values():
        if isinstance(command, click.Group):
            names |= _option_names(command)
        else:
            names |= {p.name for p in command.params if isinstance(p, click.Option) and p.name}
    return names


def _load_config(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """--config FILE: option values for every command, under the command line and the
    environment (DCP_SCHEDULER_DB and the like)."""
    if not value:
        return
    import tomllib

    try:
        with open(value, encoding="utf-8") as f:
            text = f.read()
        nesting.check_toml(text)  # tomllib recurses once per level
        table = tomllib.loads(text)
    except OSError as exc:
        raise click.BadParameter(f"cannot read {value}: {exc.strerror}", ctx, param) from None
    except UnicodeDecodeError:
        raise click.BadParameter(f"{value}: not UTF-8 text", ctx, param) from None
    except nesting.NestingTooDeep as exc:
        raise click.BadParameter(f"{value}: {exc}", ctx, param) from None
    except tomllib.TOMLDecodeError as exc:
        raise click.BadParameter(f"{value}: not TOML: {exc}", ctx, param) from None
    values = {key.replace("-", "_"): v for key, v in table.items()}
    assert isinstance(ctx.command, click.Group)
    unknown = sorted(set(values) - _option_names(ctx.command))
    if unknown:
        raise click.BadParameter(
            f"{value}: {', '.join(unknown)}: not an option of any dcp-scheduler command", ctx, param
        )
    ctx.default_map = _defaults(ctx.command, values)


@click.group()
@click.option("-v", "--verbose", count=True, help="-v for info, -vv for debug logs.")
@click.option(
    "--config",
    type=click.Path(dir_okay=False),
    envvar="DCP_SCHEDULER_CONFIG",
    callback=_load_config,
    is_eager=True,
    expose_value=False,
    help='A TOML file of option values for every command (db = "postgresql://...", '
    "listen, lease_timeout, ...); the command line and the environment win over it. Also "
    "DCP_SCHEDULER_CONFIG.",
)
def main(verbose: int) -> None:
    """The reference scheduler: job store, slice leasing, result acceptance, admin."""
    os.umask(0o077)  # the database and its WAL hold owners' code, data and results
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(
        stream=sys.stderr, level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )


@main.command()
@click.option("--db", required=True, envvar="DCP_SCHEDULER_DB", help=_DB_HELP)
@click.option(
    "--upgrade",
    is_flag=True,
    help="Apply the schema migrations an older database lacks before serving (else such a "
    "database is refused; see `dcp-scheduler db upgrade`).",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False),
    help="Where the console's operator token and a backgrounded serve's log go [default: "
    "beside a SQLite database; ~/.local/state/dcp-scheduler for PostgreSQL].",
)
@click.option(
    "--peer-wakeups",
    default="notify",
    show_default=True,
    help="How a PostgreSQL replica learns that another one made work available or results "
    "final: 'notify' (LISTEN/NOTIFY, with a 1 s safety poll) or 'poll:SECONDS'. Ignored for "
    "SQLite (one process).",
)
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
    "--job-lifetime",
    type=click.FloatRange(min=0.001),
    default=25.0,
    show_default=True,
    help="Hours after a job ends (finished or cancelled) before it is removed.",
)
@click.option(
    "--verifier-wall-seconds",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Wall-clock limit of a job's verifier on one result.",
)
@click.option(
    "--verifier-sandboxes",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Evaluator processes that run verifiers; 0: half the CPUs.",
)
@click.option(
    "--verifications-per-session",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Results of one worker session verified at once; the rest wait their turn.",
)
@click.option(
    "--metrics-slack-seconds",
    type=click.FloatRange(min=0.0),
    default=1.0,
    show_default=True,
    help="How far a result's wall time may exceed its lease's age (and CPU/GPU time their bound).",
)
@click.option(
    "--metrics-parallelism",
    type=click.FloatRange(min=1.0),
    default=64.0,
    show_default=True,
    help="CPU (or GPU) seconds one wall second of a result may hold.",
)
@click.option(
    "--db-busy-timeout",
    type=click.FloatRange(min=0.0),
    default=1.0,
    show_default=True,
    help="Seconds a request waits for a database lock held elsewhere (an admin command, a "
    "backup) before it is refused as 'internal' for the worker to retry; the server waits "
    "meanwhile, so keep it short.",
)
@click.option(
    "--db-connections",
    envvar="DCP_SCHEDULER_DB_CONNECTIONS",
    type=click.IntRange(0, 64),
    default=SchedulerConfig.db_connections,
    show_default=True,
    help="PostgreSQL: connections (each on a thread of its own) that the store calls run on, "
    "off the server's event loop, so one slow call holds up only its own request; 0 runs "
    "them on the loop, which is faster where the database shares the replica's CPUs "
    "(docs/performance.md). A replica opens one more, to LISTEN. SQLite runs its calls "
    "inline whatever this says.",
)
@click.option(
    "--auth-timeout",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Seconds a worker websocket has from its upgrade to an accepted auth; then it is "
    "closed (4008 auth_timeout).",
)
@click.option(
    "--max-unauthenticated-per-address",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Unauthenticated connections (HTTP requests being served, websockets before auth) "
    "one remote address may hold; more are refused at once (503).",
)
@click.option(
    "--max-unauthenticated",
    type=click.IntRange(min=1),
    default=1024,
    show_default=True,
    help="Unauthenticated connections from all addresses together; more are refused (503).",
)
@click.option(
    "--http-header-timeout",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Seconds a connection has to send a whole request line and headers (and the most a "
    "keep-alive connection may idle between requests); then it is closed.",
)
@click.option(
    "--http-body-timeout",
    type=click.FloatRange(min=0.1),
    default=60.0,
    show_default=True,
    help="Seconds a request has to send its whole body; then it is refused (408) and closed.",
)
@click.option(
    "--refusal-burst",
    type=click.IntRange(min=1),
    default=RefusalLimits.burst,
    show_default=True,
    help="Refused frames (forged or stale results, heartbeats of leases not held, malformed "
    "frames) a session may send at once; past it its frames are read at --refusal-rate.",
)
@click.option(
    "--refusal-rate",
    type=click.FloatRange(min=0.0, min_open=True),
    default=RefusalLimits.rate,
    show_default=True,
    help="Refused frames per second a session may go on sending past --refusal-burst.",
)
@click.option(
    "--max-leases-per-worker",
    type=click.IntRange(min=1),
    default=SchedulerConfig.max_leases_per_worker,
    show_default=True,
    help="Leases one worker identity may hold at once; its fetches lease nothing more until "
    "it returns results (or its leases expire).",
)
@click.option(
    "--name",
    default="dcp-scheduler",
    show_default=True,
    help="Server name bound into session challenges.",
)
@click.option(
    "--max-result-bytes",
    type=click.IntRange(min=1),
    default=SchedulerConfig.max_result_bytes,
    show_default=True,
    help="The largest result accepted (announced to workers in welcome).",
)
@click.option(
    "--max-frame-bytes",
    type=click.IntRange(1, MAX_FRAME_BYTES),
    default=MAX_FRAME_BYTES,
    show_default=True,
    help="The largest websocket frame of a session (announced in welcome); it must carry one "
    "result of --max-result-bytes in base64 and 4 KiB more.",
)
def serve(
    db: str,
    upgrade: bool,
    state_dir: str | None,
    peer_wakeups: str,
    listen: str,
    lease_timeout: float,
    heartbeat_interval: float,
    verifier_wall_seconds: float,
    verifier_sandboxes: int,
    verifications_per_session: int,
    metrics_slack_seconds: float,
    metrics_parallelism: float,
    job_lifetime: float,
    db_busy_timeout: float,
    db_connections: int,
    auth_timeout: float,
    max_unauthenticated_per_address: int,
    max_unauthenticated: int,
    http_header_timeout: float,
    http_body_timeout: float,
    refusal_burst: int,
    refusal_rate: float,
    max_leases_per_worker: int,
    name: str,
    max_result_bytes: int,
    max_frame_bytes: int,
) -> None:
    """Serve workers, the compute API and the web console until SIGINT or SIGTERM.

    In the background of a terminal (``serve ... &``) its output goes to DB.log instead.
    The console's operator token is kept in DB.console-token (0600)."""
    host, port = _parse_listen(listen)
    try:
        config = SchedulerConfig(
            name=name,
            lease_timeout=lease_timeout,
            heartbeat_interval=heartbeat_interval,
            verifier_wall_seconds=verifier_wall_seconds,
            verifier_sandboxes=verifier_sandboxes,
            verifications_per_session=verifications_per_session,
            metrics_slack_seconds=metrics_slack_seconds,
            metrics_parallelism=metrics_parallelism,
            job_lifetime=job_lifetime * 3600,
            max_result_bytes=max_result_bytes,
            max_frame_bytes=max_frame_bytes,
            limits=ConnectionLimits(
                per_address=max_unauthenticated_per_address,
                total=max_unauthenticated,
                auth_timeout=auth_timeout,
            ),
            http_header_timeout=http_header_timeout,
            http_body_timeout=http_body_timeout,
            refusals=RefusalLimits(burst=refusal_burst, rate=refusal_rate),
            max_leases_per_worker=max_leases_per_worker,
            db_connections=db_connections,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    wakeups = _peer_wakeups(peer_wakeups)
    try:
        base = _state_base(db, state_dir)
    except OSError as exc:
        raise click.ClickException(f"cannot make the state directory: {exc}") from None
    if in_terminal_background():
        try:
            detach_from_terminal(log_path(base))
        except OSError as exc:
            raise click.ClickException(f"cannot write the log {log_path(base)}: {exc}") from None
    store = _open(db, db_busy_timeout, upgrade=upgrade)
    if 0 < len(store.applied) < len(MIGRATIONS):  # an existing database, upgraded
        for migration in store.applied:
            click.echo(f"applied schema {migration.version}: {migration.what}", err=True)
    token_path = operator_token_path(base)
    try:
        operator_token = load_operator_token(token_path)
    except OSError as exc:
        store.close()
        raise click.ClickException(f"cannot keep the console's operator token: {exc}") from None
    try:
        scheduler = Scheduler(store, config, operator_token=operator_token, peer_wakeups=wakeups)
        if scheduler.db.threaded:
            # The pool's connections serve from here on: the one the migrations ran on goes
            # back to the server (a PostgreSQL store opens another if it is used again).
            store.close()
        asyncio.run(_serve(scheduler, host, port, token_path))
    finally:
        store.close()


async def _serve(scheduler: Scheduler, host: str, port: int, token_path: Path) -> None:
    runner = web.AppRunner(
        scheduler.app(),
        handle_signals=False,
        access_log=None,
        shutdown_timeout=SHUTDOWN_SECONDS,
        **scheduler.runner_options(),
    )
    await runner.setup()
    site = GuardedSite(runner, host, port, scheduler)
    try:
        await site.start()
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    bound = runner.addresses[0]
    url = f"http://{bound[0]}:{bound[1]}"
    click.echo(
        f"dcp-scheduler listening on {url} (workers: ws://{bound[0]}:{bound[1]}/worker)", nl=True
    )
    # The path only: the token itself is never printed or logged.
    click.echo(f"web console: {url}/console/ (operator token in {token_path})")
    sys.stdout.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():  # a second signal: stop now (the store is transactional)
            os._exit(EXIT_FORCED)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    loop.add_signal_handler(signal.SIGQUIT, lambda: os._exit(EXIT_FORCED))
    await stop.wait()
    # Stop accepting, tell workers to go (1001), let handlers finish their transactions.
    await runner.cleanup()


@main.group()
def jobs() -> None:
    """Inspect and administer jobs in a scheduler's database."""


_db = click.option(
    "--db", required=True, envvar="DCP_SCHEDULER_DB", callback=_existing_db, help=_DB_HELP
)


def _peer_wakeups(value: str) -> float | None:
    """--peer-wakeups: None for LISTEN/NOTIFY, else the poll's period in seconds."""
    if value == "notify":
        return None
    kind, _, seconds = value.partition(":")
    try:
        period = float(seconds)
    except ValueError:
        period = -1.0
    if kind != "poll" or not 0.01 <= period <= 60:
        raise click.BadParameter(
            f"expected 'notify' or 'poll:SECONDS' (0.01 to 60), not {value!r}",
            param_hint="--peer-wakeups",
        )
    return period


@main.group("db")
def db_group() -> None:
    """The database's schema: its version, and the migrations that upgrade it."""


@db_group.command("upgrade")
@click.option("--db", required=True, envvar="DCP_SCHEDULER_DB", help=_DB_HELP)
def db_upgrade(db: str) -> None:
    """Apply the schema migrations the database lacks (creating it if empty); each
    migration is one transaction, and replicas may keep serving the schema they know only
    if it is theirs: upgrade, then restart them with the new release."""
    store = _open(db, upgrade=True)
    try:
        for migration in store.applied:
            click.echo(f"applied {migration.version}: {migration.what}")
        click.echo(f"{store.where}: schema {store.schema_version()} (latest {LATEST})")
    finally:
        store.close()


@db_group.command("status")
@_db
def db_status(db: str) -> None:
    """Print the database's schema version and the migrations it lacks (exit 1 if any)."""
    try:
        store = open_store(db)
    except StoreError as exc:
        click.echo(f"dcp-scheduler: {exc}", err=True)
        sys.exit(1)
    try:
        click.echo(f"{store.where}: schema {store.schema_version()} (latest {LATEST})")
    finally:
        store.close()


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
        click.echo(f"job {record.id} ({record.name}) {record.state}, owner {_shown(record.owner)}")
        click.echo(
            f"runtime {record.runtime} module sha256 {record.module_sha256} "
            f"argv {list(record.argv)} max_attempts {record.max_attempts}"
        )
        click.echo(
            f"offer {credits(record.offer_micro):.6f} credits/slice, escrow "
            f"{credits(record.escrow_micro):.6f}, group {record.group or '(public)'}, "
            f"verifier {'yes' if record.has_verifier else 'no'}, requirements "
            f"{record.requirements or '-'}"
        )
        if (policy := record.redundancy) is not None:
            compare = "the job's function" if record.has_compare else "bytes"
            click.echo(
                f"redundancy: quorum {policy.quorum}, max_replicas {policy.max_replicas},"
                f" adaptive {'yes' if policy.adaptive else 'no'}, spot checks"
                f" {policy.spot_check_rate:g}, votes compared by {compare}"
            )
        for r in store.refusals(job):
            click.echo(f"refused {r.count}x by {_shown(r.worker)}: {r.code} {r.message}")
    votes: dict[int, Counter[str]] = {}
    for replica in store.replicas(job) if record.redundancy else []:
        votes.setdefault(replica.input, Counter())[replica.kind] += 1
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
                "worker": _shown(s.worker) if s.worker else s.worker,
                "error": s.error_code,
                "message": s.error,
                "progress": s.progress if s.state == "leased" else None,
            }
            if s.needed is not None:
                row["quorum"] = {"needed": s.needed, "votes": dict(votes.get(s.slice, {}))}
            if as_json:
                if s.result is not None:
                    row["result_base64"] = base64.b64encode(s.result).decode()
                click.echo(json.dumps(row))
            else:
                err = f"  {s.error_code}: {s.error}" if s.error_code else ""
                shown = s.state == "leased" and s.progress is not None
                progress = f"  progress={s.progress:.0%}" if shown else ""
                quorum = ""
                if s.needed is not None:
                    shown_votes = " ".join(
                        f"{k}={v}" for k, v in sorted(votes.get(s.slice, {}).items())
                    )
                    quorum = f"  needed={s.needed} {shown_votes}"
                click.echo(
                    f"{s.slice:>7}  {s.state:<9}  attempts={s.attempts}  "
                    f"worker={_shown(s.worker) if s.worker else '-'}{progress}{quorum}{err}"
                )
        after = batch[-1].slice


def _admin(action: str, db: str, job: str) -> None:
    store = _open(db)
    try:
        if action == "reset":
            click.echo(f"reset {store.reset_job(job, time.time())} failed slice(s) of {job}")
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


@main.group()
def groups() -> None:
    """Compute groups: jobs deployed into a group run only on workers that joined it."""


@groups.command("create")
@_db
@click.argument("name")
@click.option("--join-key", help="Join key (default: derived from NAME).")
def groups_create(db: str, name: str, join_key: str | None) -> None:
    """Create a group; prints its join key and join secret once (only a hash is stored)."""
    key = join_key or "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    if not key:
        raise click.BadParameter("give a NAME with letters or digits, or --join-key")
    secret = secrets.token_urlsafe(24)
    store = _open(db)
    try:
        store.create_group(name, key, policy.join_hash(key, secret), time.time())
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"join_key = {key}")
    click.echo(f"join_secret = {secret}")
    click.echo("# The secret is not stored: keep it now. Workers join with")
    click.echo(
        f"#   dcp-worker --join {key},{secret}   (or join_hash = {policy.join_hash(key, secret)})"
    )


@groups.command("list")
@_db
def groups_list(db: str) -> None:
    """List groups (join key and name)."""
    for g in _open(db).groups():
        click.echo(f"{g.join_key}  {g.name}")


@main.group()
def bank() -> None:
    """Accounts and the ledger (amounts in credits, kept as integer micro-credits)."""


def _amount(value: str) -> int:
    try:
        micro = to_micro(float(value))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number of credits") from None
    if micro <= 0 or micro > 10**18:
        raise click.BadParameter("the amount must be positive (and sane)")
    return micro


@bank.command("mint")
@_db
@click.argument("address")
@click.argument("amount")
def bank_mint(db: str, address: str, amount: str) -> None:
    """Create AMOUNT credits in ADDRESS's account (an operator's act; in the ledger)."""
    store = _open(db)
    balance = store.mint(_address(address), _amount(amount), time.time())
    click.echo(f"{_address(address)} {credits(balance):.6f}")


@bank.command("balance")
@_db
@click.argument("address")
def bank_balance(db: str, address: str) -> None:
    """Print ADDRESS's balance in credits."""
    click.echo(f"{credits(_open(db).balance(_address(address))):.6f}")


@bank.command("ledger")
@_db
@click.option("--account", help="Only entries that debit or credit this address.")
@click.option("--check", is_flag=True, help="Verify that credits are conserved (exit 5 if not).")
def bank_ledger(db: str, account: str | None, check: bool) -> None:
    """Print the ledger, one entry per line, oldest first."""
    store = _open(db)
    for e in store.ledger(_address(account) if account else None, limit=10**9):
        where = f" job {e.job}" + (f"/{e.slice}" if e.slice is not None else "") if e.job else ""
        click.echo(
            f"{e.seq:>7} {e.kind:<8} {credits(e.amount_micro):>16.6f} "
            f"{_shown(e.debit)} -> {_shown(e.credit)}{where}"
        )
    if check:
        t = store.totals()
        ok = (
            t["minted"] == t["accounts"] + t["escrow"]
            and t["escrowed"] == t["paid"] + t["refunded"] + t["escrow"]
        )
        click.echo(" ".join(f"{k}={credits(v):.6f}" for k, v in t.items()))
        if not ok:
            click.echo("dcp-scheduler: the books do not balance", err=True)
            sys.exit(EXIT_BOOKS)


@main.group()
def workers() -> None:
    """Workers seen by this scheduler."""


@workers.command("list")
@_db
@click.option("--refusals", is_flag=True, help="Also list each worker's refusals.")
def workers_list(db: str, refusals: bool) -> None:
    """Each worker's results accepted, rejected, failed, refused, and credits earned."""
    store = _open(db)
    by_worker: dict[str, list[Any]] = {}
    for r in store.refusals():
        by_worker.setdefault(r.worker, []).append(r)
    for w in store.workers():
        click.echo(
            f"{_shown(w.address)}  accepted={w.accepted} rejected={w.rejected} failed={w.failed} "
            f"refused={w.refused} earned={credits(w.earned_micro):.6f}"
        )
        if refusals:
            for r in by_worker.get(w.address, []):
                click.echo(f"    job {r.job}: {r.code} x{r.count} {r.message}")


@workers.command("show")
@_db
@click.argument("address", callback=lambda _c, _p, v: _address(v))
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def workers_show(db: str, address: str, as_json: bool) -> None:
    """A worker identity's (or payment address's) record and reputation: results accepted,
    rejected, failed and refused; votes validated and outvoted, validated in a row (the
    adaptive trust), its error rate; whether it is blocked; its last disagreements."""
    store = _open(db)
    worker, payee = store.worker(address), store.payee(address)
    if worker is None and payee is None:
        click.echo(
            f"dcp-scheduler: {address} is neither a worker nor a payment address seen", err=True
        )
        sys.exit(EXIT_UNKNOWN_JOB)
    out: dict[str, Any] = {"address": address, "blocked": store.blocked().get(address.lower())}
    if worker is not None:
        rate = worker.error_rate
        out["worker"] = {
            "accepted": worker.accepted,
            "rejected": worker.rejected,
            "failed": worker.failed,
            "refused": worker.refused,
            "earned": credits(worker.earned_micro),
            "validated": worker.valid,
            "outvoted": worker.invalid,
            "consecutive_valid": worker.consecutive_valid,
            "error_rate": None if rate is None else round(rate, 6),
            "first_seen": worker.first_seen,
            "last_seen": worker.last_seen,
        }
    if payee is not None:
        out["payee"] = {
            "validated": payee.valid,
            "outvoted": payee.invalid,
            "consecutive_valid": payee.consecutive_valid,
            "error_rate": None if payee.error_rate is None else round(payee.error_rate, 6),
            "earned": credits(payee.earned_micro),
        }
    out["disagreements"] = [
        {"job": r.job, "slice": r.input, "replica": r.slice, "at": r.accepted_at}
        for r in store.disagreements(address, 20)
    ]
    if as_json:
        click.echo(json.dumps(out))
        return
    click.echo(f"{address}" + (f"  BLOCKED: {out['blocked']}" if out["blocked"] else ""))
    for part in ("worker", "payee"):
        if part in out:
            fields = " ".join(
                f"{k}={_when(v) if k.endswith('_seen') else v}" for k, v in out[part].items()
            )
            click.echo(f"  as {'identity' if part == 'worker' else 'payment address'}: {fields}")
    for d in out["disagreements"]:
        click.echo(f"  outvoted on job {d['job']} slice {d['slice']} (replica {d['replica']})")


@workers.command("block")
@_db
@click.argument("address", callback=lambda _c, _p, v: _address(v))
@click.option("--reason", required=True, help="Why: shown to the worker when it is refused.")
def workers_block(db: str, address: str, reason: str) -> None:
    """Block an identity or a payment address: no session, no result accepted (on every
    replica of the database within a few seconds)."""
    _open(db).block(address, reason, time.time())
    click.echo(f"blocked {address}: {reason}")


@workers.command("unblock")
@_db
@click.argument("address", callback=lambda _c, _p, v: _address(v))
def workers_unblock(db: str, address: str) -> None:
    """Lift a block."""
    if not _open(db).unblock(address):
        click.echo(f"dcp-scheduler: {address} is not blocked", err=True)
        sys.exit(EXIT_UNKNOWN_JOB)
    click.echo(f"unblocked {address}")


def _when(at: float) -> str:
    """A Unix time as the admin commands print it (UTC)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def _shown(value: str) -> str:
    """An address as every command prints it, EIP-55 checksummed (the store keeps what it
    keeps); a ledger's other parties (escrow, mint) as they are."""
    try:
        return signing.checksum(value)
    except ValueError:
        return value


def _address(value: str) -> str:
    try:
        return signing.checksum(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an address") from None
