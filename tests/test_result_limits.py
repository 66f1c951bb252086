"""Results at the size limits, end to end: a real worker and scheduler, with small limits
announced in ``welcome`` (``--max-result-bytes``, ``--max-frame-bytes``) so the test stays light.

The worker once packed up to 256 results per frame whatever their size and never read the
announced limits: two results at the limit made a frame the scheduler refused whole, again
after every reconnect.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path

import pytest

import dcp_protocol as p
from dcp_protocol import signing
from dcp_worker.outbox import Outbox, PendingResult
from scheduler.client import ComputeClient

from .conftest import Keystore, SchedulerProcess, WorkerProcess, wait_for
from .test_pipeline import ECHO, counts, job_file
from .test_scheduler_session import _open, _recv

MAX_RESULT = 48 * 1024
#: Room for one result at the limit (base64 + p.RESULT_FIELDS_BYTES), not for two; the
#: scheduler's work frames need the echo module's base64 beside a datum as large.
MAX_FRAME = p.limits.result_frame_bytes(MAX_RESULT) + 4 * ECHO.stat().st_size // 3 + 1024


@pytest.fixture
def small_limits(tmp_path: Path) -> SchedulerProcess:
    proc = SchedulerProcess(
        tmp_path / "limits.db",
        "--max-result-bytes",
        str(MAX_RESULT),
        "--max-frame-bytes",
        str(MAX_FRAME),
        "--lease-timeout",
        "30",
    )
    yield proc  # type: ignore[misc]
    proc.stop()


@pytest.mark.timeout(120)
def test_results_at_the_limit_go_alone_and_one_above_fails_by_its_output_limit(
    tmp_path: Path,
    small_limits: SchedulerProcess,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    owner = make_keystore("owner")
    # Exactly at the limit, several near it, small ones between (they share frames), and
    # one byte above the limit last: the worker bounds each slice's output by the welcome's
    # limit, so that slice fails in the evaluator and is reported, its lease not left to expire.
    sizes = [MAX_RESULT, MAX_RESULT - 1, 10, MAX_RESULT - 100, 20, MAX_RESULT, 30, 40, 50]
    sizes += [MAX_RESULT - 3] * 6 + [MAX_RESULT]
    values = [chr(65 + i % 26) * n for i, n in enumerate(sizes)]
    values.append("z" * (MAX_RESULT + 1))
    state = tmp_path / "worker-state"
    with ComputeClient(small_limits.url, owner.identity) as client:
        job = client.deploy(job_file(tmp_path, "sizes", ECHO, values))
        worker = workers(small_limits.url, make_keystore("worker"), 2, state_dir=state)
        wait_for(lambda: counts(small_limits.db, job).get("done", 0) == len(sizes), 90)
        wait_for(lambda: "output_too_large" in worker.output(), 30)
        results = {r.slice: r.result for r in client.results(job) if r.state == "done"}
    assert results == {i: v.encode() for i, v in enumerate(values[:-1])}
    assert worker.stop() == 0
    log = worker.output()
    last = len(values) - 1
    assert re.search(rf"slice {last} of job .* failed: output_too_large", log), log[-3000:]
    assert "result_too_large" not in log  # nothing too large was made, so none was dropped
    # No frame went over the announced limit: the scheduler refused none.
    scheduler_log = small_limits.log.read_text() if small_limits.log else ""
    assert "exceeds the limit" not in scheduler_log
    assert "frame_too_large" not in log and "1009" not in log
    outbox = Outbox(state / "outbox.sqlite")
    try:
        assert len(outbox) == 0  # the one above the limit left the outbox too
    finally:
        outbox.close()


async def _lease_all(url: str, keystore: Keystore, n: int) -> list[p.SliceLease]:
    ws = await _open(url, keystore)
    try:
        leases: list[p.SliceLease] = []
        rid = 10
        while len(leases) < n:
            rid += 1
            await ws.send(p.encode(p.Fetch(id=rid, max_slices=n - len(leases))).decode())
            reply = await _recv(ws)
            assert isinstance(reply, p.Work), reply
            leases += reply.slices
        return leases
    finally:
        await ws.close()


@pytest.mark.timeout(120)
def test_an_outbox_of_results_near_the_limit_goes_in_frames_under_it(
    tmp_path: Path,
    small_limits: SchedulerProcess,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    """A worker that starts with results waiting in its outbox sends them all at once: the
    frames that carry them stay under the announced limit (once, two results at the limit
    made one frame, refused whole, and again after every reconnect)."""
    owner = make_keystore("owner")
    keystore = make_keystore("worker")
    sizes = [MAX_RESULT, MAX_RESULT - 1, 5, MAX_RESULT - 2, MAX_RESULT, 7, 9, MAX_RESULT - 64]
    sizes += [MAX_RESULT] * 4 + [MAX_RESULT + 1]
    with ComputeClient(small_limits.url, owner.identity) as client:
        job = client.deploy(job_file(tmp_path, "sizes", ECHO, ["x"] * len(sizes)))
        leases = asyncio.run(_lease_all(small_limits.ws_url, keystore, len(sizes)))
        identity = keystore.identity
        state = tmp_path / "worker-state"
        state.mkdir(mode=0o700)
        outbox = Outbox(state / "outbox.sqlite")
        try:
            puts = []
            for lease, size in zip(sorted(leases, key=lambda x: x.slice), sizes, strict=True):
                result = bytes([65 + lease.slice % 26]) * size
                payload = signing.result_payload(
                    lease.job, lease.slice, lease.token, result, identity.address
                )
                puts.append(
                    PendingResult(
                        lease.job,
                        lease.slice,
                        lease.token,
                        result,
                        identity.sign(payload),
                        identity.address,
                        p.Metrics(bytes_in=len(lease.datum), bytes_out=len(result)),
                    )
                )
            outbox.commit(puts, [])
        finally:
            outbox.close()
        worker = workers(small_limits.url, keystore, 1, state_dir=state)
        wait_for(lambda: counts(small_limits.db, job).get("done", 0) == len(sizes) - 1, 60)
        wait_for(lambda: "result_too_large" in worker.output(), 30)
        done = {r.slice: len(r.result) for r in client.results(job) if r.state == "done"}
    assert done == dict(enumerate(sizes[:-1]))
    assert worker.stop() == 0
    log = worker.output()
    last = len(sizes) - 1
    assert re.search(rf"result \S+/{last} refused: result_too_large .*not sent", log), log[-3000:]
    # The results frames as websockets logs them: MessagePack (version 2) in hex, "type"
    # first; or JSON text from a worker that speaks version 1.
    results = "8[0-9a-f] a4 74 79 70 65 a7 72 65 73 75 6c 74 73"  # {"type": "results"
    sent = [
        int(n)
        for n in re.findall(
            rf"> (?:BINARY {results}|TEXT '\{{\"type\":\"results\").*\[(\d+) bytes\]", log
        )
    ]
    assert sent and max(sent) <= MAX_FRAME, sent
    assert len(sent) < len(sizes) - 1  # the small ones shared frames
    scheduler_log = small_limits.log.read_text() if small_limits.log else ""
    assert "exceeds the limit" not in scheduler_log
    outbox = Outbox(state / "outbox.sqlite")
    try:
        assert len(outbox) == 0
    finally:
        outbox.close()
