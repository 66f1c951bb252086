"""The compute API (``/api/v1/...``, HTTP + JSON; docs/protocol.md): deploy, list, read and
cancel jobs, read their results, issue and revoke read tokens, read an account's balance.

Acting on a job needs its owner's signature over the request (``X-DCP-Owner``,
``X-DCP-Timestamp``, ``X-DCP-Nonce``, ``X-DCP-Signature``): fresh within REQUEST_WINDOW of the
scheduler's clock, its nonce spent once. Reading a job needs that signature or a read token the
owner issued for that job (``Authorization: Bearer``). Anonymous listing shows only what a
worker weighs of the active public jobs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import json
import logging
import math
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import asdict
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from dcp_protocol import DcpError, ErrorCode, Metrics, nesting, signing
from evaluator.interpreters import problem

from .config import MAX_FETCH_WAIT
from .jobdoc import MSGPACK, JobFileError, parse_document
from .store import (
    InsufficientFunds,
    JobRecord,
    ReplicaRecord,
    SliceRecord,
    Store,
    StoreError,
    UnknownJob,
    credits,
)
from .store.pool import StorePool
from .wakeups import Wakeups

__all__ = [
    "MAX_READ_TOKEN_TTL",
    "NONCE_MARGIN",
    "READ_TOKEN_PREFIX",
    "READ_TOKEN_TTL",
    "REQUEST_WINDOW",
    "ComputeApi",
    "Refused",
    "check_read_token",
    "market",
    "read_token_job",
]

log = logging.getLogger("dcp.scheduler")

#: A signed owner request is accepted this many seconds either side of the scheduler's clock.
REQUEST_WINDOW = 300.0
#: A spent nonce is remembered this long after its request's window closed (clock slack).
NONCE_MARGIN = 60.0
#: Read tokens live this long unless the owner asks for less (or more, up to the maximum).
READ_TOKEN_TTL = 24 * 3600.0
MAX_READ_TOKEN_TTL = 30 * 24 * 3600.0
READ_TOKEN_PREFIX = "dcp-rt-"
_NONCE = re.compile(r"[0-9a-f]{32}")
_TIMESTAMP = re.compile(r"[0-9]{1,12}")


class Refused(DcpError):
    """A compute API request refused: ``status`` and ``code`` go into the error reply."""

    def __init__(self, status: int, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


_S = TypeVar("_S")
_ApiHandler = Callable[[_S, web.Request], Coroutine[Any, Any, web.Response]]


def _answers_refusals(handler: _ApiHandler[_S]) -> _ApiHandler[_S]:
    """Answer a :class:`Refused` raised by a compute API handler with its error reply."""

    @functools.wraps(handler)
    async def answer(self: _S, request: web.Request) -> web.Response:
        try:
            return await handler(self, request)
        except Refused as exc:
            return _error(exc.status, exc.code, exc.message)

    return answer


class ComputeApi:
    """The compute API's handlers over one store, whose calls ``db`` runs (off the event loop
    where the backend allows: a deploy's inserts hold up no session).

    ``clock``: Unix seconds for request freshness and read token expiry (tests inject one).
    ``wakeups``: a deploy wakes parked fetches; a long-polled read of results waits for a
    slice to become final.
    """

    def __init__(self, db: StorePool, clock: Callable[[], float], wakeups: Wakeups) -> None:
        self.db = db
        self.clock = clock
        self.wakeups = wakeups

    async def _signer(self, request: web.Request) -> str | None:
        """The address that signed this request (verified, fresh, its nonce now spent), or
        None when it carries no signature.

        Raises:
            Refused: the signature headers are malformed, stale, wrong or replayed.
        """
        signature = request.headers.get("X-DCP-Signature")
        if signature is None:
            return None
        stamp = request.headers.get("X-DCP-Timestamp", "")
        nonce = request.headers.get("X-DCP-Nonce", "")
        if not _TIMESTAMP.fullmatch(stamp) or not _NONCE.fullmatch(nonce):
            raise Refused(
                400,
                ErrorCode.INVALID_MESSAGE,
                "a signed request needs X-DCP-Timestamp (Unix seconds) and X-DCP-Nonce "
                "(32 lowercase hex digits)",
            )
        try:
            address = signing.checksum(request.headers.get("X-DCP-Owner", ""))
        except ValueError:
            raise Refused(400, ErrorCode.INVALID_MESSAGE, "X-DCP-Owner is not an address") from None
        timestamp, now = int(stamp), self.clock()
        if abs(now - timestamp) > REQUEST_WINDOW:
            raise Refused(
                401,
                ErrorCode.STALE_REQUEST,
                f"signed at {timestamp}, the scheduler's clock reads {now:.0f}: more than "
                f"{REQUEST_WINDOW:g} s apart",
            )
        body = await request.read()
        payload = signing.owner_request_payload(
            request.method,
            request.host,
            request.path,
            request.query.items(),
            body,
            timestamp,
            nonce,
            address,
        )
        if not signing.verify(payload, signature, address):
            raise Refused(401, ErrorCode.BAD_SIGNATURE, "the request is not signed by X-DCP-Owner")
        try:
            until = timestamp + REQUEST_WINDOW + NONCE_MARGIN
            fresh = await self.db.run(lambda s: s.use_nonce(address, nonce, now, until))
        except StoreError as exc:
            raise Refused(503, ErrorCode.INTERNAL, str(exc)) from None
        if not fresh:
            raise Refused(409, ErrorCode.REPLAYED_REQUEST, "this request was made before")
        return address

    async def _owner_of(self, job_id: str) -> str:
        try:
            return (await self.db.run(lambda s: s.job(job_id, counts=False))).owner
        except UnknownJob as exc:
            raise Refused(404, ErrorCode.UNKNOWN_SLICE, str(exc)) from None

    async def _check_owner(self, request: web.Request, job_id: str) -> str:
        """Acting on a job (cancel, tokens) needs its owner's signature; returns the owner."""
        signer = await self._signer(request)
        if signer is None:
            raise Refused(401, ErrorCode.UNAUTHENTICATED, "this request must be signed")
        owner = await self._owner_of(job_id)
        if signer != owner:
            raise Refused(403, ErrorCode.NOT_OWNER, f"{signer} does not own job {job_id}")
        return owner

    async def _check_reader(self, request: web.Request, job_id: str) -> None:
        """Reading a job (spec, status, results) needs its owner's signature or a read token
        for that job."""
        if "X-DCP-Signature" in request.headers:
            await self._check_owner(request, job_id)
            return
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Refused(
                401,
                ErrorCode.UNAUTHENTICATED,
                "reading a job needs its owner's signature or a read token",
            )
        now = self.clock()
        await self.db.run(lambda s: check_read_token(s, token.strip(), job_id, now))

    @_answers_refusals
    async def deploy(self, request: web.Request) -> web.Response:
        owner = await self._signer(request)
        if owner is None:
            return _error(401, ErrorCode.UNAUTHENTICATED, "a deploy must be signed by its owner")
        body = await request.read()
        try:
            # A MessagePack document carries its bytes as they are (docs/protocol.md section 6).
            job = parse_document(body, owner, binary=request.content_type == MSGPACK)
        except JobFileError as exc:
            return _error(
                400, ErrorCode.INVALID_JOB, "; ".join(exc.problems), problems=exc.problems
            )
        # The verifier and the comparison function run here: refused now, rather than every
        # result failing later.
        for what, code, runtime in (
            ("verifier", job.verifier, job.verifier_runtime),
            ("comparison function", job.compare, job.compare_runtime),
        ):
            lacking = None if code is None or runtime == "wasm" else problem(runtime)
            if lacking is not None:
                why = f"this scheduler cannot run a {runtime} {what}: {lacking}"
                return _error(400, ErrorCode.INVALID_JOB, why, problems=[why])
        try:
            job_id = await self.db.run(lambda s: s.create_job(job, time.time()))
        except InsufficientFunds as exc:
            return _error(402, exc.code, str(exc), missing=credits(exc.missing))
        self.wakeups.wake_work()
        log.info("job %s deployed by %s: %s, %d slices", job_id, job.owner, job.name, len(job.data))
        return _json_response({"job": job_id, "slices": len(job.data)}, status=201)

    @_answers_refusals
    async def list_jobs(self, request: web.Request) -> web.Response:
        """Signed: the signer's jobs, in full. Anonymous: what a worker weighs of the active
        public jobs, and nothing else (no id, name, owner, argv or results)."""
        signer = await self._signer(request)
        jobs = await self.db.run(lambda s: s.list_jobs())
        if signer is not None:
            return _json_response({"jobs": [_job_json(j) for j in jobs if j.owner == signer]})
        return _json_response({"jobs": [_market_json(j) for j in market(jobs)]})

    @_answers_refusals
    async def job(self, request: web.Request) -> web.Response:
        job_id = request.match_info["job"]
        await self._check_reader(request, job_id)
        try:
            record, refused = await self.db.run(lambda s: (s.job(job_id), s.refusals(job_id)))
        except UnknownJob as exc:
            return _error(404, ErrorCode.UNKNOWN_SLICE, str(exc))
        out = _job_json(record)
        refusals: dict[str, int] = {}
        for r in refused:
            refusals[r.code] = refusals.get(r.code, 0) + r.count
        out["refusals"] = refusals
        return _json_response(out)

    async def account(self, request: web.Request) -> web.Response:
        try:
            address = signing.checksum(request.match_info["address"])
        except ValueError:
            return _error(400, ErrorCode.INVALID_MESSAGE, "not an address")
        micro = await self.db.run(lambda s: s.balance(address))
        return _json_response(
            {"address": address, "balance": credits(micro), "balance_micro": micro}
        )

    @_answers_refusals
    async def results(self, request: web.Request) -> web.Response:
        """Final slices after ``after``, in order, up to the first one not final yet. With
        ``wait`` (seconds, at most 30), an empty answer for an active job is held until one
        more slice becomes final."""
        job_id = request.match_info["job"]
        try:
            after = slice_cursor(request.query.get("after", "-1"))
            limit = min(10_000, max(1, int(request.query.get("limit", "1000"))))
            wait = min(MAX_FETCH_WAIT, max(0.0, float(request.query.get("wait", "0"))))
        except ValueError:
            return _error(
                400,
                ErrorCode.INVALID_MESSAGE,
                f"after is a slice index within -1..{MAX_SLICE_INDEX}; limit and wait are numbers",
            )
        await self._check_reader(request, job_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            event = self.wakeups.results  # taken before reading, so no wake-up is missed
            try:
                state, slices = await self.db.run(
                    lambda s: (
                        s.job_state(job_id),
                        s.slices(job_id, after, limit, final_prefix=True, max_bytes=PAGE_BYTES),
                    )
                )
            except UnknownJob as exc:
                return _error(404, ErrorCode.UNKNOWN_SLICE, str(exc))
            remaining = deadline - loop.time()
            if slices or state != "active" or remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), remaining)
        if _wants_msgpack(request):  # results as bytes, not base64 in JSON
            return _msgpack_response(
                {"job": job_id, "state": state, "slices": [_slice_json(s, True) for s in slices]}
            )
        return _json_response(
            {"job": job_id, "state": state, "slices": [_slice_json(s) for s in slices]}
        )

    @_answers_refusals
    async def votes(self, request: web.Request) -> web.Response:
        """A replicated job's slices after ``after`` (up to ``limit``) with their quorum
        states and replicas; for the owner or a read token's bearer."""
        job_id = request.match_info["job"]
        try:
            after = slice_cursor(request.query.get("after", "-1"))
            limit = min(100, max(1, int(request.query.get("limit", "100"))))
        except ValueError:
            return _error(
                400,
                ErrorCode.INVALID_MESSAGE,
                f"after is a slice index within -1..{MAX_SLICE_INDEX}; limit is a number",
            )
        await self._check_reader(request, job_id)
        try:
            shown = await self.db.run(
                lambda store: [
                    quorum_json(s, store.replicas(job_id, s.slice))
                    for s in store.slices(job_id, after, limit)
                ]
            )
        except UnknownJob as exc:
            return _error(404, ErrorCode.UNKNOWN_SLICE, str(exc))
        return _json_response({"job": job_id, "slices": shown})

    @_answers_refusals
    async def cancel(self, request: web.Request) -> web.Response:
        job_id = request.match_info["job"]
        await self._check_owner(request, job_id)
        n = await self.db.run(lambda s: s.cancel_job(job_id, time.time()))
        self.wakeups.wake_results()
        return _json_response({"job": job_id, "cancelled_slices": n})

    @_answers_refusals
    async def issue_token(self, request: web.Request) -> web.Response:
        """A read token for one job: its owner hands it to whoever may read the job."""
        job_id = request.match_info["job"]
        await self._check_owner(request, job_id)
        ttl = _token_ttl(await request.read())
        token = READ_TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = self.clock()
        try:
            digest = _token_sha256(token)
            record = await self.db.run(
                lambda s: s.create_read_token(job_id, digest, now, now + ttl)
            )
        except UnknownJob as exc:
            return _error(404, ErrorCode.UNKNOWN_SLICE, str(exc))
        log.info("read token %s issued for job %s, expires in %g s", record.id, job_id, ttl)
        return _json_response(
            {"job": job_id, "token": token, "token_id": record.id, "expires": record.expires},
            status=201,
        )

    @_answers_refusals
    async def revoke_token(self, request: web.Request) -> web.Response:
        job_id, token_id = request.match_info["job"], request.match_info["token"]
        await self._check_owner(request, job_id)
        now = self.clock()
        if not await self.db.run(lambda s: s.revoke_read_token(job_id, token_id, now)):
            return _error(
                404, ErrorCode.READ_TOKEN_INVALID, f"job {job_id} has no token {token_id}"
            )
        log.info("read token %s of job %s revoked", token_id, job_id)
        return _json_response({"job": job_id, "token_id": token_id, "revoked": True})


