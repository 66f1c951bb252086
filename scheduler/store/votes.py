"""The store's votes: replicas of a replicated job's slices, their decision, and reputations,
on one connection of either backend, inside the caller's transaction.

A replicated job (``quorum`` > 1) keeps each input as a slice row in state ``voting`` and
each replica as a slice row of its own (``replica_of`` names the input), leased, fenced,
heartbeated and expired as any slice. A replica's accepted result is a vote: stored, not paid.
:func:`decide` reads an input's votes, asks scheduler/quorum.py what follows, and carries it
out: pay the agreeing replicas from the job's escrow, reset the reputation of the outvoted and
forfeit their other pending votes on the job, cancel spare replicas, make more, or fail the
input. Callers lock the input's row before its replicas' (every transaction that touches both
takes them in that order), so two replicas' results of one input are decided one after the
other, never both on a stale view.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from dcp_protocol import SliceState

from ..quorum import Accept, Fail, Redundancy, Replicate, Vote, Wait, tally, trusted
from . import ledger as _ledger
from .dbapi import Connection

__all__ = ["decide", "make_replicas", "parse_redundancy", "vote_key"]

#: What a decision calls when its input reached a final state (the job's remaining count).
Final = Callable[[Connection, str, float], None]


def vote_key(result: bytes) -> str:
    """The key of a result compared byte for byte."""
    return hashlib.sha256(result).hexdigest()


def parse_redundancy(raw: str | None) -> Redundancy | None:
    """A job row's ``redundancy`` column (JSON), or None for a job without replication."""
    if not raw:
        return None
    return Redundancy(**json.loads(raw))


def make_replicas(db: Connection, job_id: str, input_: int, n: int) -> list[int]:
    """Insert ``n`` queued replicas of ``input_`` (the job's next slice indices, past its
    inputs), which read its datum; their indices."""
    (first,) = db.execute(
        "UPDATE jobs SET next_idx = next_idx + ? WHERE id=? RETURNING next_idx - ?",
        (n, job_id, n),
    ).fetchone()
    indices = list(range(int(first), int(first) + n))
    db.executemany(
        "INSERT INTO slices (job, idx, state, replica_of) VALUES (?, ?, 'queued', ?)",
        [(job_id, idx, input_) for idx in indices],
    )
    return indices


def _verdict(db: Connection, worker: str, payee: str, good: bool | None, earned: int) -> None:
    """A vote's outcome for its identity and its payment address: paid ``earned``; validated
    (``good``: their runs grow), outvoted or caught (``False``: their runs end), or neither
    (``None``: a result that stood alone on trust). The identity's row exists: it logged in."""
    change = {
        True: "valid = t.valid + 1, consecutive_valid = t.consecutive_valid + 1, ",
        False: "invalid = t.invalid + 1, consecutive_valid = 0, ",
        None: "",
    }[good]
    db.execute(
        f"UPDATE workers AS t SET {change}earned_micro = t.earned_micro + ? WHERE address=?",
        (earned, worker),
    )
    db.execute(
        "INSERT INTO payees AS t (address, valid, invalid, consecutive_valid, earned_micro)"
        f" VALUES (?, ?, ?, ?, ?) ON CONFLICT(address) DO UPDATE SET {change}"
        "earned_micro = t.earned_micro + excluded.earned_micro",
        (payee, int(good is True), int(good is False), int(good is True), earned),
    )


def _streak(db: Connection, worker: str, payee: str) -> int:
    """The shorter of the identity's and the payment address's runs of validated results."""
    rows = [
        db.execute(f"SELECT consecutive_valid FROM {table} WHERE address=?", (who,)).fetchone()
        for table, who in (("workers", worker), ("payees", payee))
    ]
    return min(int(r[0]) if r else 0 for r in rows)


