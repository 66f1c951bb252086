"""The store's bank: accounts, job escrows and the ledger, on one connection of either backend.

Every movement of credits is :func:`move`, which writes its ledger row; the caller runs it in
the transaction of the change it pays for (a deploy's escrow, a slice's payment, a refund), so
no credit moves without its row and none is created or lost: minted = accounts + escrow.
Amounts are micro-credits; accounts are keyed by lowercase address.
"""

from __future__ import annotations

from . import LedgerEntry, StoreError
from .dbapi import Connection

__all__ = ["balance", "entries", "move", "pay", "totals"]


def move(
    db: Connection,
    kind: str,
    debit: str,
    credit: str,
    amount: int,
    now: float,
    job: str | None = None,
    slice_: int | None = None,
    escrow_debited: bool = False,
) -> None:
    """Move ``amount`` between accounts (or escrow) with its ledger row. Escrow balances
    live on the job row; ``mint`` is the source of new credits. ``escrow_debited``: the
    caller debits the escrow itself (acceptance, once per job and batch)."""
    if amount <= 0:
        return
    for account, sign in ((debit, -1), (credit, 1)):
        if account == "mint":
            continue
        if account.startswith("escrow:"):
            if escrow_debited and sign < 0:
                continue
            db.execute(
                "UPDATE jobs SET escrow_micro = escrow_micro + ? WHERE id=?",
                (sign * amount, account.removeprefix("escrow:")),
            )
        elif sign > 0:
            db.execute(
                "INSERT INTO accounts AS a VALUES (?, ?) ON CONFLICT(address) DO UPDATE"
                " SET balance_micro = a.balance_micro + excluded.balance_micro",
                (account.lower(), amount),
            )
        else:  # the CHECK constraint refuses an overdraft, whatever the caller checked
            cur = db.execute(
                "UPDATE accounts SET balance_micro = balance_micro - ? WHERE address=?",
                (amount, account.lower()),
            )
            if cur.rowcount != 1:
                raise StoreError(f"account {account} has no balance to debit")
    db.execute(
        "INSERT INTO ledger (at, kind, debit, credit, amount_micro, job, slice)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (now, kind, debit.lower(), credit.lower(), amount, job, slice_),
    )


def pay(db: Connection, payments: list[tuple[str, str, int, str, int]], now: float) -> None:
    """Payments from escrows, each :func:`move` ``kind="payment"`` with ``escrow_debited``
    (its caller debits the escrows): ``payments`` holds (escrow account, payee, amount, job,
    slice). One credit per payee, of the sum, in the payees' order (every batch locks the
    accounts it credits in one order), and one ledger row per payment."""
    credits: dict[str, int] = {}
    for _escrow, payee, amount, _job, _slice in payments:
        if amount <= 0:
            raise StoreError(f"a payment of {amount} micro-credits")
        credits[payee.lower()] = credits.get(payee.lower(), 0) + amount
    db.executemany(
        "INSERT INTO accounts AS a VALUES (?, ?) ON CONFLICT(address) DO UPDATE"
        " SET balance_micro = a.balance_micro + excluded.balance_micro",
        sorted(credits.items()),
    )
    db.executemany(
        "INSERT INTO ledger (at, kind, debit, credit, amount_micro, job, slice)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            (now, "payment", escrow.lower(), payee.lower(), amount, job, slice_)
            for escrow, payee, amount, job, slice_ in payments
        ],
    )


def balance(db: Connection, address: str, lock: str = "") -> int:
    """The balance of ``address`` (0 for an account never credited); ``lock``: the words that
    hold its row until the transaction ends (scheduler/store/sql.py, SQLStore._lock)."""
    row = db.execute(
        "SELECT balance_micro FROM accounts WHERE address=?" + lock, (address.lower(),)
    ).fetchone()
    return int(row[0]) if row else 0


def entries(db: Connection, account: str | None, limit: int) -> list[LedgerEntry]:
    """The ledger in order, or the rows that debit or credit ``account``; at most ``limit``."""
    if account is None:
        rows = db.execute(
            "SELECT seq, at, kind, debit, credit, amount_micro, job, slice FROM ledger"
            " ORDER BY seq LIMIT ?",
            (limit,),
        )
    else:
        rows = db.execute(
            "SELECT seq, at, kind, debit, credit, amount_micro, job, slice FROM ledger"
            " WHERE debit=? OR credit=? ORDER BY seq LIMIT ?",
            (account.lower(), account.lower(), limit),
        )
    return [LedgerEntry(*row) for row in rows]


def totals(db: Connection) -> dict[str, int]:
    """Minted, held in accounts, held in escrow, paid, refunded: minted = accounts + escrow."""
    q = db.execute
    by_kind = dict(q("SELECT kind, sum(amount_micro) FROM ledger GROUP BY kind").fetchall())
    return {
        "minted": int(by_kind.get("mint", 0)),
        "accounts": int(q("SELECT coalesce(sum(balance_micro), 0) FROM accounts").fetchone()[0]),
        "escrow": int(q("SELECT coalesce(sum(escrow_micro), 0) FROM jobs").fetchone()[0]),
        "escrowed": int(by_kind.get("escrow", 0)),
        "paid": int(by_kind.get("payment", 0)),
        "refunded": int(by_kind.get("refund", 0)),
    }
