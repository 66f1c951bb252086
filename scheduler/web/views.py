"""The console's pages: each handler asks :mod:`.access` who the visitor is, reads the store,
and renders one template (jinja2, autoescaped). Refusals are pages that name their reason."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web

from dcp_protocol import signing

from ..api import market, slice_cursor
from ..store import JobRecord, UnknownJob, credits
from ..store.pool import StorePool
from .access import (
    OPERATOR_COOKIE,
    READ_COOKIE,
    SignInRefused,
    Visitor,
    sign_in,
)

__all__ = ["PAGE_SLICES", "STATES", "Console"]

#: Slices per page of a job's results.
PAGE_SLICES = 50
#: Ledger entries the ledger page shows (the newest).
LEDGER_ROWS = 200
#: A slice's states in the order the pages show them.
STATES = ("queued", "leased", "voting", "done", "failed", "cancelled")
#: Rows the overview shows of each table (the newest jobs); it says how many it left out.
OVERVIEW_ROWS = 200
#: Refusal rows a job page shows (the latest).
REFUSAL_ROWS = 100
#: How much of a result the job page shows.
PREVIEW_BYTES = 120
_FINAL = ("done", "failed", "cancelled")
#: The console's cookies live this long; each read token is checked again on every request.
COOKIE_SECONDS = 30 * 24 * 3600
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True)
class Refusal:
    status: int
    code: str
    message: str


def _utc(at: float | None) -> str:
    if at is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


def _preview(result: bytes | None) -> str:
    if result is None:
        return ""
    text = result[:PREVIEW_BYTES].decode("utf-8", "replace")
    if any(ch != "\n" and not ch.isprintable() for ch in text):
        return result[: PREVIEW_BYTES // 2].hex()
    return text + ("…" if len(result) > PREVIEW_BYTES else "")


def _shown(address: str) -> str:
    """An address as every page shows it, EIP-55 checksummed (the store keeps what it got)."""
    try:
        return signing.checksum(address)
    except ValueError:
        return address


def _account(account: str) -> str:
    """A ledger account: an address checksummed, ``escrow:<job>`` with the job's id cut short."""
    if account.startswith("escrow:"):
        return account[:15] + "…"
    return _shown(account) if account.startswith("0x") else account


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={**_HEADERS, "Location": location})


def _done_fraction(counts: dict[str, int], total: int) -> float:
    return sum(counts.get(s, 0) for s in _FINAL) / total if total else 1.0


