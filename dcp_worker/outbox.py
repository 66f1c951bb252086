"""The durable outbox: a result is on disk before it is submitted, until it is acknowledged.

SQLite in WAL mode with ``synchronous=FULL``: when :meth:`Outbox.put` returns, the result has
been fsynced and survives a power cut. Rows leave only through :meth:`Outbox.remove` after the
scheduler's acknowledgement (accepted, duplicate, or a final refusal). A lock file keeps two
workers from sharing one outbox.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path

from .protocol import Metrics

__all__ = ["Outbox", "OutboxError", "PendingResult"]


class OutboxError(Exception):
    """The outbox cannot be opened or written; the message says which file and why."""


@dataclass(frozen=True)
class PendingResult:
    job: str
    slice: int
    token: str
    result: bytes
    signature: str
    payment_address: str
    metrics: Metrics

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.job, self.slice, self.token)


class Outbox:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._lock = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise OutboxError(
                f"cannot create the outbox in {self.path.parent}: {exc.strerror}"
            ) from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            raise OutboxError(f"{self.path} is in use by another worker") from None
        try:
            self._db = sqlite3.connect(
                str(self.path), isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS outbox (job TEXT NOT NULL, slice INTEGER NOT NULL,"
                " token TEXT NOT NULL, result BLOB NOT NULL, signature TEXT NOT NULL,"
                " payment_address TEXT NOT NULL, metrics TEXT NOT NULL,"
                " PRIMARY KEY (job, slice, token))"
            )
        except sqlite3.Error as exc:
            self.close()
            raise OutboxError(f"cannot open the outbox {self.path}: {exc}") from exc
        os.chmod(self.path, 0o600)

    def put(self, item: PendingResult) -> None:
        """Store ``item`` durably (fsynced before this returns)."""
        try:
            self._db.execute(
                "INSERT OR REPLACE INTO outbox VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    item.job,
                    item.slice,
                    item.token,
                    item.result,
                    item.signature,
                    item.payment_address,
                    json.dumps(asdict(item.metrics)),
                ),
            )
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot write to the outbox {self.path}: {exc}") from exc

    def remove(self, key: tuple[str, int, str]) -> None:
        try:
            self._db.execute("DELETE FROM outbox WHERE job=? AND slice=? AND token=?", key)
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot write to the outbox {self.path}: {exc}") from exc

    def pending(self) -> list[PendingResult]:
        rows = self._db.execute(
            "SELECT job, slice, token, result, signature, payment_address, metrics FROM outbox"
            " ORDER BY job, slice"
        ).fetchall()
        return [
            PendingResult(r[0], r[1], r[2], bytes(r[3]), r[4], r[5], Metrics(**json.loads(r[6])))
            for r in rows
        ]

    def __len__(self) -> int:
        (n,) = self._db.execute("SELECT count(*) FROM outbox").fetchone()
        return int(n)

    def close(self) -> None:
        db = getattr(self, "_db", None)
        if db is not None:
            db.close()
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1
