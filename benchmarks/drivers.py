"""The PostgreSQL driver: psycopg 3 (sync, sync in pipeline mode, async) and asyncpg on the
store's transaction shapes, in the same run.

The shapes are scheduler/store/sql.py's, on a table of its columns (not the store itself, so
each driver runs the same statements): a lease transaction, ``SELECT ... FOR UPDATE SKIP LOCKED
LIMIT 16`` of one job's queued slices then an ``executemany`` UPDATE of them; an acceptance
batch of those 16 results in one transaction, each item in a savepoint: the fenced read of the
slice ``FOR UPDATE``, its UPDATE, the job's counters (three UPDATEs), the job's cost sums (an
upsert) and the worker's counters (two statements), as ``accept_results`` runs them for a
slice offering no credits. psycopg runs them as the store does (autocommit, explicit BEGIN,
one statement at a time); "psycopg_pipeline" the same in pipeline mode (statements sent
without waiting for their replies, a round trip only where a reply is read); asyncpg as its
API has it (``transaction()``, nested for savepoints). The rounds are interleaved by driver;
medians of per-round means, ms per transaction, and the ratios to psycopg (sync).

    python benchmarks/drivers.py [--quick] [--rounds R] [--transactions T]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import re
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402
from common import BackendUnavailable, median, ms, postgres_server, report  # noqa: E402

BATCH = 16
JOB = "j" * 32
WORKER = "0x" + "ab" * 20

SCHEMA = [
    "CREATE TABLE jobs (id text PRIMARY KEY, state text NOT NULL, max_attempts int NOT NULL,"
    " offer_micro bigint NOT NULL, remaining int NOT NULL, cost_n int NOT NULL DEFAULT 0,"
    " finished double precision)",
    "CREATE TABLE slices (job text NOT NULL REFERENCES jobs(id), idx int NOT NULL,"
    " state text NOT NULL, token text, worker text, deadline double precision,"
    " leased_at double precision, attempts int NOT NULL DEFAULT 0, datum bytea NOT NULL,"
    " result bytea, signature text, payment_address text, metrics text,"
    " accepted_at double precision, progress double precision, rejected_by text,"
    " PRIMARY KEY (job, idx))",
    "CREATE INDEX slices_by_state ON slices (state, job, idx)",
    "CREATE TABLE job_costs (job text NOT NULL REFERENCES jobs(id), worker text NOT NULL,"
    " n int NOT NULL, cpu double precision NOT NULL, gpu double precision NOT NULL,"
    " bytes_in bigint NOT NULL, bytes_out bigint NOT NULL, PRIMARY KEY (job, worker))",
    "CREATE TABLE workers (address text PRIMARY KEY, first_seen double precision NOT NULL,"
    " last_seen double precision NOT NULL, accepted int NOT NULL DEFAULT 0,"
    " earned_micro bigint NOT NULL DEFAULT 0)",
]

LEASE_SELECT = (
    "SELECT idx, attempts, datum FROM slices WHERE state='queued' AND job=%s"
    " AND (rejected_by IS NULL OR rejected_by != %s) ORDER BY idx LIMIT %s"
    " FOR UPDATE SKIP LOCKED"
)
LEASE_UPDATE = (
    "UPDATE slices SET state='leased', token=%s, worker=%s, deadline=%s, leased_at=%s,"
    " attempts=attempts+1, progress=NULL WHERE job=%s AND idx=%s"
)
#: One accepted result, as SQLStore._accept and accept_results run it (no credits offered).
FENCE = (
    "SELECT s.state, s.token, s.worker, s.attempts, j.max_attempts, j.offer_micro"
    " FROM slices s JOIN jobs j ON j.id = s.job WHERE s.job=%s AND s.idx=%s FOR UPDATE OF s"
)
ACCEPT = [
    (
        "UPDATE slices SET state='done', result=%s, signature=%s, payment_address=%s,"
        " metrics=%s, accepted_at=%s, deadline=NULL WHERE job=%s AND idx=%s"
    ),
    "UPDATE jobs SET cost_n = cost_n + 1 WHERE id=%s",
    (
        "INSERT INTO job_costs AS c VALUES (%s, %s, 1, %s, %s, %s, %s) ON CONFLICT(job, worker)"
        " DO UPDATE SET n = c.n + 1, cpu = c.cpu + excluded.cpu, gpu = c.gpu + excluded.gpu,"
        " bytes_in = c.bytes_in + excluded.bytes_in, bytes_out = c.bytes_out + excluded.bytes_out"
    ),
    (
        "INSERT INTO workers (address, first_seen, last_seen) VALUES (%s, %s, %s)"
        " ON CONFLICT(address) DO NOTHING"
    ),
    (
        "UPDATE workers SET accepted = accepted + 1, earned_micro = earned_micro + %s,"
        " last_seen = greatest(last_seen, %s) WHERE address=%s"
    ),
    "UPDATE jobs SET remaining = remaining - 1 WHERE id=%s",
    (
        "UPDATE jobs SET state='finished', finished=%s WHERE id=%s AND remaining<=0"
        " AND state='active'"
    ),
]


def accept_params(idx: int, now: float) -> list[tuple[Any, ...]]:
    return [
        (b"r", "00" * 65, WORKER, '{"wall_seconds": 0.001}', now, JOB, idx),
        (JOB,),
        (JOB, WORKER, 0.001, 0.0, 1, 1),
        (WORKER, now, now),
        (0, now, WORKER),
        (JOB,),
        (now, JOB),
    ]


def dollar(sql: str) -> str:
    """``%s`` placeholders as asyncpg's ``$1, $2, ...``."""
    counter = itertools.count(1)
    return re.sub(r"%s", lambda _: f"${next(counter)}", sql)


