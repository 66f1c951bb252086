"""Which backend a ``--db`` value names, and opening it."""

from __future__ import annotations

from . import Store, StoreError

__all__ = ["is_postgres", "open_store"]


def is_postgres(db: str) -> bool:
    """Whether ``--db`` names a PostgreSQL database (a ``postgresql://`` URL)."""
    return db.startswith(("postgresql://", "postgres://"))


def open_store(db: str, upgrade: bool = False, busy_timeout: float = 10.0) -> Store:
    """The store ``db`` names: a ``postgresql://USER@HOST/DB`` URL (libpq's forms, e.g.
    ``?host=/run/postgresql`` for a socket), or the path of a SQLite file. ``upgrade``:
    apply the schema migrations an older database lacks (scheduler/store/migrations.py).
    ``busy_timeout``: how long a call waits for a lock another connection holds (SQLite's
    busy timeout, PostgreSQL's ``lock_timeout``) before it fails as a StoreError.

    Raises:
        StoreError: it cannot be opened or its schema is not this scheduler's (the message
            says which, and what to run).
    """
    if is_postgres(db):
        try:  # psycopg is loaded only for a PostgreSQL store
            from .postgres import PostgresStore
        except ImportError as exc:
            raise StoreError(
                f"a PostgreSQL database needs psycopg ({exc}): pip install 'dcp-worker[postgres]'"
            ) from None
        return PostgresStore(db, upgrade=upgrade, lock_timeout=busy_timeout)
    from .sqlite import SQLiteStore

    return SQLiteStore(db, busy_timeout=busy_timeout, upgrade=upgrade)
