"""``dcp-worker``: run the worker supervisor.

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
import sys
from typing import Any

import click

from . import __version__
from . import identity as idmod
from .config import ConfigError, GroupConfig, load_config
from .outbox import OutboxError
from .supervisor import Supervisor

EXIT_OK = 0
EXIT_UNFLUSHED = 1
EXIT_CONFIG = 2
EXIT_IDENTITY = 3
EXIT_REFUSED = 4
EXIT_FORCED = 5
EXIT_EVALUATOR = 6

log = logging.getLogger("dcp.worker")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    help="TOML config file (keys as etc/dcp-worker.toml).",
)
@click.option("--scheduler", help="Scheduler URL, e.g. http://127.0.0.1:8500.")
@click.option("--identity", help="Identity keystore (Ethereum V3 JSON).")
@click.option("--passphrase-file", help="File holding the identity keystore's passphrase.")
@click.option("--payment-address", help="Address credited for results (default: identity).")
@click.option("--sandboxes", type=click.IntRange(min=1), help="Evaluator processes to run.")
@click.option("--prefetch", type=click.IntRange(min=0), help="Slices leased ahead.")
@click.option("--state-dir", help="Directory of the durable outbox.")
@click.option(
    "--evaluator",
    help="Reach evaluators through dcp-evaluator-manager: "
    "tcp://127.0.0.1:9000 or a Unix socket path (default: start them here).",
)
@click.option("--grace-seconds", type=click.FloatRange(min=0.1), help="Bound of a graceful stop.")
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
@click.option("-v", "--verbose", count=True, help="-v: info logs; -vv: debug logs.")
@click.version_option(__version__, prog_name="dcp-worker")
def main(config_file: str | None, verbose: int, **overrides: object) -> None:
    """Lend this machine's CPU to a scheduler: fetch slices, compute them in sandboxed
    evaluators, return signed results.

    First SIGINT/SIGTERM: stop fetching, return queued slices, finish running ones, deliver
    results, exit. Second signal (or SIGQUIT): exit now; undelivered results stay in the
    outbox and are sent on the next start.
    """
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.WARNING - 10 * min(verbose, 2),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        config = load_config(config_file, _policy_overrides(overrides))
    except ConfigError as exc:
        click.echo(f"dcp-worker: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    if not config.identity or not config.passphrase_file:
        click.echo(
            "dcp-worker: an identity keystore and its passphrase file are required "
            "(--identity, --passphrase-file)",
            err=True,
        )
        sys.exit(EXIT_CONFIG)
    try:
        identity = idmod.load_keystore(
            os.path.expanduser(config.identity),
            idmod.read_passphrase_file(os.path.expanduser(config.passphrase_file)),
        )
    except idmod.WalletError as exc:
        click.echo(f"dcp-worker: {exc}", err=True)
        sys.exit(EXIT_IDENTITY)
    try:
        supervisor = Supervisor(config, identity)
    except (OutboxError, ValueError) as exc:
        click.echo(f"dcp-worker: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    sys.exit(asyncio.run(_run(supervisor)))


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
    return overrides


async def _run(supervisor: Supervisor) -> int:
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1 and signum != signal.SIGQUIT:
            log.warning("%s: graceful stop (send again to stop now)", signal.Signals(signum).name)
            supervisor.stop()
        elif signals <= 2:
            supervisor.stop_now()
        else:
            os._exit(EXIT_FORCED)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
        loop.add_signal_handler(sig, on_signal, sig)
    clean = await supervisor.run()
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
