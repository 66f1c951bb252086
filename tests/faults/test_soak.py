"""The soak in a few faults: nothing lost, nothing paid twice (`make soak` runs hundreds), on
SQLite and on two PostgreSQL replicas."""

from __future__ import annotations

import pytest

from ..conftest import postgres_server
from . import soak


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_soak_quick(backend: str) -> None:
    if backend == "postgres":
        postgres_server()  # skips (or fails, in CI) with the reason where there is none
    summary = soak.main(
        [
            "--minutes",
            "3",
            "--faults",
            "10",
            "--per-round",
            "10",
            "--slices",
            "100",
            "--seed",
            "11",
            "--backend",
            backend,
        ]
    )
    assert summary["faults"] == 10 and summary["deployed"] == 100
    assert (summary["lost"], summary["paid_twice"], summary["unpaid_done"], summary["wrong"]) == (
        0,
        0,
        0,
        0,
    )
    assert summary["books_balance"]
