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


def test_a_transaction_held_idle_while_jobs_run_loses_nothing_and_vacuum_cleans_after() -> None:
    """Issue 17's 'hold a transaction idle while work flows': vacuum can remove nothing
    meanwhile (every slice run leaves its dead versions), nothing is lost, and once the
    transaction ends a VACUUM removes them all. `make soak` holds it for minutes."""
    postgres_server()
    summary = soak.main(
        [
            "--faults",
            "0",
            "--per-round",
            "3",
            "--slices",
            "60",
            "--seed",
            "5",
            "--backend",
            "postgres",
            "--hold-minutes",
            "0.05",
        ]
    )
    hold = summary["hold"]
    assert isinstance(hold, dict) and hold["jobs"] >= 1 and hold["lost"] == 0
    assert (summary["paid_twice"], summary["unpaid_done"], summary["wrong"]) == (0, 0, 0)
    assert summary["books_balance"]
    assert hold["idle_transaction_held_s"] >= 3
    if hold["dead_slice_versions"] is not None:  # pgstattuple: exact counts
        assert hold["dead_slice_versions"] >= hold["deployed"]  # a lease and an acceptance
        assert hold["dead_slice_versions_after_vacuum"] == 0
