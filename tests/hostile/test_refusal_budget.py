"""A session that keeps earning refusals is slowed, and only it (issue 14, "under attack"):
forged results from an authenticated session cost the scheduler about what honest ones do, so
a client that sends nothing else must not get more of it than its refusal budget allows.

The budget itself is pure state driven by an injected clock; the live test runs a real
scheduler with a budget of 2 refused frames and a rate so low that the third's wait outlasts
the test, and checks that the slowed session is counted, is not read meanwhile, and that an
honest session is answered all the while."""

from __future__ import annotations

import asyncio
import json
import os
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

import dcp_protocol as p
from dcp_protocol import signing
from scheduler.limits import RefusalBudget, RefusalLimits
from scheduler.server import _refuses

from ..conftest import Keystore, SchedulerProcess, wait_for
from ..test_scheduler_session import _open, _recv


def test_the_budget_allows_its_burst_then_one_frame_per_interval() -> None:
    budget = RefusalBudget(RefusalLimits(burst=3, rate=2.0), now=100.0)
    assert [budget.charge(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert budget.charge(100.0) == pytest.approx(0.5)  # one token short, at 2 a second
    # It waited the 0.5 s: the next refusal waits a whole interval again, never less.
    assert budget.charge(100.5) == pytest.approx(0.5)
    assert (budget.charged, budget.waited) == (5, 2)


def test_the_budget_refills_to_its_burst_and_no_further() -> None:
    budget = RefusalBudget(RefusalLimits(burst=2, rate=1.0), now=0.0)
    assert budget.charge(0.0) == budget.charge(0.0) == 0.0
    # An hour of good behaviour buys back the burst, not 3,600 refusals.
    assert [budget.charge(3600.0) for _ in range(2)] == [0.0, 0.0]
    assert budget.charge(3600.0) == pytest.approx(1.0)


def test_a_clock_that_steps_back_refills_nothing() -> None:
    budget = RefusalBudget(RefusalLimits(burst=1, rate=1.0), now=50.0)
    assert budget.charge(50.0) == 0.0
    assert budget.charge(10.0) == pytest.approx(1.0)


@pytest.mark.parametrize("kwargs", [{"burst": 0}, {"rate": 0.0}, {"rate": float("nan")}])
def test_refusal_limits_refuse_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RefusalLimits(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("reply", "refuses"),
    [
        (p.Error(re=1, code="stale_lease", message="x"), True),
        (p.Error(re=1, code="malformed_frame", message="x"), True),
        (p.Error(re=1, code="internal", message="ours, not the worker's"), False),
        (
            p.ResultsAck(
                re=1, acks=(p.ItemAck("accepted"), p.ItemAck("refused", code="bad_signature"))
            ),
            True,
        ),
        (
            p.ResultsAck(re=1, acks=(p.ItemAck("accepted"), p.ItemAck("retry", code="internal"))),
            False,
        ),
        (p.HeartbeatAck(re=1, deadline=1.0, lost=(p.LeaseRef("j", 0, "00" * 16),)), True),
        (p.HeartbeatAck(re=1, deadline=1.0), False),
        (p.Work(re=1, slices=()), False),
    ],
)
def test_which_replies_spend_the_budget(reply: p.Message, refuses: bool) -> None:
    assert _refuses(reply) is refuses


@pytest.fixture
def stingy(tmp_path: Path) -> Iterator[SchedulerProcess]:
    """Two refused frames at once, then one per 1,000 s: far beyond the test."""
    proc = SchedulerProcess(
        tmp_path / "scheduler.db", "--refusal-burst", "2", "--refusal-rate", "0.001"
    )
    yield proc
    # Shutting down wakes the slowed session: the scheduler exits at once, not in 1,000 s.
    assert proc.stop(timeout=15.0) == 0


def _status(url: str) -> dict[str, object]:
    with urllib.request.urlopen(f"{url}/api/v1/status", timeout=10) as reply:
        return json.loads(reply.read())  # type: ignore[no-any-return]


def test_a_session_sending_forged_results_is_slowed_and_an_honest_one_is_not(
    stingy: SchedulerProcess, make_keystore: Callable[[str], Keystore]
) -> None:
    async def run() -> None:
        forger = await _open(stingy.ws_url, make_keystore("forger"))
        honest = await _open(stingy.ws_url, make_keystore("honest"))
        identity = make_keystore("other").identity
        for i in range(3):
            token = os.urandom(16).hex()
            payload = signing.result_payload("nojob", i, token, b"x", identity.address)
            forged = p.Result(
                id=10 + i,
                job="nojob",
                slice=i,
                token=token,
                result=b"x",
                payment_address=identity.address,
                signature=identity.sign(payload),
            )
            await forger.send(p.encode(forged).decode())
            reply = await _recv(forger)  # each is answered, the third too
            assert isinstance(reply, p.Error) and reply.re == 10 + i
            assert reply.code in ("stale_lease", "unknown_slice")
        # The third spent more than the burst: the session waits before its next frame.
        await asyncio.to_thread(
            wait_for, lambda: _status(stingy.url)["throttled_sessions"] == 1, 20
        )
        await forger.send(p.encode(p.Heartbeat(id=20, leases=())).decode())
        for n in range(3):  # the honest session is served meanwhile, as often as it asks
            await honest.send(p.encode(p.Heartbeat(id=30 + n, leases=())).decode())
            ack = await _recv(honest)
            assert isinstance(ack, p.HeartbeatAck) and ack.re == 30 + n
        # ...and the slowed one's heartbeat was not read: nothing came back to it.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(forger.recv(), 0.05)
        await honest.close()
        await forger.close()

    asyncio.run(run())


def test_before_auth_one_refused_frame_is_the_whole_burst(stingy: SchedulerProcess) -> None:
    """An honest client sends one frame before welcome, its auth: a second malformed one
    already waits (the configured burst, 2 here, starts at welcome)."""

    async def run() -> None:
        ws = await connect(stingy.ws_url, compression=None, max_size=None)
        assert isinstance(await _recv(ws), p.Hello)
        for n in range(2):
            await ws.send("{nope")
            reply = await _recv(ws)
            assert isinstance(reply, p.Error) and reply.code == "malformed_frame", n
        await asyncio.to_thread(
            wait_for, lambda: _status(stingy.url)["throttled_sessions"] == 1, 20
        )
        await ws.close()

    asyncio.run(run())