def read_token_job(store: Store, token: str, now: float) -> str:
    """The job a live read token reads: the compute API and the web console (scheduler/web/)
    ask this one question the same way.

    Raises:
        Refused: the token is unknown, revoked or expired (the reason named).
    """
    record = store.read_token(_token_sha256(token))
    if record is None:
        raise Refused(401, ErrorCode.READ_TOKEN_INVALID, "no such read token")
    if record.revoked is not None:
        raise Refused(401, ErrorCode.READ_TOKEN_REVOKED, "the read token was revoked")
    if now >= record.expires:
        raise Refused(401, ErrorCode.READ_TOKEN_EXPIRED, "the read token has expired")
    return record.job


def check_read_token(store: Store, token: str, job_id: str, now: float) -> None:
    """Whether ``token`` lets its bearer read job ``job_id`` at ``now``.

    Raises:
        Refused: the token is not live (:func:`read_token_job`) or is for another job.
    """
    if read_token_job(store, token, now) != job_id:
        raise Refused(403, ErrorCode.READ_TOKEN_WRONG_JOB, "the read token is for another job")


def market(jobs: list[JobRecord]) -> list[JobRecord]:
    """The jobs anyone may see a summary of (:func:`_market_json`): the active public ones."""
    return [j for j in jobs if j.state == "active" and not j.group]


