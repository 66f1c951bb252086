"""The store's parties room: who takes part besides jobs and slices: owners' nonces and read
tokens, compute groups, workers and payees (their records, blocks, disagreements), refusals.
"""

from __future__ import annotations

import secrets

from . import (
    DuplicateGroup,
    GroupRecord,
    PayeeRecord,
    ReadTokenRecord,
    RefusalRecord,
    ReplicaRecord,
    UnknownJob,
    WorkerRecord,
)
from .sqlbase import (
    SQLBase,
)


class PartiesRoom(SQLBase):
    """Owners, groups, workers and payees."""

    def use_nonce(self, address: str, nonce: str, now: float, keep_until: float) -> bool:
        with self._tx() as db:
            db.execute("DELETE FROM request_nonces WHERE keep_until < ?", (now,))
            cur = db.execute(
                "INSERT INTO request_nonces VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                (address.lower(), nonce, keep_until),
            )
            return cur.rowcount == 1

    def create_read_token(
        self, job_id: str, token_sha256: str, now: float, expires: float
    ) -> ReadTokenRecord:
        token_id = secrets.token_hex(8)
        with self._tx() as db:
            if db.execute("SELECT 1 FROM jobs WHERE id=?", (job_id,)).fetchone() is None:
                raise UnknownJob(f"no job {job_id}")
            db.execute(
                "INSERT INTO read_tokens VALUES (?, ?, ?, ?, ?, NULL)",
                (token_id, job_id, token_sha256, now, expires),
            )
        return ReadTokenRecord(token_id, job_id, now, expires, None)

    def read_token(self, token_sha256: str) -> ReadTokenRecord | None:
        row = self._db.execute(
            f"SELECT {self._TOKEN_COLUMNS} FROM read_tokens WHERE token_sha256=?",
            (token_sha256,),
        ).fetchone()
        return None if row is None else ReadTokenRecord(*row)

    def revoke_read_token(self, job_id: str, token_id: str, now: float) -> bool:
        with self._tx() as db:
            cur = db.execute(
                "UPDATE read_tokens SET revoked = coalesce(revoked, ?) WHERE id=? AND job=?",
                (now, token_id, job_id),
            )
            return cur.rowcount == 1

    def create_group(self, name: str, join_key: str, join_hash: str, now: float) -> None:
        with self._tx() as db:
            try:
                db.execute(
                    "INSERT INTO groups VALUES (?, ?, ?, ?)", (join_key, name, join_hash, now)
                )
            except self.UNIQUE_VIOLATION:
                raise DuplicateGroup(f"a group with join key {join_key!r} exists") from None

    def groups(self) -> list[GroupRecord]:
        rows = self._db.execute(
            "SELECT join_key, name, join_hash, created FROM groups ORDER BY created"
        )
        return [GroupRecord(*row) for row in rows]

    def seen_worker(self, address: str, now: float) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO workers (address, first_seen, last_seen) VALUES (?, ?, ?)"
                " ON CONFLICT(address) DO UPDATE SET last_seen = excluded.last_seen",
                (address.lower(), now, now),
            )

    def workers(self) -> list[WorkerRecord]:
        rows = self._db.execute(f"SELECT {self._WORKER_COLUMNS} ORDER BY first_seen")
        return [WorkerRecord(*row) for row in rows]

    def worker(self, address: str) -> WorkerRecord | None:
        row = self._db.execute(
            f"SELECT {self._WORKER_COLUMNS} WHERE w.address=?", (address.lower(),)
        ).fetchone()
        return None if row is None else WorkerRecord(*row)

    def payee(self, address: str) -> PayeeRecord | None:
        row = self._db.execute(
            "SELECT p.address, valid, invalid, consecutive_valid, earned_micro, b.reason"
            " FROM payees p LEFT JOIN blocklist b ON b.address = p.address WHERE p.address=?",
            (address.lower(),),
        ).fetchone()
        return None if row is None else PayeeRecord(*row)

    def block(self, address: str, reason: str, now: float) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO blocklist VALUES (?, ?, ?) ON CONFLICT(address) DO UPDATE"
                " SET reason = excluded.reason, at = excluded.at",
                (address.lower(), reason[:500], now),
            )

    def unblock(self, address: str) -> bool:
        with self._tx() as db:
            cur = db.execute("DELETE FROM blocklist WHERE address=?", (address.lower(),))
            return cur.rowcount == 1

    def blocked(self) -> dict[str, str]:
        return {a: r for a, r in self._db.execute("SELECT address, reason FROM blocklist")}

    def disagreements(self, address: str, limit: int = 20) -> list[ReplicaRecord]:
        """The last replicas of ``address`` (an identity or a payment address) that were
        outvoted or caught, newest first."""
        rows = self._db.execute(
            "SELECT job, replica_of, idx, state, worker, payment_address, result, vote,"
            " accepted_at, error_code FROM slices WHERE vote='disagreed'"
            " AND (lower(worker)=? OR lower(payment_address)=?) ORDER BY accepted_at DESC LIMIT ?",
            (address.lower(), address.lower(), limit),
        )
        return [self._replica(r) for r in rows]

    def record_refusal(self, job_id: str, worker: str, code: str, message: str, now: float) -> None:
        with self._tx() as db:
            self._refusal(db, job_id, worker, code, message, now)

    def refusals(self, job_id: str | None = None) -> list[RefusalRecord]:
        query = "SELECT job, worker, code, count, message, last FROM refusals"
        rows = (
            self._db.execute(query + " WHERE job=? ORDER BY last", (job_id,))
            if job_id is not None
            else self._db.execute(query + " ORDER BY last")
        )
        return [RefusalRecord(*row) for row in rows]
