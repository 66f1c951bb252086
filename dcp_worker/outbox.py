"""The durable outbox: a result is on disk before it is submitted, until it is acknowledged.

SQLite in WAL mode with ``synchronous=FULL``: when :meth:`Outbox.commit` returns, its new
results have been fsynced and survive a power cut. The worker commits in groups (every result
finished since the last commit, plus every acknowledgement received, in one transaction and one
fsync) and submits a result only after the commit that holds it. Rows leave only after the
scheduler's acknowledgement (accepted, duplicate, or a final refusal). A lock file keeps two
workers from sharing one outbox. An outbox that cannot be read at start (corrupt, truncated,
not a database) is moved aside as ``outbox.sqlite.corrupt-<time>`` with an error in the log, and
a new one is started: nothing is dropped silently and the worker does not fail on every start.
Methods may be called from one thread at a time or several
(a lock serialises them), so the worker can commit off its event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path

from dcp_protocol import DcpError, Metrics

from .result import LeaseKey, PendingResult

__all__ = ["GroupCommit", "Outbox", "OutboxError", "PendingResult"]

log = logging.getLogger("dcp.worker.outbox")


def private_file(path: Path) -> None:
    """Create ``path`` 0600 if it is missing; narrow it and its SQLite side files to 0600 if
    an older version (or an operator) left them readable by others."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(f"{path}{suffix}", 0o600)


class OutboxError(DcpError):
    """The outbox cannot be opened or written; the message says which file and why."""


class Outbox:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._mutex = threading.Lock()
        self._lock = -1
        #: Where an unreadable outbox was moved at open, if one was.
        self.moved_aside: Path | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._lock = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            os.fchmod(self._lock, 0o600)
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
            self._db = self._open()
        except OutboxError:
            self.close()
            raise
        except sqlite3.DatabaseError as exc:
            # Unreadable (corrupt, truncated, not a database): move it aside, never drop it
            # silently and never fail on every start; an operator may still recover rows.
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            for suffix in ("", "-wal", "-shm"):
                source = Path(f"{self.path}{suffix}")
                if source.exists():
                    os.replace(source, Path(f"{aside}{suffix}"))
            self.moved_aside = aside
            log.error(
                "the outbox %s is unreadable (%s); moved it to %s and started a new one",
                self.path,
                exc,
                aside,
            )
            try:
                self._db = self._open()
            except OutboxError:
                self.close()
                raise
            except sqlite3.Error as again:
                self.close()
                raise OutboxError(f"cannot open the outbox {self.path}: {again}") from again
        except sqlite3.Error as exc:
            self.close()
            raise OutboxError(f"cannot open the outbox {self.path}: {exc}") from exc

    def _open(self) -> sqlite3.Connection:
        # SQLite gives the -wal and -shm files (they hold signed results too) the mode of the
        # database file: create it 0600 before SQLite does, whatever the umask and directory.
        try:
            private_file(self.path)
        except OSError as exc:
            raise OutboxError(f"cannot create the outbox {self.path}: {exc.strerror}") from None
        db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS outbox (job TEXT NOT NULL, slice INTEGER NOT NULL,"
                " token TEXT NOT NULL, result BLOB NOT NULL, signature TEXT NOT NULL,"
                " payment_address TEXT NOT NULL, metrics TEXT NOT NULL,"
                " PRIMARY KEY (job, slice, token))"
            )
            (verdict,) = db.execute("PRAGMA quick_check").fetchone()
            if verdict != "ok":
                raise sqlite3.DatabaseError(f"integrity check: {verdict}")
            db.execute("SELECT count(*) FROM outbox").fetchone()
        except BaseException:
            db.close()
            raise
        return db

    def commit(self, puts: list[PendingResult], removes: list[LeaseKey]) -> int:
        """Store ``puts`` and delete ``removes`` in one transaction, fsynced before returning.

        Returns:
            How many of ``removes`` were present (and are now gone).

        Raises:
            OutboxError: the transaction failed (nothing of it was applied).
        """
        rows = [
            {
                "job": i.job,
                "slice": i.slice,
                "token": i.token,
                "result": i.result,
                "signature": i.signature,
                "payment_address": i.payment_address,
                "metrics": json.dumps(asdict(i.metrics)),
            }
            for i in puts
        ]
        with self._mutex:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany(
                    "INSERT OR REPLACE INTO outbox (job, slice, token, result, signature,"
                    " payment_address, metrics) VALUES (:job, :slice, :token, :result,"
                    " :signature, :payment_address, :metrics)",
                    rows,
                )
                removed = 0
                for key in removes:
                    removed += self._db.execute(
                        "DELETE FROM outbox WHERE job=? AND slice=? AND token=?", key
                    ).rowcount
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise OutboxError(f"cannot write to the outbox {self.path}: {exc}") from exc
        return removed

    def put(self, item: PendingResult) -> None:
        """Store one result durably."""
        self.commit([item], [])

    def remove(self, key: LeaseKey) -> None:
        self.commit([], [key])

    def pending(self) -> list[PendingResult]:
        """Every result not yet acknowledged, in slice order."""
        with self._mutex:
            cursor = self._db.execute(
                "SELECT job, slice, token, result, signature, payment_address, metrics FROM outbox"
                " ORDER BY job, slice"
            )
            cursor.row_factory = sqlite3.Row
            rows = cursor.fetchall()
        return [
            PendingResult(
                job=row["job"],
                slice=row["slice"],
                token=row["token"],
                result=bytes(row["result"]),
                signature=row["signature"],
                payment_address=row["payment_address"],
                metrics=Metrics(**json.loads(row["metrics"])),
            )
            for row in rows
        ]

    def __len__(self) -> int:
        with self._mutex:
            (n,) = self._db.execute("SELECT count(*) FROM outbox").fetchone()
        return int(n)

    def close(self) -> None:
        db = getattr(self, "_db", None)
        if db is not None:
            db.close()
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1