def lease_rows(rows: list[Any], now: float) -> list[tuple[Any, ...]]:
    return [(secrets.token_hex(16), WORKER, now + 60, now, JOB, r[0]) for r in rows]


# ---------------------------------------------------------------------------- the drivers


def psycopg_sync(url: str, pipeline: bool) -> Callable[[int], tuple[float, float]]:
    conn = psycopg.connect(url, autocommit=True)

    def run(transactions: int) -> tuple[float, float]:
        taken: list[list[int]] = []
        started = time.perf_counter()
        for _ in range(transactions):
            with conn.pipeline() if pipeline else contextlib.nullcontext():
                taken.append(lease_sync(conn, time.time()))
        leased = time.perf_counter()
        for idxs in taken:
            with conn.pipeline() if pipeline else contextlib.nullcontext():
                accept_sync(conn, idxs, time.time())
        done = time.perf_counter()
        return (leased - started) / transactions, (done - leased) / transactions

    return run


def lease_sync(conn: psycopg.Connection[Any], now: float) -> list[int]:
    conn.execute("BEGIN")
    rows = conn.execute(LEASE_SELECT, (JOB, WORKER, BATCH)).fetchall()
    with conn.cursor() as cur:
        cur.executemany(LEASE_UPDATE, lease_rows(rows, now))
    conn.execute("COMMIT")
    return [r[0] for r in rows]


def accept_sync(conn: psycopg.Connection[Any], idxs: list[int], now: float) -> None:
    conn.execute("BEGIN")
    for idx in idxs:
        conn.execute("SAVEPOINT item")
        row = conn.execute(FENCE, (JOB, idx)).fetchone()
        assert row is not None and row[0] == "leased"
        for sql, params in zip(ACCEPT, accept_params(idx, now), strict=True):
            conn.execute(sql, params)
        conn.execute("RELEASE item")
    conn.execute("COMMIT")


def psycopg_async(url: str) -> Callable[[int], Awaitable[tuple[float, float]]]:
    box: list[psycopg.AsyncConnection[Any]] = []

    async def run(transactions: int) -> tuple[float, float]:
        if not box:
            box.append(await psycopg.AsyncConnection.connect(url, autocommit=True))
        conn = box[0]
        taken: list[list[int]] = []
        started = time.perf_counter()
        for _ in range(transactions):
            now = time.time()
            await conn.execute("BEGIN")
            rows = await (await conn.execute(LEASE_SELECT, (JOB, WORKER, BATCH))).fetchall()
            async with conn.cursor() as cur:
                await cur.executemany(LEASE_UPDATE, lease_rows(rows, now))
            await conn.execute("COMMIT")
            taken.append([r[0] for r in rows])
        leased = time.perf_counter()
        for idxs in taken:
            now = time.time()
            await conn.execute("BEGIN")
            for idx in idxs:
                await conn.execute("SAVEPOINT item")
                row = await (await conn.execute(FENCE, (JOB, idx))).fetchone()
                assert row is not None and row[0] == "leased"
                for sql, params in zip(ACCEPT, accept_params(idx, now), strict=True):
                    await conn.execute(sql, params)
                await conn.execute("RELEASE item")
            await conn.execute("COMMIT")
        done = time.perf_counter()
        return (leased - started) / transactions, (done - leased) / transactions

    return run


