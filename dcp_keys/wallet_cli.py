"""``dcp-wallet``: create, import and show Ethereum V3 keystores."""

from __future__ import annotations

import getpass
import os
import sys

import click

from . import identity as idmod

EXIT_WALLET_ERROR = 2


def _passphrase(passphrase_file: str | None, confirm: bool) -> bytes:
    if passphrase_file is not None:
        return idmod.read_passphrase_file(passphrase_file)
    if not sys.stdin.isatty():
        raise click.UsageError("no terminal to ask for a passphrase: give --passphrase-file")
    first = getpass.getpass("Passphrase: ")
    if confirm and getpass.getpass("Again: ") != first:
        raise click.UsageError("the passphrases differ")
    return first.encode()


class _WalletCommand(click.Command):
    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except idmod.WalletError as exc:
            click.echo(f"dcp-wallet: {exc}", err=True)
            ctx.exit(EXIT_WALLET_ERROR)


@click.group()
def main() -> None:
    """Manage the keystores that identify workers and job owners and receive payment."""
    os.umask(0o077)


_kdf = click.option(
    "--kdf",
    type=click.Choice(["scrypt", "pbkdf2"]),
    default="scrypt",
    show_default=True,
    help="Key derivation function of the new keystore.",
)
_iterations = click.option(
    "--kdf-iterations",
    type=click.IntRange(min=2),
    default=None,
    help="scrypt n (a power of 2) / pbkdf2 c (default 262144). Lower only for tests.",
)


@main.command(cls=_WalletCommand)
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(dir_okay=False),
    help="Where to write the keystore (mode 0600; never overwritten).",
)
@click.option("--passphrase-file", type=click.Path(exists=True, dir_okay=False))
@_kdf
@_iterations
def create(out: str, passphrase_file: str | None, kdf: str, kdf_iterations: int | None) -> None:
    """Create a new random key and print its EIP-55 address."""
    ident = idmod.create_keystore(
        out, _passphrase(passphrase_file, True), kdf=kdf, iterations=kdf_iterations
    )
    click.echo(ident.address)


@main.command(name="import", cls=_WalletCommand)
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False))
@click.option(
    "--key-file",
    type=click.Path(exists=True, dir_okay=False),
    required=True,
    help="File holding the private key as 64 hex digits (0x optional).",
)
@click.option("--passphrase-file", type=click.Path(exists=True, dir_okay=False))
@_kdf
@_iterations
def import_(
    out: str, key_file: str, passphrase_file: str | None, kdf: str, kdf_iterations: int | None
) -> None:
    """Import a hex private key into a new keystore and print its address."""
    text = open(key_file, encoding="ascii", errors="replace").read().strip().removeprefix("0x")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise idmod.WalletError("the key file does not hold a hex private key") from None
    ident = idmod.create_keystore(
        out, _passphrase(passphrase_file, True), key, kdf=kdf, iterations=kdf_iterations
    )
    click.echo(ident.address)


@main.command(cls=_WalletCommand)
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--passphrase-file",
    type=click.Path(exists=True, dir_okay=False),
    help="Decrypt to prove the passphrase (otherwise the declared address is shown).",
)
def show(path: str, passphrase_file: str | None) -> None:
    """Print the keystore's EIP-55 address."""
    if passphrase_file is None:
        address = idmod.keystore_address(path)
        if address is None:
            raise idmod.KeystoreFormatError(
                f"{path} declares no address; give --passphrase-file to decrypt it"
            )
        click.echo(address)
    else:
        click.echo(idmod.load_keystore(path, idmod.read_passphrase_file(passphrase_file)).address)
