"""The compute API's Python client: deploy, status, results, cancel.

client = ComputeClient("http://127.0.0.1:8500", identity)
job = client.deploy("examples/hash-puzzle/job.toml")
for r in client.results(job, wait=True):
    print(r.slice, r.result)
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from dcp_worker.identity import Identity
from dcp_worker.protocol import nesting, signing

from .jobdoc import load_job_file

__all__ = ["ComputeClient", "ComputeError", "SliceResult", "http_base"]


class ComputeError(Exception):
    """The scheduler refused a request or could not be reached; ``code`` names why."""

    def __init__(self, message: str, status: int | None = None, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class SliceResult:
    slice: int
    state: str
    result: bytes | None
    error: dict[str, str] | None


def http_base(url: str) -> str:
    """``http(s)://host:port`` for a scheduler URL given as http(s):// or ws(s)://."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    if scheme not in ("http", "https"):
        raise ComputeError(f"unsupported scheduler URL scheme {parts.scheme!r}")
    return urlunsplit((scheme, parts.netloc, "", "", ""))


class ComputeClient:
    def __init__(
        self, scheduler: str, identity: Identity | None = None, timeout: float = 60.0
    ) -> None:
        self.base = http_base(scheduler)
        self.identity = identity
        self._http = httpx.Client(base_url=self.base + "/api/v1", timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ComputeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ComputeError(f"cannot reach the scheduler at {self.base}: {exc}") from None
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
            raise ComputeError(
                f"{method} {path}: {response.status_code} "
                f"{error.get('message', response.reason_phrase)}",
                response.status_code,
                error.get("code", ""),
            )
        return body

    def _need_identity(self) -> Identity:
        if self.identity is None:
            raise ComputeError("this request must be signed: give an identity keystore")
        return self.identity

    def deploy(self, job_file: str | Path) -> str:
        """Deploy a job file; returns the job id."""
        return self.deploy_document(load_job_file(job_file))

    def deploy_document(self, body: bytes) -> str:
        identity = self._need_identity()
        signature = identity.sign(signing.deploy_payload(body))
        reply = self._request(
            "POST",
            "/jobs",
            content=body,
            headers={
                "Content-Type": "application/json",
                "X-DCP-Owner": identity.address,
                "X-DCP-Signature": signature,
            },
        )
        return str(reply["job"])

    def account(self, address: str | None = None) -> dict[str, Any]:
        """Balance of ``address`` (default: this client's identity), in credits."""
        if address is None:
            address = self._need_identity().address
        return dict(self._request("GET", f"/accounts/{address}"))

    def status(self, job: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/jobs/{job}"))

    def cancel(self, job: str) -> int:
        identity = self._need_identity()
        now = int(time.time())
        signature = identity.sign(signing.owner_action_payload("cancel", job, now))
        reply = self._request(
            "POST",
            f"/jobs/{job}/cancel",
            headers={"X-DCP-Signature": signature, "X-DCP-Timestamp": str(now)},
        )
        return int(reply["cancelled_slices"])

    def results(
        self, job: str, wait: bool = False, poll: float = 10.0, timeout: float | None = None
    ) -> Iterator[SliceResult]:
        """Results in slice order. With ``wait``, blocks until every slice is final.

        Args:
            poll: the longest the scheduler holds one request waiting for a result (long poll).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        after = -1
        while True:
            hold = 0.0
            if wait:
                left = poll if deadline is None else deadline - time.monotonic()
                hold = max(0.0, min(poll, left))
            reply = self._request(
                "GET",
                f"/jobs/{job}/results",
                params={"after": after, "limit": 5000, "wait": hold},
                timeout=hold + self._http.timeout.read if self._http.timeout.read else None,
            )
            for s in reply["slices"]:
                data = s.get("result_base64")
                yield SliceResult(
                    s["slice"],
                    s["state"],
                    None if data is None else base64.b64decode(data),
                    s.get("error"),
                )
                after = s["slice"]
            if reply["slices"]:
                continue
            if reply["state"] != "active" or not wait:
                return
            if deadline is not None and time.monotonic() > deadline:
                raise ComputeError(f"job {job} did not finish within {timeout} s")
