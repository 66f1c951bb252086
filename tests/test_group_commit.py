"""The outbox written in groups (dcp_worker/outbox.py, GroupCommit), driven without a worker:
a real outbox on disk, the commit loop on an event loop, and what it hands on."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from dcp_protocol import Metrics
from dcp_worker.outbox import GroupCommit, Outbox, PendingResult


def _result(i: int) -> PendingResult:
    return PendingResult("j", i, f"t{i}", b"r%d" % i, "ab" * 65, "0x" + "11" * 20, Metrics())


class _Seen(list[object]):
    """A callback that keeps what it is given and wakes whoever waits for the next."""

    def __init__(self) -> None:
        super().__init__()
        self.event = asyncio.Event()

    def __call__(self, *given: object) -> None:
        self.append(given[0] if given else True)
        self.event.set()

    async def wait(self) -> None:
        async with asyncio.timeout(30):
            await self.event.wait()


def test_results_are_handed_on_only_once_committed_and_leave_when_acknowledged(
    tmp_path: Path,
) -> None:
    path = tmp_path / "outbox.sqlite"

    async def go() -> None:
        committed = _Seen()
        commit = GroupCommit(Outbox(path), committed, lambda _why: None, lambda: None)
        runner = asyncio.create_task(commit.run())
        for i in range(3):
            commit.keep(_result(i))  # no await between them: one group
        assert commit.undelivered == 3 and commit.unsent == 0
        await committed.wait()
        assert committed == [[_result(0), _result(1), _result(2)]]
        assert commit.unsent == 3 and commit.undelivered == 3
        assert [r.key for r in commit.outbox.pending()] == [r.key for r in committed[0]]  # type: ignore[attr-defined]
        commit.changed.clear()
        commit.acknowledge([_result(0).key, _result(2).key])
        await commit.changed.wait()
        assert commit.unsent == 1 and commit.undelivered == 1
        runner.cancel()
        commit.keep(_result(7))  # finished after the loop stopped: close() still stores it
        commit.close()
        assert commit.unsent == 2

    asyncio.run(go())
    reopened = Outbox(path)
    try:
        assert sorted(r.slice for r in reopened.pending()) == [1, 7]
    finally:
        reopened.close()


def test_a_failing_commit_keeps_everything_and_retries(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"

    async def go() -> None:
        committed, failures, written = _Seen(), _Seen(), _Seen()
        commit = GroupCommit(Outbox(path), committed, failures, written, 0.01)
        # Another process holds the database's write lock: the commit fails after SQLite's
        # busy timeout, as on a disk that refuses writes.
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        runner = asyncio.create_task(commit.run())
        commit.keep(_result(1))
        await failures.wait()
        assert "cannot write to the outbox" in str(failures[0])
        assert not committed and commit.undelivered == 1  # not lost, not handed on
        other.execute("ROLLBACK")
        other.close()
        await committed.wait()
        assert committed == [[_result(1)]] and written
        runner.cancel()
        commit.close()

    asyncio.run(go())
