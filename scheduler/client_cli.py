"""``dcp-compute``: deploy jobs to a scheduler and read their results."""

from __future__ import annotations

import base64
import json
import os
import sys

import click

from dcp_keys import identity as idmod

from .client import ComputeClient, ComputeError
from .jobdoc import JobFileError

EXIT_ERROR = 1
EXIT_JOB_INCOMPLETE = 4


class _Command(click.Command):
    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except (ComputeError, JobFileError, idmod.WalletError) as exc:
            click.echo(f"dcp-compute: {exc}", err=True)
            ctx.exit(EXIT_ERROR)


def _identity(path: str | None, passphrase_file: str | None) -> idmod.Identity | None:
    if path is None:
        return None
    if passphrase_file is None:
        raise click.UsageError("--identity needs --passphrase-file")
    return idmod.load_keystore(path, idmod.read_passphrase_file(passphrase_file))


@click.group()
@click.option(
    "--scheduler",
    envvar="DCP_SCHEDULER",
    default="http://127.0.0.1:8500",
    show_default=True,
    help="Scheduler URL (http(s):// or ws(s)://).",
)
@click.pass_context
def main(ctx: click.Context, scheduler: str) -> None:
    """Deploy jobs to a scheduler and collect their results."""
    os.umask(0o077)  # results and tokens written here are the owner's alone
    ctx.obj = scheduler


_identity_opt = click.option(
    "--identity",
    type=click.Path(exists=True, dir_okay=False),
    help="Keystore of the job owner (signs the request).",
)
_pass_opt = click.option("--passphrase-file", type=click.Path(exists=True, dir_okay=False))
_token_opt = click.option(
    "--token",
    envvar="DCP_READ_TOKEN",
    help="A read token for the job (from `dcp-compute token`), instead of --identity. "
    "Other users can see command lines: prefer the DCP_READ_TOKEN variable.",
)


def _reader(
    scheduler: str, identity: str | None, passphrase_file: str | None, token: str | None
) -> ComputeClient:
    """A client that reads a job: signed with --identity, or with a read token."""
    if identity is None and token is None:
        # Sent anyway: the scheduler answers why (unauthenticated), and a public listing
        # needs neither.
        return ComputeClient(scheduler)
    if identity is not None and token is not None:
        raise click.UsageError("give --identity or --token, not both")
    return ComputeClient(scheduler, _identity(identity, passphrase_file), token=token)


@main.command(cls=_Command)
@click.argument("job_file", type=click.Path(exists=True, dir_okay=False))
@_identity_opt
@_pass_opt
@click.pass_obj
def deploy(
    scheduler: str, job_file: str, identity: str | None, passphrase_file: str | None
) -> None:
    """Deploy JOB_FILE (TOML) and print the job id."""
    if identity is None:
        raise click.UsageError("deploys are signed: give --identity and --passphrase-file")
    with ComputeClient(scheduler, _identity(identity, passphrase_file)) as client:
        click.echo(client.deploy(job_file))


@main.command(cls=_Command)
@click.argument("address", required=False)
@click.option(
    "--identity",
    type=click.Path(exists=True, dir_okay=False),
    help="Show this keystore's account (its declared address; no passphrase needed).",
)
@click.pass_obj
def account(scheduler: str, address: str | None, identity: str | None) -> None:
    """Print an account's balance (ADDRESS, or --identity's) in credits."""
    if address is None:
        if identity is None:
            raise click.UsageError("give an ADDRESS or --identity")
        address = idmod.keystore_address(identity)
        if address is None:
            raise click.UsageError(f"{identity} declares no address")
    with ComputeClient(scheduler) as client:
        reply = client.account(address)
    click.echo(f"{reply['address']} {reply['balance']:.6f}")


@main.command(cls=_Command)
@click.argument("job")
@_identity_opt
@_pass_opt
@_token_opt
@click.pass_obj
def status(
    scheduler: str,
    job: str,
    identity: str | None,
    passphrase_file: str | None,
    token: str | None,
) -> None:
    """Print a job's state and slice counts as JSON (its owner's --identity, or --token)."""
    with _reader(scheduler, identity, passphrase_file, token) as client:
        click.echo(json.dumps(client.status(job), indent=2))


@main.command(cls=_Command)
@click.argument("job")
@click.option("--wait", is_flag=True, help="Wait until every slice is final.")
@click.option("--timeout", type=float, default=None, help="Give up waiting after this many s.")
@_identity_opt
@_pass_opt
@_token_opt
@click.pass_obj
def results(
    scheduler: str,
    job: str,
    wait: bool,
    timeout: float | None,
    identity: str | None,
    passphrase_file: str | None,
    token: str | None,
) -> None:
    """Print results in slice order, one JSON object per line (its owner's --identity, or
    --token)."""
    incomplete = False
    with _reader(scheduler, identity, passphrase_file, token) as client:
        for r in client.results(job, wait=wait, timeout=timeout):
            row: dict[str, object] = {"slice": r.slice, "state": r.state}
            if r.result is not None:
                try:
                    row["result"] = r.result.decode("utf-8")
                except UnicodeDecodeError:
                    row["result"] = None
                    row["result_base64"] = base64.b64encode(r.result).decode()
            else:
                row["result"] = None
                incomplete = True
            if r.error:
                row["error"] = r.error
            click.echo(json.dumps(row))
            sys.stdout.flush()
    if incomplete:
        sys.exit(EXIT_JOB_INCOMPLETE)


@main.command(cls=_Command)
@click.argument("job")
@_identity_opt
@_pass_opt
@click.pass_obj
def cancel(scheduler: str, job: str, identity: str | None, passphrase_file: str | None) -> None:
    """Cancel a job you own."""
    with ComputeClient(scheduler, _identity(identity, passphrase_file)) as client:
        click.echo(f"cancelled {client.cancel(job)} slice(s)")


@main.command(cls=_Command)
@click.argument("job")
@_identity_opt
@_pass_opt
@click.option("--ttl", type=float, default=None, help="Seconds the token lives (default 24 h).")
@click.pass_obj
def token(
    scheduler: str, job: str, identity: str | None, passphrase_file: str | None, ttl: float | None
) -> None:
    """Issue a read token for a job you own: prints the token (stdout), and its id and expiry
    (stderr). Whoever holds it reads the job's spec, status and results, until it expires or
    `dcp-compute revoke-token` revokes it."""
    if identity is None:
        raise click.UsageError("tokens are issued by the job's owner: give --identity")
    with ComputeClient(scheduler, _identity(identity, passphrase_file)) as client:
        issued = client.issue_token(job, ttl)
    click.echo(issued.token)
    click.echo(f"token id {issued.token_id} expires at {issued.expires:.0f}", err=True)


@main.command("revoke-token", cls=_Command)
@click.argument("job")
@click.argument("token_id")
@_identity_opt
@_pass_opt
@click.pass_obj
def revoke_token(
    scheduler: str, job: str, token_id: str, identity: str | None, passphrase_file: str | None
) -> None:
    """Revoke a read token (by the id `dcp-compute token` printed) of a job you own."""
    if identity is None:
        raise click.UsageError("tokens are revoked by the job's owner: give --identity")
    with ComputeClient(scheduler, _identity(identity, passphrase_file)) as client:
        client.revoke_token(job, token_id)
    click.echo(f"revoked {token_id}")
