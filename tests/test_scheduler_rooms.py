"""The scheduler's rooms without a socket: frames and decoded messages fed to the session
dispatcher and to result acceptance over a real SQLite store, their replies checked."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import dcp_protocol as p
from dcp_protocol import signing
from scheduler.acceptance import Acceptance
from scheduler.config import SchedulerConfig
from scheduler.session import Dispatcher, Park, WorkerSession
from scheduler.specs import JobSpecs
from scheduler.store import NewJob
from scheduler.store.pool import StorePool
from scheduler.store.sqlite import SQLiteStore
from scheduler.verifier import VerifierPool
from scheduler.wakeups import Wakeups

from .conftest import EXAMPLES, ROOT

ECHO = (EXAMPLES / "echo" / "echo.wasm").read_bytes()
KEY = bytes.fromhex("11" * 32)
WORKER = signing.address_of(KEY)


@dataclass
class Rooms:
    store: SQLiteStore
    dispatcher: Dispatcher
    acceptance: Acceptance
    job: str


def _deploy(store: SQLiteStore, data: tuple[bytes, ...], name: str = "more") -> str:
    """An echo job of ``data``, straight into the store (no API, so nothing is announced)."""
    return store.create_job(
        NewJob(
            owner="0x" + "22" * 20,
            name=name,
            runtime="wasm",
            module=ECHO,
            module_sha256=hashlib.sha256(ECHO).hexdigest(),
            argv=(),
            limits=p.Limits(),
            offer_micro=0,
            data=data,
            payload_sha256=secrets.token_hex(32),
        ),
        time.time(),
    )


@pytest.fixture
def rooms(tmp_path: Path) -> Iterator[Rooms]:
    store = SQLiteStore(tmp_path / "s.db")
    job = _deploy(store, (b"abc", b"def"), "echo")
    config = SchedulerConfig()
    db = StorePool(store)  # SQLite: every call inline
    specs, wakeups = JobSpecs(db), Wakeups()
    acceptance = Acceptance(db, config, specs, VerifierPool(size=1), wakeups)
    yield Rooms(store, Dispatcher(db, config, specs, acceptance, wakeups), acceptance, job)
    store.close()


def _welcomed(rooms: Rooms) -> WorkerSession:
    session = rooms.dispatcher.open()
    hello = rooms.dispatcher.hello(session)
    signature = signing.sign(KEY, signing.session_payload(hello.challenge, hello.server, WORKER))
    frame = p.encode(p.Auth(id=1, address=WORKER, signature=signature, payment_address=WORKER))
    reply, close = asyncio.run(rooms.dispatcher.receive(session, frame))
    assert isinstance(reply, p.Welcome) and not close
    assert (reply.re, reply.address, session.address) == (1, WORKER, WORKER)
    return session


def test_an_auth_the_database_cannot_record_is_answered_and_may_be_sent_again(
    tmp_path: Path,
) -> None:
    """A login's store call failing (the database locked past the busy timeout) raised out
    of the dispatcher, which ended the session with a traceback and no reply; now it is
    answered with its code, the session stays unauthenticated, and an auth sent again once
    the database is free is welcomed."""
    store = SQLiteStore(tmp_path / "s.db", busy_timeout=0.05)
    db, config = StorePool(store), SchedulerConfig()
    specs, wakeups = JobSpecs(db), Wakeups()
    acceptance = Acceptance(db, config, specs, VerifierPool(size=1), wakeups)
    dispatcher = Dispatcher(db, config, specs, acceptance, wakeups)
    session = dispatcher.open()
    hello = dispatcher.hello(session)
    signature = signing.sign(KEY, signing.session_payload(hello.challenge, hello.server, WORKER))
    frame = p.encode(p.Auth(id=1, address=WORKER, signature=signature, payment_address=WORKER))
    lock = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")
        reply, close = asyncio.run(dispatcher.receive(session, frame))
        assert isinstance(reply, p.Error) and not close
        assert (reply.re, reply.code) == (1, p.ErrorCode.INTERNAL.value)
        assert "locked" in reply.message and session.address == ""
        lock.execute("ROLLBACK")
        reply, close = asyncio.run(dispatcher.receive(session, frame))
        assert isinstance(reply, p.Welcome) and not close and session.address == WORKER
    finally:
        lock.close()
        store.close()


def test_a_frame_before_auth_is_refused_and_closes_the_session(rooms: Rooms) -> None:
    session = rooms.dispatcher.open()
    reply, close = asyncio.run(
        rooms.dispatcher.receive(session, p.encode(p.Fetch(id=3, max_slices=1)))
    )
    assert isinstance(reply, p.Error) and close
    assert (reply.re, reply.code) == (3, p.ErrorCode.AUTH_FAILED.value)
    assert session.address == ""


def test_a_fetch_leases_slices_with_their_jobs_spec_and_a_heartbeat_keeps_them(
    rooms: Rooms,
) -> None:
    session = _welcomed(rooms)
    work = asyncio.run(rooms.dispatcher.dispatch(session, p.Fetch(id=2, max_slices=5)))
    assert isinstance(work, p.Work) and work.re == 2
    assert [(x.job, x.slice, x.datum) for x in work.slices] == [
        (rooms.job, 0, b"abc"),
        (rooms.job, 1, b"def"),
    ]
    assert [(spec.job, spec.module) for spec in work.jobs] == [(rooms.job, ECHO)]
    held = p.LeaseRef(rooms.job, 0, work.slices[0].token)
    forged = p.LeaseRef(rooms.job, 1, "f" * 32)
    ack = asyncio.run(rooms.dispatcher.dispatch(session, p.Heartbeat(id=4, leases=(held, forged))))
    assert isinstance(ack, p.HeartbeatAck) and ack.re == 4
    assert ack.lost == (forged,)
    again = asyncio.run(
        rooms.dispatcher.dispatch(session, p.Fetch(id=5, max_slices=5, known_jobs=(rooms.job,)))
    )
    assert isinstance(again, p.Work) and again.slices == () and again.jobs == ()


def test_a_fetch_that_may_wait_is_parked_once(rooms: Rooms) -> None:
    session = _welcomed(rooms)
    fetch = p.Fetch(id=6, max_slices=1, wait_seconds=5.0)
    assert asyncio.run(rooms.dispatcher.dispatch(session, fetch)) == Park(fetch)
    assert session.parked
    second = asyncio.run(
        rooms.dispatcher.dispatch(session, p.Fetch(id=7, max_slices=1, wait_seconds=5.0))
    )
    assert isinstance(second, p.Work) and second.re == 7  # one parked fetch per session


def _signed(job: str, slice_: int, token: str, result: bytes) -> p.Result:
    payload = signing.result_payload(job, slice_, token, result, WORKER)
    return p.Result(
        id=8,
        job=job,
        slice=slice_,
        token=token,
        result=result,
        payment_address=WORKER,
        signature=signing.sign(KEY, payload),
        metrics=p.Metrics(bytes_in=3, bytes_out=len(result)),
    )


def test_acceptance_refuses_a_stale_token_and_accepts_the_current_one(rooms: Rooms) -> None:
    (lease,) = rooms.store.lease(WORKER, 1, time.time(), 15.0)
    stale = asyncio.run(
        rooms.acceptance.result(
            WORKER, "s1", _signed(rooms.job, lease.slice, "f" * 32, b"r"), time.time()
        )
    )
    assert isinstance(stale, p.Error)
    assert (stale.re, stale.code) == (8, p.ErrorCode.STALE_LEASE.value)
    assert rooms.store.job(rooms.job).counts == {"leased": 1, "queued": 1}
    current = _signed(rooms.job, lease.slice, lease.token, b"r")
    accepted = asyncio.run(rooms.acceptance.result(WORKER, "s1", current, time.time()))
    assert accepted == p.Ack(re=8, status="accepted", credited=0.0)
    duplicate = asyncio.run(rooms.acceptance.result(WORKER, "s1", current, time.time()))
    assert duplicate == p.Ack(re=8, status="duplicate", credited=0.0)


def test_the_session_and_acceptance_rooms_import_no_http() -> None:
    """Dispatch and acceptance are decisions over the store: aiohttp stays in server.py."""
    probe = (
        "import sys, scheduler.session, scheduler.acceptance;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('aiohttp', 'websockets')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_the_active_jobs_serve_the_next_fetches_until_slices_become_available(
    rooms: Rooms,
) -> None:
    """One read of the active jobs serves the fetches after it (every fetch asked it anew,
    one round trip of 7 on PostgreSQL) until the work event fires, or half a second passed:
    a job deployed unannounced (by another process, with no NOTIFY) shows within that."""
    now = [100.0]
    rooms.dispatcher.clock = lambda: now[0]
    session = _welcomed(rooms)

    def fetch() -> list[str]:
        work = asyncio.run(rooms.dispatcher.dispatch(session, p.Fetch(id=2, max_slices=10)))
        assert isinstance(work, p.Work)
        return [x.job for x in work.slices]

    assert fetch() == [rooms.job] * 2
    unannounced = _deploy(rooms.store, (b"x",))
    assert fetch() == []  # the jobs read for the fetch before: nothing was announced
    now[0] += 0.6
    assert fetch() == [unannounced]
    announced = _deploy(rooms.store, (b"y", b"z"))
    rooms.dispatcher.wakeups.wake_work()  # as a deploy through the API, or a peer's NOTIFY
    assert fetch() == [announced] * 2
