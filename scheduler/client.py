"""The compute API's Python client: deploy, status, results, cancel, read tokens.

client = ComputeClient("http://127.0.0.1:8500", identity)
job = client.deploy("examples/hash-puzzle/job.toml")
for r in client.results(job, wait=True):
    print(r.slice, r.result)

With an identity every request is signed (fresh timestamp, new nonce: docs/protocol.md
section 6); without one, a read token the job's owner issued reads that job:

reader = ComputeClient("http://127.0.0.1:8500", token=client.issue_token(job).token)

Several URLs name scheduler replicas sharing one database (docs/protocol.md "Several
schedulers"): a request no replica could be reached for goes to the next one, an answered
request is never sent elsewhere (the answer stands):

client = ComputeClient(["http://a:8500", "http://b:8500"], identity)

A scheduler that is starting (or restarting) refuses connections for a moment: with
``connect_wait=S`` a request that reached no replica tries them all again, backing off, for up
to S seconds (``dcp-compute``'s ``--connect-wait``, 10 s by default; 0 here).
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import msgspec

from dcp_keys.identity import Identity
from dcp_protocol import DcpError, nesting, signing

from .jobdoc import MSGPACK, load_job_file

__all__ = [
    "ComputeClient",
    "ComputeError",
    "ReadToken",
    "SliceResult",
    "WaitTimeout",
    "http_base",
]


class ComputeError(DcpError):
    """The scheduler refused a request or could not be reached; ``code`` names why.

    ``status`` is the HTTP status (None when no answer came), ``reason`` the scheduler's own
    words (or why it could not be reached) without the request line, ``details`` the rest of
    its error object (e.g. ``missing`` credits for ``insufficient_funds``)."""

    def __init__(
        self,
        message: str,
        status: int | None = None,
        code: str = "",
        reason: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.reason = message if reason is None else reason
        self.details = details or {}


class WaitTimeout(ComputeError):
    """``results(wait=True, timeout=...)`` gave up: the job was still active."""


@dataclass(frozen=True)
class SliceResult:
    slice: int
    state: str
    result: bytes | None
    error: dict[str, str] | None


@dataclass(frozen=True)
class ReadToken:
    """A bearer token that reads one job; ``token_id`` revokes it, ``expires`` is Unix s."""

    job: str
    token: str
    token_id: str
    expires: float


def http_base(url: str) -> str:
    """``http(s)://host:port`` for a scheduler URL given as http(s):// or ws(s)://."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    if scheme not in ("http", "https"):
        raise ComputeError(f"unsupported scheduler URL scheme {parts.scheme!r}")
    return urlunsplit((scheme, parts.netloc, "", "", ""))


def _msgpack_body(method: str, path: str, response: httpx.Response) -> Any:
    """A MessagePack reply's data: maps, arrays, bytes (the results) and the JSON scalars.

    Raises:
        ComputeError: not one well-formed MessagePack value, or nested past the decoder's
            recursion bound.
    """
    try:
        return msgspec.msgpack.decode(response.content)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise ComputeError(
            f"{method} {path}: the scheduler's reply is not MessagePack: {exc}",
            response.status_code,
        ) from None


