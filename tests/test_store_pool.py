"""Where a serving scheduler's store calls run (scheduler/store/pool.py): inline on SQLite; on
PostgreSQL on threads with connections of their own, so that a slow call holds up its own
request and not every session of the replica."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from websockets.asyncio.client import ClientConnection, connect

import dcp_protocol as p
from dcp_protocol import signing
from scheduler.client import ComputeClient
from scheduler.store import Store
from scheduler.store.pool import StorePool
from scheduler.store.postgres import PostgresStore
from scheduler.store.sqlite import SQLiteStore

from .conftest import EXAMPLES, QUICK, Keystore, SchedulerProcess, postgres_server, wait_until


def test_sqlite_calls_run_inline_on_the_callers_thread(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    pool = StorePool(store, connections=4)
    try:
        assert not pool.threaded
        ran_on = asyncio.run(pool.run(lambda s: (s is store, threading.get_ident())))
        assert ran_on == (True, threading.get_ident())
    finally:
        pool.close()
        store.close()


def _activity(url: str, where: str) -> int:
    """The scheduler's sessions on ``url``'s database that match ``where``."""
    dbname = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
    ((n,),) = postgres_server().admin(
        "SELECT count(*) FROM pg_stat_activity WHERE datname=%s"
        f" AND application_name='dcp-scheduler' AND {where}",
        (dbname,),
    )
    return int(str(n))


def _our_connections(url: str) -> int:
    return _activity(url, "true")


def _waiting_for_a_lock(url: str) -> bool:
    return _activity(url, "wait_event_type='Lock'") > 0


def test_postgres_calls_run_at_once_on_connections_of_their_own(pg_db: str) -> None:
    store = PostgresStore(pg_db, upgrade=True)
    pool = StorePool(store, connections=3)
    both = threading.Barrier(3, timeout=30)

    def together(s: Store) -> int:
        assert s is not store  # the caller's store is never used by a thread
        both.wait()  # all three calls under way at once, or this breaks (timeout)
        return s.schema_version()

    async def main() -> list[int]:
        return list(await asyncio.gather(*(pool.run(together) for _ in range(3))))

    try:
        assert pool.threaded
        assert asyncio.run(main()) == [store.schema_version()] * 3
        assert _our_connections(pg_db) == 1 + 3  # the caller's and the three threads'
        pool.close()
        assert _our_connections(pg_db) == 1
    finally:
        pool.close()
        store.close()


def _status(url: str) -> dict[str, int]:
    with urllib.request.urlopen(f"{url}/api/v1/status", timeout=10) as reply:
        return json.loads(reply.read())  # type: ignore[no-any-return]


async def _session(url: str, keystore: Keystore) -> ClientConnection:
    ws = await connect(url, compression=None, max_size=None)
    hello = p.decode(await ws.recv(), p.SCHEDULER_MESSAGES)
    assert isinstance(hello, p.Hello)
    identity = keystore.identity
    sig = identity.sign(signing.session_payload(hello.challenge, hello.server, identity.address))
    auth = p.Auth(id=1, address=identity.address, signature=sig, payment_address=identity.address)
    await ws.send(p.encode(auth).decode())
    assert isinstance(p.decode(await ws.recv(), p.SCHEDULER_MESSAGES), p.Welcome)
    return ws


def test_a_call_waiting_on_a_lock_holds_up_its_session_only(
    tmp_path: Path, pg_db: str, make_keystore: Callable[[str], Keystore]
) -> None:
    """A's heartbeat waits for a row another transaction holds (a vacuum, an admin, another
    replica); B's heartbeat, frames later, is answered meanwhile. With the calls on the event
    loop (``--db-connections 0``) B's answer came only after A's call ended. Two threads
    serve: one waits with A's call, the other answers B."""
    scheduler = SchedulerProcess(
        pg_db,
        *QUICK,
        "--db-busy-timeout",
        "60",
        "--db-connections",
        "2",
        log=tmp_path / "scheduler.log",
    )
    try:
        job_toml = tmp_path / "echo.toml"
        job_toml.write_text(
            f'module = "{EXAMPLES / "echo" / "echo.wasm"}"\n[inputs]\nvalues = ["a", "b"]\n'
        )
        with ComputeClient(scheduler.url, make_keystore("owner").identity) as client:
            job = client.deploy(job_toml)

        async def main() -> None:
            a = await _session(scheduler.ws_url, make_keystore("a"))
            b = await _session(scheduler.ws_url, make_keystore("b"))
            leases = {}
            for name, ws in (("a", a), ("b", b)):
                await ws.send(p.encode(p.Fetch(id=2, max_slices=1)).decode())
                work = p.decode(await ws.recv(), p.SCHEDULER_MESSAGES)
                assert isinstance(work, p.Work) and len(work.slices) == 1
                (x,) = work.slices
                leases[name] = p.LeaseRef(x.job, x.slice, x.token)
            with psycopg.connect(pg_db) as locker:  # a transaction, held open
                locker.execute(
                    "SELECT 1 FROM slices WHERE job=%s AND idx=%s FOR UPDATE",
                    (job, leases["a"].slice),
                )
                await a.send(p.encode(p.Heartbeat(id=3, leases=(leases["a"],))).decode())
                a_reply = asyncio.ensure_future(a.recv())
                # A's heartbeat is waiting for the row once the server shows it so.
                await wait_until(lambda: _waiting_for_a_lock(pg_db), timeout=50)
                await b.send(p.encode(p.Heartbeat(id=4, leases=(leases["b"],))).decode())
                b_ack = p.decode(await asyncio.wait_for(b.recv(), 50), p.SCHEDULER_MESSAGES)
                assert isinstance(b_ack, p.HeartbeatAck) and b_ack.lost == ()
                assert not a_reply.done(), "A's call ended before B was answered"
                status = await asyncio.to_thread(_status, scheduler.url)
                assert status["store_calls_in_flight"] >= 1  # A's, waiting
                # The two threads' connections, and not the one serve migrated on.
                assert _our_connections(pg_db) == 2
            a_ack = p.decode(await asyncio.wait_for(a_reply, 30), p.SCHEDULER_MESSAGES)
            assert isinstance(a_ack, p.HeartbeatAck) and a_ack.lost == ()
            await a.close()
            await b.close()

        asyncio.run(main())
    finally:
        scheduler.stop()


@pytest.mark.parametrize("connections", [-1, 65])
def test_db_connections_out_of_range_is_refused(connections: int) -> None:
    from scheduler.config import SchedulerConfig

    if connections < 0:
        with pytest.raises(ValueError, match="at least 0"):
            StorePool(None, connections)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="db_connections must be within 0..64"):
        SchedulerConfig(db_connections=connections)
