"""The SQLite store (WAL mode): the embedded default backend of the scheduler.

Every public method is one ``BEGIN IMMEDIATE`` transaction, so leasing is atomic even with an
admin command writing from another process; the statements are scheduler/store/sql.py's.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import DatabaseError, StoreError
from .migrations import META, SET_VERSION, Migration, SchemaError, pending, statements
from .sql import PRICE_EXACT_WORKERS, PRICE_INTERVAL, SQLStore

__all__ = ["PRICE_EXACT_WORKERS", "PRICE_INTERVAL", "SQLiteStore"]


class SQLiteStore(SQLStore):
    """:class:`scheduler.store.Store` on one SQLite database file."""

    UNIQUE_VIOLATION = (sqlite3.IntegrityError,)

    def __init__(self, path: str | Path, busy_timeout: float = 10.0, upgrade: bool = False) -> None:
        """``busy_timeout``: how long a call waits for a lock held by another connection (an
        admin command, a backup) before it fails with :class:`StoreError`; it blocks the
        caller meanwhile, so a server keeps it short. ``upgrade``: apply the migrations a
        database at an older schema lacks (scheduler/store/migrations.py); without it such a
        database is refused with the command that upgrades it."""
        super().__init__()
        self.where = str(path)
        try:
            # The -wal and -shm files get the database file's mode: create it 0600 first.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            self._conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute(f"PRAGMA busy_timeout={max(0, int(busy_timeout * 1000))}")
            self._conn.execute("PRAGMA foreign_keys=ON")
            #: The migrations this opening applied (scheduler/store/migrations.py).
            self.applied = self._migrate(upgrade)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the database {path}: {exc}") from exc
        except SchemaError as exc:
            self._conn.close()
            raise StoreError(str(exc)) from None

    def _migrate(self, upgrade: bool) -> tuple[Migration, ...]:
        with self._tx() as db:
            db.execute(META)
            row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            todo = pending(None if row is None else int(row[0]), self.where, upgrade)
            for migration in todo:
                for statement in statements(migration.sqlite):
                    db.execute(statement)
                db.execute(SET_VERSION, (str(migration.version),))
        return todo

    def schema_version(self) -> int:
        (version,) = self._conn.execute(
            "SELECT value FROM meta WHERE key='schema_version'"
        ).fetchone()
        return int(version)

    @property
    def _db(self) -> sqlite3.Connection:
        return self._conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise DatabaseError(f"database unavailable: {exc}") from exc
        try:
            yield self._conn
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            # Locked past busy_timeout, disk full, I/O error: nothing of it happened.
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
            raise DatabaseError(f"database unavailable: {exc}") from exc
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self._conn.close()