def _token_sha256(token: str) -> str:
    # Tokens are 256 random bits: a fast hash is enough to keep the database from holding them.
    return hashlib.sha256(token.encode()).hexdigest()


def _token_ttl(body: bytes) -> float:
    """The lifetime a token request asks for: ``{"ttl": seconds}``, or the default."""
    if not body:
        return READ_TOKEN_TTL
    try:
        doc = nesting.loads(body)
    except ValueError:
        raise Refused(400, ErrorCode.INVALID_MESSAGE, "the body is not JSON") from None
    ttl = doc.get("ttl", READ_TOKEN_TTL) if isinstance(doc, dict) else None
    if (
        not isinstance(doc, dict)
        or set(doc) - {"ttl"}
        or isinstance(ttl, bool)
        or not isinstance(ttl, (int, float))
        or not 1 <= ttl <= MAX_READ_TOKEN_TTL
    ):
        raise Refused(
            400,
            ErrorCode.INVALID_MESSAGE,
            f'the body is {{"ttl": seconds}}, 1 to {MAX_READ_TOKEN_TTL:g}',
        )
    return float(ttl)


def _error(status: int, code: ErrorCode, message: str, **extra: Any) -> web.Response:
    body = {"code": code.value, "message": message, **extra}
    return _json_response({"error": body}, status=status)


