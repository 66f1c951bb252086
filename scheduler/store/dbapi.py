"""What the store's statements run on: the part of Python's DB-API that scheduler/store/sql.py
and scheduler/store/ledger.py use, which sqlite3's connection has and scheduler/store/
postgres.py's adapter gives psycopg's."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

__all__ = ["Connection", "Cursor"]


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...
    def close(self) -> None: ...


class Connection(Protocol):
    """What the statements run on: Connection, or the PostgreSQL adapter."""

    def execute(self, sql: str, params: Any = (), /) -> Cursor: ...
    def executemany(self, sql: str, params: Any, /) -> Any: ...