def decide(
    db: Connection,
    job_id: str,
    input_: int,
    policy: Redundancy,
    offer: int,
    now: float,
    draw: Callable[[], float],
    lock: str,
    final: Final,
) -> set[int]:
    """Decide ``input_`` of ``job_id`` from its votes, as far as they allow (module doc).
    ``draw`` gives uniform numbers in [0, 1) for the adaptive trust. Returns the other inputs
    of the job whose votes were forfeited (their worker was caught here): decide them next."""
    row = db.execute(
        "SELECT state, needed, expected FROM slices WHERE job=? AND idx=?" + lock,
        (job_id, input_),
    ).fetchone()
    if row is None or row[0] != SliceState.VOTING.value:
        return set()  # decided already (a resubmission, or a second look after a forfeit)
    needed, expected = int(row[1]), row[2]
    rows = db.execute(
        "SELECT idx, state, worker, coalesce(payment_address, payee), vote_key, vote, result,"
        " signature, metrics FROM slices INDEXED BY slices_by_input"
        " WHERE job=? AND replica_of=? ORDER BY idx",
        (job_id, input_),
    ).fetchall()
    votes = [
        Vote(
            idx=r[0],
            state=r[1],
            worker=(r[2] or "").lower() or None,
            payee=(r[3] or "").lower() or None,
            key=r[4],
            # forfeited, or caught by a known answer before: counted no more, caught once
            forfeit=r[5] in ("forfeit", "disagreed"),
        )
        for r in rows
    ]
    known = None if expected is None else vote_key(bytes(expected))
    alone = False
    if policy.adaptive and needed == 1 and known is None:
        first = next((v for v in votes if v.state == "done" and not v.forfeit), None)
        if first is not None:
            streak = _streak(db, first.worker or "", first.payee or "")
            alone = trusted(streak, draw(), draw(), policy.spot_check_rate)
            if not alone:
                needed = policy.quorum
                db.execute(
                    "UPDATE slices SET needed=? WHERE job=? AND idx=?", (needed, job_id, input_)
                )
    decision = tally(votes, needed, policy.max_replicas, known)
    by_idx: dict[int, Any] = {r[0]: r for r in rows}
    caught: set[str] = set()
    if isinstance(decision, Replicate | Wait):
        if isinstance(decision, Replicate):
            make_replicas(db, job_id, input_, decision.n)
        db.executemany(
            "UPDATE slices SET vote='disagreed' WHERE job=? AND idx=?",
            [(job_id, i) for i in decision.losing],
        )
        caught = {by_idx[i][2] for i in decision.losing}
    elif isinstance(decision, Fail):
        db.execute(
            "UPDATE slices SET state=?, error_code=?, error=? WHERE job=? AND idx=?",
            (
                SliceState.FAILED.value,
                decision.reason,
                f"no {needed} of {len(votes)} results agreed (max_replicas {policy.max_replicas})",
                job_id,
                input_,
            ),
        )
        db.executemany(
            "UPDATE slices SET vote=? WHERE job=? AND idx=?",
            [
                ("disagreed" if v.idx in decision.losing else "inconclusive", job_id, v.idx)
                for v in votes
                if v.state == "done" and not v.forfeit
            ],
        )
        caught = {by_idx[i][2] for i in decision.losing}
        final(db, job_id, now)
    elif isinstance(decision, Accept):
        # Never more payments than the escrow was sized for (quorum per slice).
        paid = decision.agreeing[: policy.quorum]
        checked = len(decision.agreeing) > 1 or known is not None
        for idx in paid:
            r = by_idx[idx]
            worker, payee = r[2].lower(), r[3].lower()
            _ledger.move(db, "payment", f"escrow:{job_id}", payee, offer, now, job_id, idx)
            _verdict(db, worker, payee, True if checked else None, offer)
        first = by_idx[decision.agreeing[0]]
        db.execute(
            "UPDATE slices SET state=?, result=?, signature=?, payment_address=?, metrics=?,"
            " accepted_at=?, worker=?, error_code=NULL, error=NULL WHERE job=? AND idx=?",
            (SliceState.DONE.value, first[6], first[7], first[3], first[8], now, first[2])
            + (job_id, input_),
        )
        marks = [("agreed", i) for i in paid]
        marks += [("spare", i) for i in decision.agreeing[len(paid) :]]
        marks += [("disagreed", i) for i in decision.losing]
        db.executemany(
            "UPDATE slices SET vote=? WHERE job=? AND idx=?",
            [(mark, job_id, i) for mark, i in marks],
        )
        db.executemany(
            "UPDATE slices SET state=?, vote='spare', deadline=NULL WHERE job=? AND idx=?"
            " AND state IN ('queued', 'leased')",
            [(SliceState.CANCELLED.value, job_id, i) for i in decision.spare],
        )
        caught = {by_idx[i][2] for i in decision.losing}
        final(db, job_id, now)
    again: set[int] = set()
    for worker in caught:
        r = next(r for r in rows if r[2] == worker)
        _verdict(db, worker.lower(), (r[3] or worker).lower(), False, 0)
        # The liar's unsettled credit on this job: its votes still pending count no more.
        forfeited = db.execute(
            "UPDATE slices SET vote='forfeit' WHERE job=? AND worker=? AND replica_of IS NOT NULL"
            " AND state='done' AND vote IS NULL RETURNING replica_of",
            (job_id, worker),
        ).fetchall()
        again |= {int(f[0]) for f in forfeited}
    again.discard(input_)
    return again