#: The largest slice index a query may name (a job has far fewer slices; the databases'
#: integers are 64-bit, and a larger number answered 500 from the SQL driver).
MAX_SLICE_INDEX = 2**62


def slice_cursor(text: str) -> int:
    """A query's ``after``: a slice index, or -1 for "from the first".

    Raises:
        ValueError: not an integer, or outside -1..MAX_SLICE_INDEX.
    """
    value = int(text)
    if not -1 <= value <= MAX_SLICE_INDEX:
        raise ValueError(f"after {value} is outside -1..{MAX_SLICE_INDEX}")
    return value


def _json_response(data: Any, status: int = 200, **kwargs: Any) -> web.Response:
    """A JSON answer, strictly JSON: a non-finite number is a bug here, never an
    ``Infinity`` for a client's strict parser to choke on."""
    return web.json_response(
        data, status=status, dumps=functools.partial(json.dumps, allow_nan=False), **kwargs
    )


def _effective_wage(offer: float, cost: Metrics | None) -> dict[str, float | None] | None:
    """What the offer pays per unit of each measured resource (the wage a worker earns)."""
    if cost is None:
        return None

    def per(amount: float) -> float | None:
        if not amount > 0:
            return None
        wage = offer / amount
        return wage if math.isfinite(wage) else None  # a claimed 1e-305 s: no wage to show

    return {
        "cpu_hour": per(cost.cpu_seconds / 3600),
        "gpu_hour": per(cost.gpu_seconds / 3600),
        "mb_in": per(cost.bytes_in / 1e6),
        "mb_out": per(cost.bytes_out / 1e6),
    }


