"""The store's schema as versioned migrations, for both backends.

A database records its version in ``meta.schema_version``. An empty database gets every
migration when a store opens it; one at an older version is upgraded only when asked
(``dcp-scheduler db upgrade``, or ``serve --upgrade``), so that an operator chooses when a
schema changes under running replicas; one at a newer version than this scheduler knows is
refused. A migration and the version it sets are one transaction, taken by one process at a
time (SQLite's write lock; on PostgreSQL an advisory lock, as replicas may start together).

Version 4 is the first versioned schema (the schema of releases before migrations); a database
older than that is refused with the reason. To change the schema, append a migration with its
statements for each backend; never edit one that has shipped.
"""

from __future__ import annotations

from dataclasses import dataclass

from dcp_protocol import DcpError

__all__ = ["LATEST", "MIGRATIONS", "Migration", "SchemaError", "pending", "statements"]

#: The table every backend creates first, before any migration.
META = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
#: The statement that records a version, the same on both backends.
SET_VERSION = (
    "INSERT INTO meta VALUES ('schema_version', ?)"
    " ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)


@dataclass(frozen=True)
class Migration:
    version: int
    what: str
    sqlite: str
    postgres: str


_V4_SQLITE = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    runtime TEXT NOT NULL,
    module BLOB NOT NULL,
    module_sha256 TEXT NOT NULL,
    argv TEXT NOT NULL,
    limits TEXT NOT NULL,
    offer_micro INTEGER NOT NULL,
    escrow_micro INTEGER NOT NULL DEFAULT 0,
    group_key TEXT NOT NULL DEFAULT '',
    requirements TEXT NOT NULL DEFAULT '{}',
    config TEXT NOT NULL DEFAULT '{}',
    verifier BLOB,
    payload_sha256 TEXT NOT NULL UNIQUE,
    total INTEGER NOT NULL,
    remaining INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL,
    created REAL NOT NULL,
    finished REAL,
    -- the measured cost per slice (minimum wage): accepted slices, and for each field the
    -- lower median over job_costs' workers of each worker's mean (set on each acceptance)
    cost_n INTEGER NOT NULL DEFAULT 0,
    cost_cpu REAL NOT NULL DEFAULT 0,
    cost_gpu REAL NOT NULL DEFAULT 0,
    cost_in INTEGER NOT NULL DEFAULT 0,
    cost_out INTEGER NOT NULL DEFAULT 0
);
-- sums of the metrics of each worker's accepted slices of a job
CREATE TABLE IF NOT EXISTS job_costs (
    job TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    worker TEXT NOT NULL,
    n INTEGER NOT NULL,
    cpu REAL NOT NULL,
    gpu REAL NOT NULL,
    bytes_in INTEGER NOT NULL,
    bytes_out INTEGER NOT NULL,
    PRIMARY KEY (job, worker)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS slices (
    job TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    state TEXT NOT NULL,
    datum BLOB NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    token TEXT,
    worker TEXT,
    deadline REAL,
    leased_at REAL,
    progress REAL,
    result BLOB,
    signature TEXT,
    payment_address TEXT,
    metrics TEXT,
    accepted_at REAL,
    error_code TEXT,
    error TEXT,
    rejected_by TEXT,
    PRIMARY KEY (job, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS slices_by_state ON slices (state, job, idx);
-- the slices one worker holds (lease's max_held)
CREATE INDEX IF NOT EXISTS slices_by_worker ON slices (worker, state);
CREATE TABLE IF NOT EXISTS accounts (
    address TEXT PRIMARY KEY,
    balance_micro INTEGER NOT NULL CHECK (balance_micro >= 0)
);
CREATE TABLE IF NOT EXISTS ledger (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    debit TEXT NOT NULL,
    credit TEXT NOT NULL,
    amount_micro INTEGER NOT NULL CHECK (amount_micro > 0),
    job TEXT,
    slice INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS one_payment_per_slice ON ledger (job, slice)
    WHERE kind = 'payment';
CREATE TABLE IF NOT EXISTS groups (
    join_key TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    join_hash TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS workers (
    address TEXT PRIMARY KEY,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    accepted INTEGER NOT NULL DEFAULT 0,
    rejected INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    refused INTEGER NOT NULL DEFAULT 0,
    earned_micro INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS refusals (
    job TEXT NOT NULL,
    worker TEXT NOT NULL,
    code TEXT NOT NULL,
    count INTEGER NOT NULL,
    message TEXT NOT NULL,
    last REAL NOT NULL,
    PRIMARY KEY (job, worker, code)
);
-- Nonces of signed owner requests, kept past the freshness window (then removed), so a
-- request is accepted once.
CREATE TABLE IF NOT EXISTS request_nonces (
    address TEXT NOT NULL,
    nonce TEXT NOT NULL,
    keep_until REAL NOT NULL,
    PRIMARY KEY (address, nonce)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS request_nonces_by_age ON request_nonces (keep_until);
CREATE TABLE IF NOT EXISTS read_tokens (
    id TEXT PRIMARY KEY,
    job TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    token_sha256 TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    expires REAL NOT NULL,
    revoked REAL
);
CREATE INDEX IF NOT EXISTS read_tokens_by_job ON read_tokens (job);
"""

# The same tables in PostgreSQL's types: REAL is 4 bytes there (times need DOUBLE PRECISION),
# INTEGER is 4 (micro-credits need BIGINT).
_V4_POSTGRES = """
CREATE TABLE IF NOT EXISTS jobs (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    runtime TEXT NOT NULL,
    module BYTEA NOT NULL,
    module_sha256 TEXT NOT NULL,
    argv TEXT NOT NULL,
    limits TEXT NOT NULL,
    offer_micro BIGINT NOT NULL,
    escrow_micro BIGINT NOT NULL DEFAULT 0,
    group_key TEXT NOT NULL DEFAULT '',
    requirements TEXT NOT NULL DEFAULT '{}',
    config TEXT NOT NULL DEFAULT '{}',
    verifier BYTEA,
    payload_sha256 TEXT NOT NULL UNIQUE,
    total BIGINT NOT NULL,
    remaining BIGINT NOT NULL,
    max_attempts BIGINT NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    finished DOUBLE PRECISION,
    -- the measured cost per slice (minimum wage): accepted slices, and for each field the
    -- lower median over job_costs' workers of each worker's mean (set on each acceptance)
    cost_n BIGINT NOT NULL DEFAULT 0,
    cost_cpu DOUBLE PRECISION NOT NULL DEFAULT 0,
    cost_gpu DOUBLE PRECISION NOT NULL DEFAULT 0,
    cost_in BIGINT NOT NULL DEFAULT 0,
    cost_out BIGINT NOT NULL DEFAULT 0
);
-- sums of the metrics of each worker's accepted slices of a job
CREATE TABLE IF NOT EXISTS job_costs (
    job TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    worker TEXT NOT NULL,
    n BIGINT NOT NULL,
    cpu DOUBLE PRECISION NOT NULL,
    gpu DOUBLE PRECISION NOT NULL,
    bytes_in BIGINT NOT NULL,
    bytes_out BIGINT NOT NULL,
    PRIMARY KEY (job, worker)
);
CREATE TABLE IF NOT EXISTS slices (
    job TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    idx BIGINT NOT NULL,
    state TEXT NOT NULL,
    datum BYTEA NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    token TEXT,
    worker TEXT,
    deadline DOUBLE PRECISION,
    leased_at DOUBLE PRECISION,
    progress DOUBLE PRECISION,
    result BYTEA,
    signature TEXT,
    payment_address TEXT,
    metrics TEXT,
    accepted_at DOUBLE PRECISION,
    error_code TEXT,
    error TEXT,
    rejected_by TEXT,
    PRIMARY KEY (job, idx)
);
CREATE INDEX IF NOT EXISTS slices_by_state ON slices (state, job, idx);
-- the slices one worker holds (lease's max_held)
CREATE INDEX IF NOT EXISTS slices_by_worker ON slices (worker, state);
CREATE TABLE IF NOT EXISTS accounts (
    address TEXT PRIMARY KEY,
    balance_micro BIGINT NOT NULL CHECK (balance_micro >= 0)
);
CREATE TABLE IF NOT EXISTS ledger (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at DOUBLE PRECISION NOT NULL,
    kind TEXT NOT NULL,
    debit TEXT NOT NULL,
    credit TEXT NOT NULL,
    amount_micro BIGINT NOT NULL CHECK (amount_micro > 0),
    job TEXT,
    slice BIGINT
);
CREATE UNIQUE INDEX IF NOT EXISTS one_payment_per_slice ON ledger (job, slice)
    WHERE kind = 'payment';
CREATE TABLE IF NOT EXISTS groups (
    join_key TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    join_hash TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS workers (
    address TEXT PRIMARY KEY,
    first_seen DOUBLE PRECISION NOT NULL,
    last_seen DOUBLE PRECISION NOT NULL,
    accepted BIGINT NOT NULL DEFAULT 0,
    rejected BIGINT NOT NULL DEFAULT 0,
    failed BIGINT NOT NULL DEFAULT 0,
    refused BIGINT NOT NULL DEFAULT 0,
    earned_micro BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS refusals (
    job TEXT NOT NULL,
    worker TEXT NOT NULL,
    code TEXT NOT NULL,
    count BIGINT NOT NULL,
    message TEXT NOT NULL,
    last DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (job, worker, code)
);
-- Nonces of signed owner requests, kept past the freshness window (then removed), so a
-- request is accepted once.
CREATE TABLE IF NOT EXISTS request_nonces (
    address TEXT NOT NULL,
    nonce TEXT NOT NULL,
    keep_until DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (address, nonce)
);
CREATE INDEX IF NOT EXISTS request_nonces_by_age ON request_nonces (keep_until);
CREATE TABLE IF NOT EXISTS read_tokens (
    id TEXT PRIMARY KEY,
    job TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    token_sha256 TEXT NOT NULL UNIQUE,
    created DOUBLE PRECISION NOT NULL,
    expires DOUBLE PRECISION NOT NULL,
    revoked DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS read_tokens_by_job ON read_tokens (job);
"""

# Lease expiry reads the leased slices past their deadline once a second: with this index it
# reads those, not every leased slice.
_V5 = (
    "CREATE INDEX IF NOT EXISTS slices_leased_by_deadline ON slices (deadline)"
    " WHERE state = 'leased'"
)

# The queue: the queued slices of a job in order. The lease and the active-jobs probe read it;
# on PostgreSQL, with statistics that say most slices are queued (as they were at the last
# ANALYZE), the planner otherwise walked the primary key through every finished slice of the
# job (31 ms a lease half way through 200,000 slices; 0.3 ms with this index).
_V6 = "CREATE INDEX IF NOT EXISTS slices_queue ON slices (job, idx) WHERE state = 'queued'"

# A verifier may be a wasm module or Python or JavaScript source (issue 18).
_V7 = "ALTER TABLE jobs ADD COLUMN verifier_runtime TEXT NOT NULL DEFAULT 'wasm'"

# Redundancy (issue 19): a replicated job's slices are its inputs (state 'voting' while their
# replicas are out), each replica a slice row of its own past the inputs (replica_of names its
# input), leased, fenced and expired as any slice is; votes, reputations and the blocklist.
_V8_COMMON = """
ALTER TABLE jobs ADD COLUMN redundancy TEXT;
ALTER TABLE jobs ADD COLUMN compare_runtime TEXT;
ALTER TABLE jobs ADD COLUMN next_idx INTEGER NOT NULL DEFAULT 0;
ALTER TABLE slices ADD COLUMN replica_of INTEGER;
ALTER TABLE slices ADD COLUMN needed INTEGER;
ALTER TABLE slices ADD COLUMN payee TEXT;
ALTER TABLE slices ADD COLUMN network TEXT;
ALTER TABLE slices ADD COLUMN vote_key TEXT;
ALTER TABLE slices ADD COLUMN vote TEXT;
CREATE INDEX IF NOT EXISTS slices_by_input ON slices (job, replica_of, idx)
    WHERE replica_of IS NOT NULL;
ALTER TABLE workers ADD COLUMN valid INTEGER NOT NULL DEFAULT 0;
ALTER TABLE workers ADD COLUMN invalid INTEGER NOT NULL DEFAULT 0;
ALTER TABLE workers ADD COLUMN consecutive_valid INTEGER NOT NULL DEFAULT 0;
CREATE TABLE IF NOT EXISTS payees (
    address TEXT PRIMARY KEY,
    valid INTEGER NOT NULL DEFAULT 0,
    invalid INTEGER NOT NULL DEFAULT 0,
    consecutive_valid INTEGER NOT NULL DEFAULT 0,
    earned_micro INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS blocklist (
    address TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    at REAL NOT NULL
);
"""
_V8_SQLITE = (
    _V8_COMMON
    + """
ALTER TABLE jobs ADD COLUMN compare BLOB;
ALTER TABLE slices ADD COLUMN expected BLOB;
"""
)
_V8_POSTGRES = (
    _V8_COMMON
    + """
ALTER TABLE jobs ADD COLUMN compare BYTEA;
ALTER TABLE slices ADD COLUMN expected BYTEA;
"""
)

# The slices' datums in a table of their own (issue 20). SQLite keeps a row's columns in one
# record and rewrites all of it on every UPDATE: with the datum inside, each lease, heartbeat
# and acceptance wrote the datum again (a 1 MiB slice: 1 MiB to the WAL per state change), and
# reading any column stored after it walked its overflow pages. A replica reads its input's
# datum (slice_data holds the inputs' only). PostgreSQL keeps large values out of line
# (TOAST) already; it gets the same table so that both run the same statements.
_V9 = """
CREATE TABLE IF NOT EXISTS slice_data (
    job TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    idx {integer} NOT NULL,
    datum {blob} NOT NULL,
    PRIMARY KEY (job, idx)
){without_rowid};
INSERT INTO slice_data (job, idx, datum) SELECT job, idx, datum FROM slices
    WHERE replica_of IS NULL;
ALTER TABLE slices DROP COLUMN datum;
"""
_V9_SQLITE = _V9.format(integer="INTEGER", blob="BLOB", without_rowid=" WITHOUT ROWID")
_V9_POSTGRES = _V9.format(integer="BIGINT", blob="BYTEA", without_rowid="")

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        4,
        "jobs, slices, the bank, groups, workers, refusals, request nonces, read tokens",
        _V4_SQLITE,
        _V4_POSTGRES,
    ),
    Migration(5, "an index of leased slices by deadline, for lease expiry", _V5, _V5),
    Migration(6, "an index of each job's queued slices, for leasing", _V6, _V6),
    Migration(7, "the runtime of a job's verifier (wasm, python or js)", _V7, _V7),
    Migration(
        8,
        "redundancy: replicas, votes, worker and payee reputations, the blocklist",
        _V8_SQLITE,
        _V8_POSTGRES,
    ),
    Migration(9, "slice datums in a table of their own (slice_data)", _V9_SQLITE, _V9_POSTGRES),
)
LATEST = MIGRATIONS[-1].version
FIRST = MIGRATIONS[0].version


class SchemaError(DcpError):
    """The database's schema cannot be used as it is; the message says what to do."""


def pending(current: int | None, where: str, upgrade: bool) -> tuple[Migration, ...]:
    """The migrations to apply to a database at version ``current`` (None: empty).

    Raises:
        SchemaError: it predates versioned migrations, is newer than this scheduler, or is
            older and ``upgrade`` was not asked.
    """
    if current is None:
        return MIGRATIONS
    if current < FIRST:
        raise SchemaError(
            f"{where}: database schema {current} predates versioned migrations (the first is"
            f" {FIRST}); use a new database"
        )
    if current > LATEST:
        raise SchemaError(
            f"{where}: database schema {current} is newer than this scheduler's ({LATEST});"
            " run a newer dcp-scheduler"
        )
    todo = tuple(m for m in MIGRATIONS if m.version > current)
    if todo and not upgrade:
        raise SchemaError(
            f"{where}: database schema {current}, this scheduler needs {LATEST}: run"
            f" `dcp-scheduler db upgrade --db {where}` (or serve --upgrade)"
        )
    return todo


def statements(script: str) -> list[str]:
    """A migration's statements one by one (SQLite runs one per call inside a transaction):
    split at each ``;`` that ends a line, outside comments."""
    out: list[str] = []
    current: list[str] = []
    for line in script.splitlines():
        if line.lstrip().startswith("--") and not current:
            continue
        current.append(line)
        if line.rstrip().endswith(";"):
            out.append("\n".join(current).strip().rstrip(";"))
            current = []
    tail = "\n".join(current).strip()
    if tail:
        out.append(tail)
    return out
