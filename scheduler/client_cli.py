"""``dcp-compute``: deploy jobs to a scheduler and read their results."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import sys
from collections.abc import Iterator

import click

from dcp_keys import identity as idmod

from .client import ComputeClient, ComputeError, WaitTimeout
from .jobdoc import JobFileError

EXIT_ERROR = 1
EXIT_JOB_INCOMPLETE = 4
#: ``results --wait --timeout`` expired with the job still active.
EXIT_TIMEOUT = 5

#: What an owner without credits is told (a 402 on deploy).
_GET_CREDITS = (
    "credits come from the scheduler's operator (`dcp-scheduler bank mint ADDRESS AMOUNT "
    "--db PATH`) or from running a worker; see your balance with "
    "`dcp-compute account --identity KEYSTORE`"
)


class _Command(click.Command):
    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except WaitTimeout as exc:
            click.echo(f"dcp-compute: {exc}", err=True)
            ctx.exit(EXIT_TIMEOUT)
        except (ComputeError, JobFileError, idmod.WalletError) as exc:
            click.echo(f"dcp-compute: {exc}", err=True)
            ctx.exit(EXIT_ERROR)


@contextlib.contextmanager
def _doing(what: str) -> Iterator[None]:
    """Say which act on which job failed: ``deploying job.toml: <the scheduler's reason>
    (code)``, not the HTTP request and status behind it."""
    try:
        yield
    except WaitTimeout:
        raise
    except ComputeError as exc:
        message = f"{what}: {exc.reason}" + (f" ({exc.code})" if exc.code else "")
        if exc.code == "insufficient_funds":
            message += f"\n{_GET_CREDITS}"
        raise ComputeError(message, exc.status, exc.code, exc.reason, exc.details) from None


def _identity(path: str | None, passphrase_file: str | None) -> idmod.Identity | None:
    if path is None:
        return None
    if passphrase_file is None:
        raise click.UsageError("--identity needs --passphrase-file")
    return idmod.load_keystore(path, idmod.read_passphrase_file(passphrase_file))


def _tty() -> bool:
    """Whether progress goes to stderr: only a person at a terminal reads it."""
    return sys.stderr.isatty()


class _Progress:
    """``job J: N/T slices final`` on one stderr line, redrawn with each result. Result
    lines go above it: the line is cleared before each and drawn again after, so on a
    terminal that shows both no result is printed after the progress text."""

    _CLEAR = "\r\x1b[K"

    def __init__(self, job: str, total: int) -> None:
        self.job, self.total, self.seen = job, total, 0
        self._draw()

    def final(self, slice_: int, line: str) -> None:
        """Slice ``slice_`` is final: print its ``line`` on stdout, then the progress."""
        self.seen += 1
        click.echo(self._CLEAR, err=True, nl=False)
        click.echo(line)
        sys.stdout.flush()
        self._draw()

    def done(self) -> None:
        self._draw()
        click.echo("", err=True)

    def _draw(self) -> None:
        click.echo(
            f"{self._CLEAR}job {self.job}: {self.seen}/{self.total} slices final",
            err=True,
            nl=False,
        )


@click.group()
@click.option(
    "--scheduler",
    envvar="DCP_SCHEDULER",
    multiple=True,
    default=("http://127.0.0.1:8500",),
    show_default=True,
    metavar="URL",
    help="Scheduler URL (http(s):// or ws(s)://). Repeatable, or comma-separated: replicas "
    "sharing one database; a request that cannot connect to one goes to the next, an "
    "answered one is never resent. $DCP_SCHEDULER may list several (spaces or commas).",
)
@click.option(
    "--connect-wait",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    envvar="DCP_CONNECT_WAIT",
    metavar="SECONDS",
    help="How long a request that no scheduler accepted the connection for (one starting or "
    "restarting) goes on trying them before it fails; 0 fails at once. Nothing was sent, so "
    "trying again is safe.",
)
@click.pass_context
def main(ctx: click.Context, scheduler: tuple[str, ...], connect_wait: float) -> None:
    """Deploy jobs to a scheduler and collect their results.

    \b
    Exit status:
      0  done
      1  a refused request, an unreachable scheduler, or a bad job file (every fault shown)
      2  a usage error
      4  results printed a slice without a result
      5  results --wait --timeout expired with the job still running
    """
    os.umask(0o077)  # results and tokens written here are the owner's alone
    # As the worker's DCP_WORKER_SCHEDULER, a list may be written with commas.
    urls = tuple(url.strip() for value in scheduler for url in value.split(",") if url.strip())
    if not urls:
        raise click.BadParameter("no URL given", param_hint="--scheduler")
    ctx.obj = _Connect(urls, connect_wait)


class _Connect:
    """The commands' way to a client: the --scheduler URLs and --connect-wait, with the
    wait's notice on stderr."""

    def __init__(self, urls: tuple[str, ...], connect_wait: float) -> None:
        self.urls, self.connect_wait = urls, connect_wait

    def __call__(
        self, identity: idmod.Identity | None = None, token: str | None = None
    ) -> ComputeClient:
        return ComputeClient(
            self.urls,
            identity,
            token=token,
            connect_wait=self.connect_wait,
            notice=lambda text: click.echo(f"dcp-compute: {text}", err=True),
        )


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
    connect: _Connect, identity: str | None, passphrase_file: str | None, token: str | None
) -> ComputeClient:
    """A client that reads a job: signed with --identity, or with a read token."""
    if identity is None and token is None:
        # Sent anyway: the scheduler answers why (unauthenticated), and a public listing
        # needs neither.
        return connect()
    if identity is not None and token is not None:
        raise click.UsageError("give --identity or --token, not both")
    return connect(_identity(identity, passphrase_file), token=token)