class Console:
    """The web console over one store.

    Args:
        db: where the scheduler's store calls run (scheduler/store/pool.py).
        connected: the addresses of the workers connected now (authenticated sessions).
        operator_token: what the operator pastes to see workers and the ledger.
        clock: Unix seconds, for read token expiry (the compute API's clock).
    """

    def __init__(
        self,
        db: StorePool,
        connected: Callable[[], set[str]],
        operator_token: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.connected = connected
        self.operator_token = operator_token
        self.clock = clock
        self.templates = jinja2.Environment(
            loader=jinja2.PackageLoader("scheduler.web", "templates"),
            autoescape=jinja2.select_autoescape(default=True),
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.templates.filters["utc"] = _utc
        self.templates.filters["account"] = _account
        self.templates.filters["credits"] = lambda micro: f"{credits(micro):g}"

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/", self.root)
        app.router.add_get("/console/", self.overview)
        app.router.add_get("/console/jobs/{job}", self.job)
        app.router.add_get("/console/jobs/{job}/counts.json", self.job_counts)
        app.router.add_get("/console/workers", self.workers)
        app.router.add_get("/console/ledger", self.ledger)
        app.router.add_get("/console/sign-in", self.sign_in_page)
        app.router.add_post("/console/sign-in", self.sign_in)
        app.router.add_post("/console/sign-out", self.sign_out)
        app.router.add_static("/console/static", Path(__file__).parent / "static")

    # ------------------------------------------------------------------ helpers

    async def _visitor(self, request: web.Request) -> Visitor:
        cookies, token, now = dict(request.cookies), self.operator_token, self.clock()
        return await self.db.run(lambda s: Visitor.from_cookies(s, cookies, token, now))

    def _render(
        self, request: web.Request, visitor: Visitor, name: str, status: int = 200, **context: Any
    ) -> web.Response:
        body = self.templates.get_template(name).render(
            visitor=visitor, path=request.path, states=STATES, **context
        )
        return web.Response(
            text=body, status=status, content_type="text/html", charset="utf-8", headers=_HEADERS
        )

    def _refuse(self, request: web.Request, visitor: Visitor, refusal: Refusal) -> web.Response:
        return self._render(
            request, visitor, "refusal.html", status=refusal.status, refusal=refusal
        )

    async def _readable_job(self, visitor: Visitor, job_id: str) -> JobRecord | Refusal:
        """The job, if this visitor may read it (the compute API's order: who, then which)."""
        if not visitor.signed_in:
            return Refusal(
                401, "unauthenticated", "reading a job needs a read token for it: sign in"
            )
        if not visitor.may_read(job_id):
            return Refusal(
                403, "read_token_wrong_job", "none of this browser's read tokens is for that job"
            )
        try:
            return await self.db.run(lambda s: s.job(job_id))
        except UnknownJob as exc:
            return Refusal(404, "unknown_slice", str(exc))

    def _operator_only(self, visitor: Visitor) -> Refusal | None:
        if visitor.operator:
            return None
        return Refusal(
            403 if visitor.signed_in else 401,
            "operator_token_needed",
            "this page is the operator's: sign in with the token in the file beside the "
            "scheduler's database (*.console-token)",
        )

    def _same_origin(self, request: web.Request) -> Refusal | None:
        """A POST must come from a page of ours (CSRF): its Origin names this host and port.
        The scheme is not compared, so that a TLS proxy in front (https outside, http here)
        does not refuse every sign-in."""
        origin = request.headers.get("Origin", "")
        scheme, sep, authority = origin.partition("://")
        if not sep or scheme not in ("http", "https") or authority != request.host:
            return Refusal(
                403,
                "cross_origin_post",
                f"a form of this console must post it (Origin {origin or 'missing'})",
            )
        return None

    def _set_cookie(
        self, request: web.Request, response: web.Response, name: str, value: str
    ) -> None:
        response.set_cookie(
            name,
            value,
            max_age=COOKIE_SECONDS,
            path="/console",
            httponly=True,
            samesite="Strict",
            secure=request.secure,
        )

    # ------------------------------------------------------------------ pages

    async def root(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/console/")

    async def overview(self, request: web.Request) -> web.Response:
        visitor = await self._visitor(request)
        jobs = await self.db.run(lambda s: s.list_jobs())
        readable = [j for j in jobs if visitor.may_read(j.id)]
        totals = {s: sum(j.counts.get(s, 0) for j in readable) for s in STATES}
        public = [
            {
                "runtime": j.runtime,
                "offer": j.offer_micro,
                "slices": j.total,
                "queued": j.counts.get("queued", 0),
                "started": (j.total - j.counts.get("queued", 0)) / j.total if j.total else 1.0,
            }
            for j in market(jobs)
            if not visitor.may_read(j.id)
        ]
        newest = readable[::-1][:OVERVIEW_ROWS]
        return self._render(
            request,
            visitor,
            "overview.html",
            jobs=[(j, _done_fraction(j.counts, j.total)) for j in newest],
            jobs_left_out=len(readable) - len(newest),
            public=public[::-1][:OVERVIEW_ROWS],
            public_left_out=max(0, len(public) - OVERVIEW_ROWS),
            totals=totals,
            connected=len(self.connected()),
        )

    async def job(self, request: web.Request) -> web.Response:
        visitor = await self._visitor(request)
        found = await self._readable_job(visitor, request.match_info["job"])
        if isinstance(found, Refusal):
            return self._refuse(request, visitor, found)
        try:
            after = slice_cursor(request.query.get("after", "-1"))
        except ValueError:
            after = -1
        job_id = found.id
        slices, refused = await self.db.run(
            lambda s: (s.slices(job_id, after, PAGE_SLICES), s.refusals(job_id))
        )
        refusals = sorted(refused, key=lambda r: -r.last)[:REFUSAL_ROWS]
        return self._render(
            request,
            visitor,
            "job.html",
            job=found,
            done=_done_fraction(found.counts, found.total),
            slices=[(s, _preview(s.result), len(s.result or b"")) for s in slices],
            after=after,
            next_after=slices[-1].slice if len(slices) == PAGE_SLICES else None,
            page=PAGE_SLICES,
            refusals=refusals,
        )

    async def job_counts(self, request: web.Request) -> web.Response:
        """The job page's numbers, for its script to refresh them."""
        visitor = await self._visitor(request)
        found = await self._readable_job(visitor, request.match_info["job"])
        if isinstance(found, Refusal):
            return web.json_response(
                {"error": {"code": found.code, "message": found.message}},
                status=found.status,
                headers=_HEADERS,
            )
        return web.json_response(
            {
                "job": found.id,
                "state": found.state,
                "slices": found.total,
                "counts": {s: found.counts.get(s, 0) for s in STATES},
                "done": _done_fraction(found.counts, found.total),
            },
            headers=_HEADERS,
        )

    async def workers(self, request: web.Request) -> web.Response:
        visitor = await self._visitor(request)
        refusal = self._operator_only(visitor)
        if refusal is not None:
            return self._refuse(request, visitor, refusal)
        connected = {_shown(a) for a in self.connected()}
        workers = sorted(
            (
                replace(w, address=_shown(w.address))
                for w in await self.db.run(lambda s: s.workers())
            ),
            key=lambda w: (w.address not in connected, -w.last_seen),
        )
        return self._render(request, visitor, "workers.html", workers=workers, connected=connected)

    async def ledger(self, request: web.Request) -> web.Response:
        visitor = await self._visitor(request)
        refusal = self._operator_only(visitor)
        if refusal is not None:
            return self._refuse(request, visitor, refusal)
        found, totals = await self.db.run(lambda s: (s.ledger(limit=LEDGER_ROWS), s.totals()))
        entries = sorted(found, key=lambda e: -e.seq)
        return self._render(
            request,
            visitor,
            "ledger.html",
            entries=entries,
            totals=sorted(totals.items()),
            limit=LEDGER_ROWS,
        )

    async def sign_in_page(self, request: web.Request) -> web.Response:
        return self._render(request, await self._visitor(request), "sign_in.html", problem=None)

    async def sign_in(self, request: web.Request) -> web.Response:
        visitor = await self._visitor(request)
        refusal = self._same_origin(request)
        if refusal is not None:
            return self._refuse(request, visitor, refusal)
        form = await request.post()
        pasted = form.get("token", "")
        try:
            token, now = self.operator_token, self.clock()
            kind, job_id = await self.db.run(lambda s: sign_in(s, visitor, str(pasted), token, now))
        except SignInRefused as exc:
            return self._render(
                request,
                visitor,
                "sign_in.html",
                status=exc.status,
                problem=Refusal(exc.status, exc.code, exc.message),
            )
        if kind == "operator":
            response = _see_other("/console/workers")
            self._set_cookie(request, response, OPERATOR_COOKIE, self.operator_token)
        else:
            tokens = {**visitor.tokens, job_id: str(pasted).strip()}
            response = _see_other(f"/console/jobs/{job_id}")
            self._set_cookie(request, response, READ_COOKIE, ".".join(tokens.values()))
        return response

    async def sign_out(self, request: web.Request) -> web.Response:
        visitor = await self._visitor(request)
        refusal = self._same_origin(request)
        if refusal is not None:
            return self._refuse(request, visitor, refusal)
        response = _see_other("/console/")
        for name in (READ_COOKIE, OPERATOR_COOKIE):
            response.del_cookie(name, path="/console")
        return response