def asyncpg_driver(url: str) -> Callable[[int], Awaitable[tuple[float, float]]]:
    import asyncpg

    box: list[Any] = []
    lease_select, lease_update, fence = dollar(LEASE_SELECT), dollar(LEASE_UPDATE), dollar(FENCE)
    accept = [dollar(sql) for sql in ACCEPT]

    async def run(transactions: int) -> tuple[float, float]:
        if not box:
            box.append(await asyncpg.connect(url))  # libpq's URL, host=/socket/dir too
        conn = box[0]
        taken: list[list[int]] = []
        started = time.perf_counter()
        for _ in range(transactions):
            now = time.time()
            async with conn.transaction():
                rows = await conn.fetch(lease_select, JOB, WORKER, BATCH)
                await conn.executemany(lease_update, lease_rows(rows, now))
            taken.append([r[0] for r in rows])
        leased = time.perf_counter()
        for idxs in taken:
            now = time.time()
            async with conn.transaction():
                for idx in idxs:
                    async with conn.transaction():  # a savepoint
                        row = await conn.fetchrow(fence, JOB, idx)
                        assert row is not None and row[0] == "leased"
                        for sql, params in zip(accept, accept_params(idx, now), strict=True):
                            await conn.execute(sql, *params)
        done = time.perf_counter()
        return (leased - started) / transactions, (done - leased) / transactions

    return run


# ---------------------------------------------------------------------------- the run


def setup(url: str, slices: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for sql in SCHEMA:
            conn.execute(sql)
        conn.execute(
            "INSERT INTO jobs VALUES (%s, 'active', 3, 0, %s, 0, NULL)", (JOB, 10 * slices)
        )
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO slices (job, idx, state, datum) VALUES (%s, %s, 'queued', %s)",
                [(JOB, i, b"datum") for i in range(slices)],
            )


def requeue(url: str) -> None:
    """Every slice queued again, the dead row versions vacuumed (untimed, between runs)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE slices SET state='queued', token=NULL, worker=NULL, result=NULL")
        conn.execute("UPDATE jobs SET remaining = 1000000, state='active'")
        conn.execute("VACUUM slices, jobs, job_costs, workers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke mode: tiny, not saved")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--transactions", type=int, default=200, help="of each shape a round")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.transactions = 1, 10
    try:
        server = postgres_server()
    except BackendUnavailable as exc:
        print(f"skipped: {exc}", file=sys.stderr)
        report("drivers", {"skipped": str(exc)}, save=False)
        return
    url = server.create_database("drivers")
    setup(url, BATCH * args.transactions)
    drivers: dict[str, Callable[[int], Any]] = {
        "psycopg_sync": psycopg_sync(url, pipeline=False),
        "psycopg_pipeline": psycopg_sync(url, pipeline=True),
        "psycopg_async": psycopg_async(url),
    }
    skipped = {}
    try:
        drivers["asyncpg"] = asyncpg_driver(url)
    except ImportError as exc:
        skipped["asyncpg"] = f"not importable ({exc}): pip install asyncpg"
        print(f"asyncpg skipped: {skipped['asyncpg']}", file=sys.stderr)
    loop = asyncio.new_event_loop()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in drivers}
    for round_ in range(args.rounds + 1):  # round 0 warms up (prepares) and is not counted
        for name, run in drivers.items():
            requeue(url)
            result = run(args.transactions)
            if asyncio.iscoroutine(result):
                result = loop.run_until_complete(result)
            if round_:
                times[name].append(result)
    loop.close()
    figures: dict[str, Any] = {
        "rounds": args.rounds,
        "transactions": args.transactions,
        "batch": BATCH,
        "skipped": skipped,
    }
    base = times["psycopg_sync"]
    for name, pairs in times.items():
        lease, accept = median([p[0] for p in pairs]), median([p[1] for p in pairs])
        figures[name] = {
            "lease_tx_ms": ms(lease),
            "accept_batch_ms": ms(accept),
            "lease_over_psycopg_sync": round(lease / median([p[0] for p in base]), 3),
            "accept_over_psycopg_sync": round(accept / median([p[1] for p in base]), 3),
        }
        print(f"{name}: {figures[name]}", file=sys.stderr)
    report("drivers", figures, save=not args.quick)


if __name__ == "__main__":
    main()