def _job_json(job: JobRecord) -> dict[str, Any]:
    return {
        "job": job.id,
        "name": job.name,
        "owner": job.owner,
        "state": job.state,
        "runtime": job.runtime,
        "module_sha256": job.module_sha256,
        "argv": list(job.argv),
        "limits": asdict(job.limits),
        "offer": credits(job.offer_micro),
        "escrow": credits(job.escrow_micro),
        "group": job.group,
        "requirements": job.requirements,
        "verifier": job.has_verifier,
        "redundancy": asdict(job.redundancy) if job.redundancy else None,
        "compare": job.has_compare,
        "cost_per_slice": asdict(job.cost) if job.cost else None,
        "effective_wage": _effective_wage(credits(job.offer_micro), job.cost),
        "created": job.created,
        "finished": job.finished,
        "slices": job.total,
        "max_attempts": job.max_attempts,
        "counts": job.counts,
    }


def _market_json(job: JobRecord) -> dict[str, Any]:
    """What anyone may see of an active public job: what a worker weighs before it takes a
    slice. Nothing names the job or its owner; the job's id comes only with a lease."""
    return {
        "runtime": job.runtime,
        "offer": credits(job.offer_micro),
        "limits": asdict(job.limits),
        "requirements": job.requirements,
        "effective_wage": _effective_wage(credits(job.offer_micro), job.cost),
        "slices": job.total,
        "queued": job.counts.get("queued", 0),
    }


#: A page of results stops after the slice whose result passes this many bytes (at least one
#: slice a page): 5,000 results of 1 MiB were 5 GiB of one reply.
PAGE_BYTES = 32 << 20


def _wants_msgpack(request: web.Request) -> bool:
    return MSGPACK in request.headers.get("Accept", "")


def _msgpack_response(data: Any) -> web.Response:
    return web.Response(body=msgspec.msgpack.encode(data), content_type=MSGPACK)


def _slice_json(s: SliceRecord, binary: bool = False) -> dict[str, Any]:
    """A slice as the results API shows it: its result in base64 (``result_base64``), or
    with ``binary`` as bytes (``result``, for a MessagePack reply)."""
    out: dict[str, Any] = {"slice": s.slice, "state": s.state, "attempts": s.attempts}
    if s.result is not None and binary:
        out["result"] = s.result
    elif s.result is not None:
        out["result_base64"] = base64.b64encode(s.result).decode()
    if s.error_code:
        out["error"] = {"code": s.error_code, "message": s.error or ""}
    if s.needed is not None:
        out["needed"] = s.needed
    return out


def quorum_json(s: SliceRecord, replicas: list[ReplicaRecord]) -> dict[str, Any]:
    """A replicated slice's quorum state for its owner: agreeing results it needs, how many
    it has, and each replica with its vote and result (disagreeing ones kept to inspect)."""
    votes = Counter(r.kind for r in replicas)
    return {
        "slice": s.slice,
        "state": s.state,
        "needed": s.needed,
        "votes": votes,
        "replicas": [
            {
                "replica": r.slice,
                "state": r.state,
                "vote": r.vote,
                "worker": r.worker,
                "payment_address": r.payment_address,
                "result_base64": None if r.result is None else base64.b64encode(r.result).decode(),
                "error": r.error_code,
            }
            for r in replicas
        ],
    }
