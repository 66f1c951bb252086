"""A live scheduler session driven with random, malformed, oversized and replayed frames, and
with signed frames whose fields are out of range: the scheduler stays up, answers every frame
(an error naming the fault, or the reply a valid frame gets), a normal fetch still works after
each example, and the bank's ledger balances at the end."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dcp_protocol as p
from dcp_protocol import signing
from scheduler.client import ComputeClient

from ..conftest import Keystore, SchedulerProcess, command
from ..test_pipeline import ECHO, job_file
from ..test_scheduler_session import _open, _recv

MAX_RESULT = 8 * 1024
MAX_FRAME = p.limits.result_frame_bytes(MAX_RESULT) + 8192
#: Values that break ranges and types: at and past the ends of every documented range.
EDGES = [-1, 0, 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30, -(2**63), 1.5, -0.5,
         1e308, 10**400, None, True, "", "x", [], {}, "AAAA", "!!"]  # fmt: skip

json_values = st.recursive(
    st.none() | st.booleans() | st.sampled_from(EDGES) | st.integers() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=10,
)


@st.composite
def random_message(draw: st.DrawFn) -> str:
    """A frame of a known type with arbitrary values in its real fields."""
    type_ = draw(st.sampled_from(sorted(p.SCHEDULER_MESSAGES)))
    names = sorted(p.SCHEDULER_MESSAGES[type_].__dataclass_fields__)
    fields = draw(st.dictionaries(st.sampled_from(names), json_values, max_size=len(names)))
    if type_ == "fetch":  # a valid fetch would lease slices nobody returns, or long-poll
        fields.pop("max_slices", None)
    return json.dumps({"v": 1, "type": type_, **fields})


def _result_frame(lease: p.SliceLease, keystore: Keystore, rid: int, **raw: Any) -> str:
    """A correctly signed ``result`` for ``lease``, with fields then replaced by ``raw``."""
    identity = keystore.identity
    payload = signing.result_payload(lease.job, lease.slice, lease.token, b"ok", identity.address)
    message = p.Result(
        id=rid,
        job=lease.job,
        slice=lease.slice,
        token=lease.token,
        result=b"ok",
        payment_address=identity.address,
        signature=identity.sign(payload),
        # Honest metrics, so that a replaced field is the only thing wrong with it.
        metrics=p.Metrics(bytes_in=len(lease.datum), bytes_out=2),
    )
    data = json.loads(p.encode(message))
    for key, value in raw.items():
        if key.startswith("metrics."):
            data.setdefault("metrics", {})[key.split(".")[1]] = value
        else:
            data[key] = value
    return json.dumps(data)


FRAMES = st.one_of(
    st.binary(max_size=64).map(lambda b: b.decode("latin-1")),
    random_message(),
    st.integers(65, 10_000).map(lambda k: "[" * k + "]" * k),  # too deep, within the size
    st.integers(1, 2).map(lambda k: " " * (MAX_FRAME + k * 1000)),  # oversized
    st.just("replay"),  # a signed result, sent twice
    st.tuples(
        st.sampled_from(
            ["slice", "id", "metrics.bytes_in", "metrics.bytes_out", "metrics.cpu_seconds"]
        ),
        st.sampled_from([-1, 2**64, 2**63, 10**30, 10**400, -0.5]),
    ),  # a signed result with one field out of range
)


@pytest.mark.timeout(180)
def test_live_session_survives_hostile_frames(
    tmp_path: Path, make_keystore: Callable[[str], Keystore]
) -> None:
    db = tmp_path / "fuzz.db"
    owner = make_keystore("owner")
    keystore = make_keystore("worker")
    scheduler = SchedulerProcess(
        db,
        "--max-result-bytes",
        str(MAX_RESULT),
        "--max-frame-bytes",
        str(MAX_FRAME),
        "--lease-timeout",
        "60",
    )
    try:
        minted = subprocess.run(
            [
                command("dcp-scheduler"),
                "bank",
                "mint",
                "--db",
                str(db),
                owner.identity.address,
                "1000",
            ],
            capture_output=True,
            text=True,
        )
        assert minted.returncode == 0, minted.stderr
        with ComputeClient(scheduler.url, owner.identity) as client:
            client.deploy(job_file(tmp_path, "fuzz", ECHO, ["d"] * 400, offer=0.5))
        answered: list[str] = []

        @settings(
            max_examples=300,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        )
        @given(st.lists(FRAMES, min_size=1, max_size=4))
        def session(frames: list[Any]) -> None:
            asyncio.run(_drive(scheduler, keystore, frames, answered))

        session()
        assert scheduler.proc.poll() is None  # still up
        assert {"malformed_frame", "invalid_message", "frame_too_large"} <= set(answered)
        assert "duplicate" in answered  # replays happened, and were not paid twice
    finally:
        assert scheduler.stop() == 0
    ledger = subprocess.run(
        [command("dcp-scheduler"), "bank", "ledger", "--check", "--db", str(db)],
        capture_output=True,
        text=True,
    )
    assert ledger.returncode == 0, ledger.stdout[-2000:] + ledger.stderr


async def _drive(
    scheduler: SchedulerProcess, keystore: Keystore, frames: list[Any], answered: list[str]
) -> None:
    ws = await _open(scheduler.ws_url, keystore)
    try:
        rid = 100
        for spec in frames:
            rid += 1
            sends = [spec] if isinstance(spec, str) and spec != "replay" else []
            if spec == "replay" or isinstance(spec, tuple):
                await ws.send(p.encode(p.Fetch(id=rid, max_slices=1)).decode())
                work = await _recv(ws)
                assert isinstance(work, p.Work) and work.slices, work
                lease = work.slices[0]
                rid += 1
                if spec == "replay":
                    sends = [_result_frame(lease, keystore, rid)] * 2
                else:
                    sends = [_result_frame(lease, keystore, rid, **{spec[0]: spec[1]})]
            for data in sends:
                await ws.send(data)
                reply = await _recv(ws)
                if isinstance(reply, p.Error):
                    # The fault is named; ``internal`` would be a fault of the scheduler's.
                    assert reply.code != "internal" and reply.message, (data[:200], reply)
                    if isinstance(spec, tuple):
                        # Out of its type's range at decode; or a number the type holds (a
                        # float of 2**64 CPU seconds) that no lease can have used.
                        assert reply.code in ("invalid_message", "metrics_implausible"), reply
                        assert spec[0].split(".")[-1] in reply.message, reply
                    answered.append(reply.code)
                elif isinstance(reply, p.Ack):
                    answered.append(reply.status)
                else:
                    answered.append(reply.type)
        # The session goes on: a normal fetch, and what it leased goes back.
        rid += 1
        await ws.send(p.encode(p.Fetch(id=rid, max_slices=1)).decode())
        work = await _recv(ws)
        assert isinstance(work, p.Work) and work.re == rid, work
        refs = tuple(p.LeaseRef(x.job, x.slice, x.token) for x in work.slices)
        await ws.send(p.encode(p.Return(id=rid + 1, leases=refs)).decode())
        ack = await _recv(ws)
        assert isinstance(ack, p.Ack) and ack.re == rid + 1, ack
    finally:
        await ws.close()
