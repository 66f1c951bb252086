"""``dcp-evaluator-manager``: serve evaluators on a Unix socket / loopback; ``status``."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import click

from dcp_protocol import nesting

from ..launch import Hardening, probe_layers
from .daemon import (
    Access,
    Manager,
    ManagerError,
    activated_sockets,
    bind_tcp,
    bind_unix,
    read_token,
)
from .monitors import (
    BatteryMonitor,
    BusyPolicy,
    CpuMonitor,
    ExclusiveProgramMonitor,
    HoursMonitor,
    LoadMonitor,
    OperatorMonitor,
    RateMonitor,
    ScreensaverMonitor,
    TtyMonitor,
    parse_window,
    pts_atimes,
    read_loadavg,
)

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_HELD = 3
EXIT_NOT_RUNNING = 4


def default_status_file() -> Path:
    runtime = os.environ.get("RUNTIME_DIRECTORY") or os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "dcp-evaluator-manager.json"
    return Path(f"/tmp/dcp-evaluator-manager-{os.getuid()}.json")


def default_socket() -> Path:
    runtime = os.environ.get("RUNTIME_DIRECTORY") or os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "dcp-evaluator-manager.sock"
    return Path(f"/tmp/dcp-evaluator-manager-{os.getuid()}.sock")


_status = click.option(
    "--status-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Where the state and its reasons are written "
    "(default: $RUNTIME_DIRECTORY or $XDG_RUNTIME_DIR, else /tmp).",
)


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.pass_context
def main(ctx: click.Context) -> None:
    """Start sandboxed evaluators on demand for dcp-worker (one per connection), and stop or
    refuse them when the machine is busy. Without a command: `serve`."""
    os.umask(0o077)  # what it creates is its own; the socket, token and status say otherwise
    if ctx.invoked_subcommand is None:
        ctx.invoke(serve)


@main.command()
@click.option(
    "--socket",
    "socket_path",
    type=click.Path(dir_okay=False),
    help="The Unix socket (mode 0660, group --group; default: $RUNTIME_DIRECTORY or "
    "$XDG_RUNTIME_DIR/dcp-evaluator-manager.sock, else /tmp/dcp-evaluator-manager-UID.sock).",
)
@click.option(
    "--group",
    default="dcp",
    show_default=True,
    help="Besides root and this manager's user, members of this group may connect to the "
    "Unix socket (peer credentials); it also owns the socket and a created token file.",
)
@click.option(
    "--listen",
    default=None,
    metavar="HOST:PORT",
    help="Also listen on loopback TCP (any other host is replaced by 127.0.0.1); clients "
    "must send the secret of --token-file first.",
)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="The secret TCP clients send (created with a random one if missing, mode 0640; "
    "refused when other users can read it). Required with --listen.",
)
@click.option("--no-tcp", is_flag=True, help="Do not listen on TCP, even with --listen.")
@click.option(
    "--opencl-as-root",
    is_flag=True,
    help="Offer OpenCL even when evaluators would run as root (no account to drop to).",
)
@_status
@click.option(
    "--poll",
    type=click.FloatRange(min=0.05),
    default=3.0,
    show_default=True,
    help="Seconds between monitor polls.",
)
@click.option(
    "--max-load",
    type=float,
    default=None,
    help="Refuse new evaluators above this 1-minute load average (default: the number of CPUs).",
)
@click.option(
    "--max-rate",
    type=click.FloatRange(min=0.1),
    default=20.0,
    show_default=True,
    help="Refuse evaluators requested faster than this per second.",
)
@click.option(
    "--tty-idle",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Stop evaluators while a terminal was used within this many seconds (0: never).",
)
@click.option(
    "--tty-glob",
    default="/dev/pts/[0-9]*",
    show_default=True,
    help="Terminal devices whose access times show a person.",
)
@click.option("--run-on-battery", is_flag=True, help="Keep running on battery power.")
@click.option(
    "--ignore-screensaver",
    is_flag=True,
    help="Do not stop when the desktop's screensaver turns off (D-Bus).",
)
@click.option(
    "--exclusive",
    multiple=True,
    metavar="NAME",
    help="Stop while a program of this name runs. Repeatable.",
)
@click.option(
    "--hours",
    multiple=True,
    metavar="HH:MM-HH:MM",
    help="Run only within these local-time windows. Repeatable.",
)
@click.option(
    "--cpu-busy",
    type=click.FloatRange(0, 100),
    default=None,
    help="Stop while the CPU is busier than this percent (other programs).",
)
@click.option(
    "--cpu-resume",
    type=click.FloatRange(0, 100),
    default=None,
    help="Resume when it falls below this percent (default: half of --cpu-busy).",
)
@click.option(
    "--throttle",
    type=click.FloatRange(0.05, 1.0),
    default=1.0,
    show_default=True,
    help="Fraction of each second evaluators may run (duty cycle).",
)
@click.option(
    "--user",
    default="nobody",
    show_default=True,
    help="Unprivileged account evaluators run as when started as root.",
)
@click.option(
    "--no-network-namespace", is_flag=True, help="Do not put evaluators in a new network namespace."
)
@click.option("--loadavg-file", default="/proc/loadavg", hidden=True)
@click.option("-v", "--verbose", count=True)
def serve(
    socket_path: str | None,
    group: str,
    listen: str | None,
    token_file: str | None,
    no_tcp: bool,
    opencl_as_root: bool,
    status_file: str | None,
    poll: float,
    max_load: float | None,
    max_rate: float,
    tty_idle: float,
    tty_glob: str,
    run_on_battery: bool,
    ignore_screensaver: bool,
    exclusive: tuple[str, ...],
    hours: tuple[str, ...],
    cpu_busy: float | None,
    cpu_resume: float | None,
    throttle: float,
    user: str,
    no_network_namespace: bool,
    loadavg_file: str,
    verbose: int,
) -> None:
    """Serve evaluators (the default command). SIGUSR1 toggles an operator hold; SIGUSR2
    stops running evaluators once; SIGINT/SIGTERM stop the manager and its evaluators."""
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.WARNING - 10 * min(verbose, 2),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    operator = OperatorMonitor()
    monitors: list = [operator]  # type: ignore[type-arg]
    monitors.append(
        LoadMonitor(
            max_load if max_load is not None else float(os.cpu_count() or 1),
            lambda: read_loadavg(loadavg_file),
        )
    )
    if tty_idle > 0:
        monitors.append(TtyMonitor(tty_idle, lambda: pts_atimes(tty_glob)))
    if not run_on_battery:
        monitors.append(BatteryMonitor())
    if not ignore_screensaver:
        monitors.append(ScreensaverMonitor())
    if exclusive:
        monitors.append(ExclusiveProgramMonitor(frozenset(exclusive)))
    if hours:
        try:
            monitors.append(HoursMonitor(tuple(parse_window(h) for h in hours)))
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--hours") from None
    if cpu_busy is not None:
        monitors.append(
            CpuMonitor(cpu_busy, cpu_resume if cpu_resume is not None else cpu_busy / 2)
        )
    hardening = Hardening(user=user, network_namespace=not no_network_namespace)
    try:
        token = None
        if token_file:
            token = read_token(Path(token_file), group)
        sockets = activated_sockets()
        if not sockets:
            if listen and not no_tcp:
                if token is None:
                    raise ManagerError("--listen needs --token-file: TCP clients must send it")
                sockets.append(bind_tcp(listen))
            sockets.append(bind_unix(socket_path or str(default_socket()), group))
        elif token is None and any(s.family != socket.AF_UNIX for s in sockets):
            raise ManagerError("an activated TCP socket needs --token-file")
    except ManagerError as exc:
        click.echo(f"dcp-evaluator-manager: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    layers = probe_layers(hardening)
    manager = Manager(
        BusyPolicy(monitors),
        RateMonitor(max_rate),
        hardening,
        Path(status_file) if status_file else default_status_file(),
        poll,
        throttle,
        access=Access(group=group or None, token=token),
        opencl_as_root=opencl_as_root,
    )

    def ready() -> None:  # after the signal handlers and the status file: safe to use
        click.echo(
            "dcp-evaluator-manager listening on "
            + ", ".join(_name(s) for s in sockets)
            + "; sandbox layers: "
            + ", ".join(k for k, v in sorted(layers.items()) if v)
        )
        sys.stdout.flush()

    asyncio.run(_run(manager, sockets, ready))


def _name(sock: object) -> str:
    name = sock.getsockname()  # type: ignore[attr-defined]
    return name if isinstance(name, str) else f"{name[0]}:{name[1]}"


async def _run(manager: Manager, sockets: list, ready: Callable[[], None]) -> None:  # type: ignore[type-arg]
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, manager.stop)
    loop.add_signal_handler(signal.SIGUSR1, manager.operator_toggle)
    loop.add_signal_handler(signal.SIGUSR2, manager.operator_kick)
    await manager.serve(sockets, ready)


@main.command()
@_status
@click.option("--json", "as_json", is_flag=True, help="Print the status file as it is.")
def status(status_file: str | None, as_json: bool) -> None:
    """Why work is held (or not). Exit status 0 when accepting work, 3 when held, 4 when no
    manager is running."""
    path = Path(status_file) if status_file else default_status_file()
    try:
        data = nesting.loads(path.read_bytes())
        if not isinstance(data, dict):
            raise ValueError("not an object")
    except (OSError, ValueError):
        click.echo(f"dcp-evaluator-manager: no manager status at {path}", err=True)
        sys.exit(EXIT_NOT_RUNNING)
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        state = "accepting work" if data["accepting"] else "work held"
        click.echo(
            f"{state}; {data['running']} evaluator(s) running; listening on "
            f"{', '.join(data['listening'])}; updated {time.time() - data['updated']:.0f}"
            " s ago"
        )
        for hold in data["holds"]:
            action = "stops running evaluators" if hold["kill"] else "refuses new evaluators"
            click.echo(f"  {hold['reason']}: {hold['detail']} ({action})")
        if data.get("opencl_withheld"):
            click.echo(f"  OpenCL not offered: {data['opencl_withheld']}")
        click.echo(
            f"  started {data['started']}, refused {data['refused']}, preempted "
            f"{data['preempted']}, unauthorized {data.get('unauthorized', 0)}"
        )
    sys.exit(EXIT_OK if data["accepting"] else EXIT_HELD)
