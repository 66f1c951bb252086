"""A damaged outbox is moved aside with a clear message; results on disk survive restarts."""

from __future__ import annotations

from pathlib import Path

import pytest

from dcp_protocol import Metrics
from dcp_worker.outbox import Outbox, PendingResult

ITEM = PendingResult("job", 3, "token", b"result", "ab" * 65, "0x" + "11" * 20, Metrics(1, 2, 3, 4))


def test_results_survive_reopening(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite")
    outbox.commit([ITEM], [])
    outbox.close()
    outbox = Outbox(tmp_path / "outbox.sqlite")
    assert outbox.pending() == [ITEM]
    assert outbox.commit([], [ITEM.key, ("job", 4, "x")]) == 1
    assert len(outbox) == 0
    outbox.close()


@pytest.mark.parametrize(
    "damage",
    [
        lambda path: path.write_bytes(b"this is not a database" * 100),
        lambda path: path.write_bytes(path.read_bytes()[:1000]),
    ],
)
def test_a_damaged_outbox_is_moved_aside(tmp_path: Path, damage, caplog) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "outbox.sqlite"
    outbox = Outbox(path)
    outbox.commit(
        [ITEM]
        + [
            PendingResult("job", i, "t", b"x" * 5000, "ab" * 65, "0x" + "11" * 20, Metrics())
            for i in range(20)
        ],
        [],
    )
    outbox.close()
    damage(path)
    original = path.read_bytes()
    outbox = Outbox(path)
    try:
        assert outbox.moved_aside is not None and outbox.moved_aside.read_bytes() == original
        assert len(outbox) == 0 and outbox.pending() == []
        outbox.commit([ITEM], [])  # and it works
    finally:
        outbox.close()
    assert "unreadable" in caplog.text and str(outbox.moved_aside) in caplog.text
    # The next start does not move anything again.
    again = Outbox(path)
    assert again.moved_aside is None and again.pending() == [ITEM]
    again.close()