@main.command(cls=_Command)
@click.argument("job_file", type=click.Path(exists=True, dir_okay=False))
@_identity_opt
@_pass_opt
@click.pass_obj
def deploy(
    connect: _Connect, job_file: str, identity: str | None, passphrase_file: str | None
) -> None:
    """Deploy JOB_FILE (TOML) and print the job id. A bad JOB_FILE is reported whole, every
    fault with its line, and nothing is sent (exit status 1)."""
    if identity is None:
        raise click.UsageError("deploys are signed: give --identity and --passphrase-file")
    with connect(_identity(identity, passphrase_file)) as client:
        with _doing(f"deploying {job_file}"):
            job = client.deploy(job_file)
    click.echo(job)


@main.command(cls=_Command)
@click.argument("address", required=False)
@click.option(
    "--identity",
    type=click.Path(exists=True, dir_okay=False),
    help="Show this keystore's account (its declared address; no passphrase needed).",
)
@click.pass_obj
def account(connect: _Connect, address: str | None, identity: str | None) -> None:
    """Print an account's balance (ADDRESS, or --identity's) in credits."""
    if address is None:
        if identity is None:
            raise click.UsageError("give an ADDRESS or --identity")
        address = idmod.keystore_address(identity)
        if address is None:
            raise click.UsageError(f"{identity} declares no address")
    with connect() as client, _doing(f"reading the account of {address}"):
        reply = client.account(address)
    click.echo(f"{reply['address']} {reply['balance']:.6f}")


@main.command(cls=_Command)
@click.argument("job")
@_identity_opt
@_pass_opt
@_token_opt
@click.pass_obj
def status(
    connect: _Connect,
    job: str,
    identity: str | None,
    passphrase_file: str | None,
    token: str | None,
) -> None:
    """Print a job's state and slice counts as JSON (its owner's --identity, or --token)."""
    with _reader(connect, identity, passphrase_file, token) as client:
        with _doing(f"reading the status of job {job}"):
            shown = client.status(job)
    click.echo(json.dumps(shown, indent=2))


@main.command(cls=_Command)
@click.argument("job")
@click.option(
    "--wait",
    is_flag=True,
    help="Wait until every slice is final (progress on stderr when it is a terminal).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=None,
    metavar="SECONDS",
    help=f"With --wait: give up after SECONDS, exit status {EXIT_TIMEOUT}.",
)
@_identity_opt
@_pass_opt
@_token_opt
@click.pass_obj
def results(
    connect: _Connect,
    job: str,
    wait: bool,
    timeout: float | None,
    identity: str | None,
    passphrase_file: str | None,
    token: str | None,
) -> None:
    """Print results in slice order, one JSON object per line (its owner's --identity, or
    --token).

    Exit status: 0; 1 a refused request; 4 a slice printed without a result; 5 --timeout
    expired while the job was still running."""
    incomplete = False
    with (
        _reader(connect, identity, passphrase_file, token) as client,
        _doing(f"reading the results of job {job}"),
    ):
        progress = _Progress(job, client.status(job)["slices"]) if wait and _tty() else None
        try:
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
                if progress is not None:
                    progress.final(r.slice, json.dumps(row))
                else:
                    click.echo(json.dumps(row))
                    sys.stdout.flush()
        finally:
            if progress is not None:
                progress.done()
    if incomplete:
        sys.exit(EXIT_JOB_INCOMPLETE)


@main.command(cls=_Command)
@click.argument("job")
@_identity_opt
@_pass_opt
@_token_opt
@click.pass_obj
def votes(
    connect: _Connect,
    job: str,
    identity: str | None,
    passphrase_file: str | None,
    token: str | None,
) -> None:
    """Print a replicated job's quorum states, one JSON object per slice: the agreeing
    results it needs, its votes by kind, and each replica with its worker, vote and result
    (its owner's --identity, or --token)."""
    with (
        _reader(connect, identity, passphrase_file, token) as client,
        _doing(f"reading the votes of job {job}"),
    ):
        for s in client.votes(job):
            click.echo(json.dumps(s))


@main.command(cls=_Command)
@click.argument("job")
@_identity_opt
@_pass_opt
@click.pass_obj
def cancel(connect: _Connect, job: str, identity: str | None, passphrase_file: str | None) -> None:
    """Cancel a job you own."""
    with connect(_identity(identity, passphrase_file)) as client:
        with _doing(f"cancelling job {job}"):
            n = client.cancel(job)
    click.echo(f"cancelled {n} slice(s)")


@main.command(cls=_Command)
@click.argument("job")
@_identity_opt
@_pass_opt
@click.option("--ttl", type=float, default=None, help="Seconds the token lives (default 24 h).")
@click.pass_obj
def token(
    connect: _Connect,
    job: str,
    identity: str | None,
    passphrase_file: str | None,
    ttl: float | None,
) -> None:
    """Issue a read token for a job you own: prints the token (stdout), and its id and expiry
    (stderr). Whoever holds it reads the job's spec, status and results, until it expires or
    `dcp-compute revoke-token` revokes it."""
    if identity is None:
        raise click.UsageError("tokens are issued by the job's owner: give --identity")
    with connect(_identity(identity, passphrase_file)) as client:
        with _doing(f"issuing a read token for job {job}"):
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
    connect: _Connect,
    job: str,
    token_id: str,
    identity: str | None,
    passphrase_file: str | None,
) -> None:
    """Revoke a read token (by the id `dcp-compute token` printed) of a job you own."""
    if identity is None:
        raise click.UsageError("tokens are revoked by the job's owner: give --identity")
    with connect(_identity(identity, passphrase_file)) as client:
        with _doing(f"revoking read token {token_id} of job {job}"):
            client.revoke_token(job, token_id)
    click.echo(f"revoked {token_id}")
