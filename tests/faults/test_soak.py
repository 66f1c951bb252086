"""The soak in a few faults: nothing lost, nothing paid twice (`make soak` runs hundreds)."""

from __future__ import annotations

from . import soak


def test_soak_quick() -> None:
    summary = soak.main(
        ["--minutes", "3", "--faults", "10", "--per-round", "10", "--slices", "100", "--seed", "11"]
    )
    assert summary["faults"] == 10 and summary["deployed"] == 100
    assert (summary["lost"], summary["paid_twice"], summary["unpaid_done"], summary["wrong"]) == (
        0,
        0,
        0,
        0,
    )
    assert summary["books_balance"]