class ComputeClient:
    """A client of a scheduler's compute API, at one URL or at several replicas.

    Args:
        scheduler: a URL, or several: replicas sharing one database, tried in order. The
            first that answers is kept for the requests after it.
        identity: the job owner's key; every request is then signed.
        token: a read token (used when there is no identity): reads the job it was issued for.
        clock: Unix seconds for the signed timestamps (tests inject a skewed one).
        connect_wait: seconds a request that reached no replica (each refused the connection
            or did not resolve) goes on trying them, backing off from 0.1 s to 1 s; 0 fails
            at once. Nothing was sent, so trying again is always safe.
        notice: called once per request that waits so, with what the first round found.

    Raises:
        ComputeError: no URL, or one of an unsupported scheme.
    """

    def __init__(
        self,
        scheduler: str | Sequence[str],
        identity: Identity | None = None,
        timeout: float = 60.0,
        token: str | None = None,
        clock: Callable[[], float] = time.time,
        connect_wait: float = 0.0,
        notice: Callable[[str], None] | None = None,
    ) -> None:
        urls = (scheduler,) if isinstance(scheduler, str) else tuple(scheduler)
        if not urls:
            raise ComputeError("no scheduler URL given")
        #: ``http(s)://host:port`` of each replica, in the order given.
        self.bases = tuple(http_base(url) for url in urls)
        self.identity = identity
        self.token = token
        self._clock = clock
        self.connect_wait = connect_wait
        self._notice = notice
        self._current = 0  # the replica that answered last: the first one tried
        self._msgpack: bool | None = None  # whether the scheduler reads MessagePack documents
        self._http = httpx.Client(timeout=timeout)

    @property
    def base(self) -> str:
        """The replica requests go to first: the one that answered last."""
        return self.bases[self._current]

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ComputeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _authorize(self, request: httpx.Request) -> None:
        """Sign ``request`` as built (its method, Host, path, query and body), or give it the
        read token; with neither it goes anonymous and the scheduler decides."""
        if self.identity is not None:
            timestamp, nonce = int(self._clock()), secrets.token_hex(16)
            payload = signing.owner_request_payload(
                request.method,
                request.headers["Host"],
                request.url.path,
                request.url.params.multi_items(),
                request.content,
                timestamp,
                nonce,
                self.identity.address,
            )
            request.headers["X-DCP-Owner"] = self.identity.address
            request.headers["X-DCP-Timestamp"] = str(timestamp)
            request.headers["X-DCP-Nonce"] = nonce
            request.headers["X-DCP-Signature"] = self.identity.sign(payload)
        elif self.token is not None:
            request.headers["Authorization"] = f"Bearer {self.token}"

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._send(method, path, **kwargs)
        if response.status_code < 400 and response.headers.get("Content-Type", "").startswith(
            MSGPACK
        ):
            return _msgpack_body(method, path, response)
        try:
            body = nesting.loads(response.content) if response.content else {}
        except nesting.NestingTooDeep as exc:
            raise ComputeError(
                f"{method} {path}: the scheduler's reply {exc}",
                response.status_code,
                exc.code.value,
            ) from None
        except ValueError:
            body = {}
        if response.status_code >= 400:
            error = body.get("error", {}) if isinstance(body, dict) else {}
            if not isinstance(error, dict):
                error = {}
            code = str(error.get("code", ""))
            reason = str(error.get("message", response.reason_phrase))
            raise ComputeError(
                f"{method} {path}: {response.status_code} {reason}"
                + (f" ({code})" if code else ""),
                response.status_code,
                code,
                reason,
                {k: v for k, v in error.items() if k not in ("code", "message")},
            )
        return body

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The first answer to the request, trying each replica from :attr:`base` on.

        Only a request that never reached a replica moves to the next: the connection was
        refused, the name did not resolve, the connect (or the wait for a pooled connection)
        timed out. Any HTTP answer stands, a refusal included: the replicas share one
        database, so they answer alike, and an answer means the request arrived. A
        connection that died after the request went out is not retried either: the replica
        may have acted on it, and only the caller knows whether that matters.

        Each try is signed afresh, which is what makes resending a signed request (a deploy,
        a cancel) to another replica safe. The signature covers the Host, so the first try's
        would not verify elsewhere anyway; its nonce was never spent, since the request never
        arrived; and the new nonce cannot be answered 409 ``replayed_request``, which only a
        resent *signed* request gets (nonces are spent in the shared database, so a replay
        is refused by every replica alike). This client never sends one signature twice, so
        it never sees that answer from its own retries. Should an owner deploy again after
        an unanswered deploy (the connection died after the request went out), the store
        finds the document's payload_sha256 and answers the job it already made: no second
        job, no second escrow.

        Raises:
            ComputeError: no replica could be reached (each one's reason), or the one reached
                failed before answering.
        """
        deadline: float | None = None
        delay = 0.1
        while True:
            unreachable: list[str] = []
            refused = True  # every replica refused or did not resolve: nothing to wait out
            for step in range(len(self.bases)):
                index = (self._current + step) % len(self.bases)
                base = self.bases[index]
                try:
                    request = self._http.build_request(method, f"{base}/api/v1{path}", **kwargs)
                    self._authorize(request)
                    response = self._http.send(request)
                except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                    unreachable.append(f"{base}: {exc}")
                    refused = refused and isinstance(exc, httpx.ConnectError)
                    continue
                except httpx.HTTPError as exc:
                    raise ComputeError(f"cannot reach the scheduler at {base}: {exc}") from None
                self._current = index
                return response
            # A connect that timed out has already waited its timeout: no second round.
            if not refused or self.connect_wait <= 0:
                break
            now = time.monotonic()
            if deadline is None:
                deadline = now + self.connect_wait
                if self._notice is not None:
                    self._notice(
                        f"no scheduler answers yet ({'; '.join(unreachable)}); trying again "
                        f"for up to {self.connect_wait:g} s"
                    )
            if now >= deadline:
                break
            time.sleep(min(delay, deadline - now))
            delay = min(delay * 2, 1.0)
        if len(unreachable) == 1:
            raise ComputeError(f"cannot reach the scheduler at {unreachable[0]}")
        raise ComputeError(f"cannot reach any scheduler: {'; '.join(unreachable)}")

    def _need_identity(self) -> Identity:
        if self.identity is None:
            raise ComputeError("this request must be signed: give an identity keystore")
        return self.identity

    def deploy(self, job_file: str | Path) -> str:
        """Deploy a job file; returns the job id. The document goes in MessagePack (its bytes
        as they are) to a scheduler that speaks protocol version 2, in JSON to an older one."""
        self._need_identity()
        body = load_job_file(job_file, binary=True)  # a bad file is refused before any request
        if not self.reads_msgpack():
            return self.deploy_document(load_job_file(job_file))
        return self.deploy_document(body, binary=True)

    def deploy_document(self, body: bytes, binary: bool = False) -> str:
        """Deploy a job document (its exact bytes: JSON, or with ``binary`` MessagePack).
        Sending the same document again, in a new signed request, returns the same job: a
        retry after a lost reply charges nothing."""
        self._need_identity()
        kind = MSGPACK if binary else "application/json"
        reply = self._request("POST", "/jobs", content=body, headers={"Content-Type": kind})
        return str(reply["job"])

    def reads_msgpack(self) -> bool:
        """Whether the scheduler reads MessagePack job documents (:meth:`deploy_document`
        with ``binary``): its status says protocol version 2 or later (asked once per
        client)."""
        if self._msgpack is None:
            status = self._request("GET", "/status")
            protocol = status.get("protocol") if isinstance(status, dict) else None
            self._msgpack = type(protocol) is int and protocol >= 2
        return self._msgpack

    def account(self, address: str | None = None) -> dict[str, Any]:
        """Balance of ``address`` (default: this client's identity), in credits."""
        if address is None:
            address = self._need_identity().address
        return dict(self._request("GET", f"/accounts/{address}"))

    def jobs(self) -> list[dict[str, Any]]:
        """With an identity, its jobs in full; without, what anyone sees of the active public
        jobs (runtime, offer, limits, requirements, slice counts: no ids, no owners)."""
        return list(self._request("GET", "/jobs")["jobs"])

    def status(self, job: str) -> dict[str, Any]:
        """A job's spec and state (signed by its owner, or with a read token for it)."""
        return dict(self._request("GET", f"/jobs/{job}"))

    def cancel(self, job: str) -> int:
        self._need_identity()
        reply = self._request("POST", f"/jobs/{job}/cancel")
        return int(reply["cancelled_slices"])

    def issue_token(self, job: str, ttl: float | None = None) -> ReadToken:
        """A read token for ``job`` (this client's identity must own it), valid ``ttl``
        seconds (default: the scheduler's, 24 h)."""
        self._need_identity()
        body = b"" if ttl is None else json.dumps({"ttl": ttl}).encode()
        reply = self._request(
            "POST",
            f"/jobs/{job}/tokens",
            content=body,
            headers={"Content-Type": "application/json"} if body else {},
        )
        return ReadToken(
            str(reply["job"]), str(reply["token"]), str(reply["token_id"]), reply["expires"]
        )

    def revoke_token(self, job: str, token_id: str) -> None:
        self._need_identity()
        self._request("DELETE", f"/jobs/{job}/tokens/{token_id}")

    def votes(self, job: str, after: int = -1) -> Iterator[dict[str, Any]]:
        """A replicated job's slices in order (those after slice ``after``), each with its
        quorum state (``needed``, the count of each vote) and its replicas (state, vote,
        worker, result in base64)."""
        while True:
            reply = self._request("GET", f"/jobs/{job}/votes", params={"after": after})
            if not reply["slices"]:
                return
            yield from reply["slices"]
            after = reply["slices"][-1]["slice"]

    def results(
        self,
        job: str,
        wait: bool = False,
        poll: float = 10.0,
        timeout: float | None = None,
        after: int = -1,
    ) -> Iterator[SliceResult]:
        """Results in slice order, from the slice after ``after`` (-1: the first). With
        ``wait``, blocks until every slice is final.

        Args:
            poll: the longest the scheduler holds one request waiting for a result (long poll).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            hold = 0.0
            if wait:
                left = poll if deadline is None else deadline - time.monotonic()
                hold = max(0.0, min(poll, left))
            reply = self._request(
                "GET",
                f"/jobs/{job}/results",
                params={"after": after, "limit": 5000, "wait": hold},
                # Results as bytes where the scheduler can (an older one answers JSON).
                headers={"Accept": f"{MSGPACK}, application/json;q=0.5"},
                timeout=hold + self._http.timeout.read if self._http.timeout.read else None,
            )
            for s in reply["slices"]:
                data = s.get("result")
                if data is None and s.get("result_base64") is not None:
                    data = base64.b64decode(s["result_base64"])
                if data is not None and not isinstance(data, bytes):
                    raise ComputeError(f"the scheduler's result of slice {s['slice']} is not bytes")
                yield SliceResult(s["slice"], s["state"], data, s.get("error"))
                after = s["slice"]
            if reply["slices"]:
                continue
            if reply["state"] != "active" or not wait:
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"job {job} did not finish within {timeout:g} s")