class GroupCommit:
    """The outbox written in groups: every result finished (:meth:`keep`) and every
    acknowledgement received (:meth:`acknowledge`) since the last commit go to disk in one
    transaction, one fsync, off the event loop (:meth:`run`); a result is handed on to be
    submitted (``committed``) only once the commit that holds it returned. A failing disk keeps
    everything in memory (``failed`` is told why, ``written`` once a commit succeeds again) and
    retries every ``retry`` seconds. :meth:`close` commits what is left, synchronously, and
    closes the outbox."""

    def __init__(
        self,
        outbox: Outbox,
        committed: Callable[[list[PendingResult]], None],
        failed: Callable[[str], object],
        written: Callable[[], object],
        retry: float = 2.0,
    ) -> None:
        self.outbox = outbox
        self._committed, self._failed, self._written = committed, failed, written
        self.retry = retry
        #: Results on disk, not yet acknowledged.
        self.unsent = len(outbox)
        #: Set after each commit (for a stop that waits until everything was delivered).
        self.changed = asyncio.Event()
        self._unsaved: list[PendingResult] = []
        self._acked: list[LeaseKey] = []
        self._saving = 0  # results in the commit under way
        self._wanted = asyncio.Event()

    @property
    def undelivered(self) -> int:
        """Results computed and not yet acknowledged, wherever they are."""
        return len(self._unsaved) + self._saving + self.unsent

    def keep(self, result: PendingResult) -> None:
        """Store ``result`` at the next commit."""
        self._unsaved.append(result)
        self._wanted.set()

    def acknowledge(self, keys: Iterable[LeaseKey]) -> None:
        """Drop the results of ``keys`` at the next commit: the scheduler has answered them."""
        self._acked.extend(keys)
        self._wanted.set()

    async def run(self) -> None:
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            puts, self._unsaved = self._unsaved, []
            removes, self._acked = self._acked, []
            self._saving = len(puts)
            try:
                removed = await asyncio.to_thread(self.outbox.commit, puts, removes)
            except OutboxError as exc:
                # A full (or failing) disk: keep what we have in memory and try again shortly;
                # nothing is submitted until it is on disk. (Counted once while it waits: the
                # results in a failed commit were counted twice until the retry.)
                self._saving = 0
                self._unsaved[:0], self._acked[:0] = puts, removes
                self._failed(str(exc))
                await asyncio.sleep(self.retry)
                self._wanted.set()
                continue
            except BaseException:
                self._saving = 0
                self._unsaved[:0], self._acked[:0] = puts, removes  # kept for close()
                raise
            self._saving = 0
            self._written()
            self.unsent += len(puts) - removed
            self._committed(puts)
            self.changed.set()

    def close(self) -> None:
        """Commit whatever finished but was not committed yet, then close the outbox."""
        try:
            self.outbox.commit(self._unsaved, self._acked)
            self._unsaved, self._acked = [], []
        except OutboxError as exc:
            log.error(
                "%s: %d finished result(s) could not be stored and will be computed again",
                exc,
                len(self._unsaved),
            )
        try:
            self.unsent = len(self.outbox)  # exact, whatever a cancelled commit managed
        finally:
            self.outbox.close()
