"""Who may act on a job and read it: signed, fresh, nonce'd owner requests and read tokens,
end to end against a real scheduler process (issue 14 items 3 and 4)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from scheduler.client import ComputeClient, ComputeError
from scheduler.store.sqlite import SQLiteStore

from .conftest import Keystore, SchedulerProcess, WorkerProcess, command, wait_for
from .test_pipeline import ECHO, job_file
from .test_policy import admin, create_group


def _capture(client: ComputeClient) -> list[httpx.Request]:
    """Every request the real client sends, as it went on the wire (method, URL, headers,
    body): what an eavesdropper on an unencrypted link, or a logging proxy, keeps."""
    seen: list[httpx.Request] = []
    client._http.event_hooks["request"].append(seen.append)
    return seen


def _replay(request: httpx.Request) -> httpx.Response:
    with httpx.Client(timeout=30) as http:
        return http.send(
            http.build_request(
                request.method, request.url, headers=request.headers, content=request.content
            )
        )


def _code(response: httpx.Response) -> str:
    return str(response.json()["error"]["code"])


def _balance(client: ComputeClient) -> float:
    return float(client.account()["balance"])


def test_a_replayed_deploy_is_refused_and_charges_nothing(
    tmp_path: Path, scheduler: SchedulerProcess, make_keystore: Callable[[str], Keystore]
) -> None:
    owner = make_keystore("owner")
    admin(scheduler.db, "bank", "mint", owner.identity.address, "10")
    with ComputeClient(scheduler.url, owner.identity) as client:
        sent = _capture(client)
        job = client.deploy(job_file(tmp_path, "paid", ECHO, ["a"], offer=5))
        (deploy,) = [r for r in sent if r.method == "POST"]
        assert _balance(client) == pytest.approx(5)
        # The same bytes again, at once: the nonce was spent.
        again = _replay(deploy)
        assert (again.status_code, _code(again)) == (409, "replayed_request")
        assert _balance(client) == pytest.approx(5)
        # The job is removed (its escrow refunded); the nonce outlives it.
        admin(scheduler.db, "jobs", "remove", job)
        assert _balance(client) == pytest.approx(10)
        later = _replay(deploy)
        assert (later.status_code, _code(later)) == (409, "replayed_request")
        assert _balance(client) == pytest.approx(10)
    store = SQLiteStore(scheduler.db)
    try:
        assert store.list_jobs() == []  # no second job was made
    finally:
        store.close()


def test_replayed_cancel_and_reads_are_refused(
    tmp_path: Path, scheduler: SchedulerProcess, make_keystore: Callable[[str], Keystore]
) -> None:
    owner = make_keystore("owner")
    with ComputeClient(scheduler.url, owner.identity) as client:
        job = client.deploy(job_file(tmp_path, "echo", ECHO, ["a"]))
        sent = _capture(client)
        assert client.status(job)["state"] == "active"
        assert client.cancel(job) == 1
        read, cancel = sent[-2:]
    for request in (read, cancel):
        response = _replay(request)
        assert (response.status_code, _code(response)) == (409, "replayed_request")
    # A signature over one request does not cover another: the read's headers on the
    # results path (another path) or another job's path are refused.
    forged = httpx.get(scheduler.url + f"/api/v1/jobs/{job}/results", headers=read.headers)
    assert (forged.status_code, _code(forged)) == (401, "bad_signature")


@pytest.mark.parametrize("skew", [-400.0, 400.0])
def test_a_request_outside_the_window_is_stale(
    tmp_path: Path,
    scheduler: SchedulerProcess,
    make_keystore: Callable[[str], Keystore],
    skew: float,
) -> None:
    """The client signs with a clock ``skew`` seconds off the scheduler's (300 s window)."""
    owner = make_keystore("owner")
    admin(scheduler.db, "bank", "mint", owner.identity.address, "10")
    with ComputeClient(scheduler.url, owner.identity) as client:
        job = client.deploy(job_file(tmp_path, "echo", ECHO, ["a"]))
    with ComputeClient(scheduler.url, owner.identity, clock=lambda: time.time() + skew) as off:
        for call in (
            lambda: off.deploy(job_file(tmp_path, "paid", ECHO, ["a"], offer=5)),
            lambda: off.status(job),
            lambda: list(off.results(job)),
            lambda: off.cancel(job),
            lambda: off.issue_token(job),
        ):
            with pytest.raises(ComputeError) as info:
                call()
            assert (info.value.status, info.value.code) == (401, "stale_request")
    with ComputeClient(scheduler.url, owner.identity, clock=lambda: time.time() - 200) as near:
        assert near.status(job)["state"] == "active"  # inside the window
        assert _balance(near) == pytest.approx(10)


def _read_all(client: ComputeClient, job: str) -> tuple[dict[str, object], list[bytes | None]]:
    return client.status(job), [r.result for r in client.results(job)]


def test_private_jobs_are_readable_by_their_owner_and_token_holders_only(
    tmp_path: Path,
    scheduler: SchedulerProcess,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
) -> None:
    key, secret = create_group(scheduler.db, "secret-lab")
    owner, stranger = make_keystore("owner"), make_keystore("stranger")
    member = workers(scheduler.url, make_keystore("member"), 1, "--join", f"{key},{secret}")
    wait_for(lambda: "connected to" in member.output())
    with ComputeClient(scheduler.url, owner.identity) as client:
        private = client.deploy(
            job_file(tmp_path, "private", ECHO, ["patient record 1234"], extra=f'group = "{key}"')
        )
        public = client.deploy(job_file(tmp_path, "public", ECHO, ["x"]))
        (result,) = client.results(private, wait=True, timeout=60)
        assert result.result == b"patient record 1234"
        list(client.results(public, wait=True, timeout=60))
        status, results = _read_all(client, private)
        assert status["owner"] == owner.identity.address and results == [b"patient record 1234"]

    base = scheduler.url + "/api/v1"
    for path in (f"/jobs/{private}", f"/jobs/{private}/results", f"/jobs/{public}"):
        response = httpx.get(base + path, timeout=30)
        assert (response.status_code, _code(response)) == (401, "unauthenticated"), path
        assert "patient" not in response.text and owner.identity.address not in response.text
    listing = httpx.get(base + "/jobs", timeout=30)
    assert listing.status_code == 200
    assert private not in listing.text and public not in listing.text
    assert owner.identity.address.lower() not in listing.text.lower()
    assert "patient" not in listing.text and key not in listing.text

    with ComputeClient(scheduler.url, owner.identity) as client:
        # The owner's signed listing shows the owner's jobs, in full.
        assert {j["job"] for j in client.jobs()} == {private, public}
    with ComputeClient(scheduler.url, stranger.identity) as other:
        for call in (lambda: other.status(private), lambda: list(other.results(private))):
            with pytest.raises(ComputeError) as info:
                call()
            assert (info.value.status, info.value.code) == (403, "not_owner")
        with pytest.raises(ComputeError) as info:
            other.issue_token(private)
        assert (info.value.status, info.value.code) == (403, "not_owner")
        assert other.jobs() == []

    with ComputeClient(scheduler.url, owner.identity) as client:
        token = client.issue_token(private)
        public_token = client.issue_token(public)
    with ComputeClient(scheduler.url, token=token.token) as reader:
        status, results = _read_all(reader, private)
        assert status["job"] == private and results == [b"patient record 1234"]
        with pytest.raises(ComputeError) as info:
            reader.status(public)
        assert (info.value.status, info.value.code) == (403, "read_token_wrong_job")
    # A read token reads; it does not act.
    bearer = {"Authorization": f"Bearer {token.token}"}
    for method, path in (("POST", "/cancel"), ("POST", "/tokens")):
        acted = httpx.request(method, f"{base}/jobs/{private}{path}", headers=bearer, timeout=30)
        assert (acted.status_code, _code(acted)) == (401, "unauthenticated")
    with ComputeClient(scheduler.url, token=public_token.token) as reader:
        with pytest.raises(ComputeError) as info:
            reader.status(private)
        assert (info.value.status, info.value.code) == (403, "read_token_wrong_job")
    with ComputeClient(scheduler.url, token=token.token[:-2] + "xx") as reader:
        with pytest.raises(ComputeError) as info:
            reader.status(private)
        assert (info.value.status, info.value.code) == (401, "read_token_invalid")

    with ComputeClient(scheduler.url, stranger.identity) as other:
        with pytest.raises(ComputeError) as info:
            other.revoke_token(private, token.token_id)
        assert (info.value.status, info.value.code) == (403, "not_owner")
    with ComputeClient(scheduler.url, owner.identity) as client:
        client.revoke_token(private, token.token_id)
        short = client.issue_token(private, ttl=1)
    with ComputeClient(scheduler.url, token=token.token) as reader:
        with pytest.raises(ComputeError) as info:
            reader.status(private)
        assert (info.value.status, info.value.code) == (401, "read_token_revoked")

    def expired() -> bool:
        with ComputeClient(scheduler.url, token=short.token) as reader:
            try:
                reader.status(private)
            except ComputeError as exc:
                assert (exc.status, exc.code) == (401, "read_token_expired")
                return True
            return False

    wait_for(expired, timeout=30, interval=0.2)


def test_compute_cli_reads_with_an_identity_or_a_token(
    tmp_path: Path, scheduler: SchedulerProcess, make_keystore: Callable[[str], Keystore]
) -> None:
    owner = make_keystore("owner")
    with ComputeClient(scheduler.url, owner.identity) as client:
        job = client.deploy(job_file(tmp_path, "echo", ECHO, ["a"]))
    signed = ["--identity", str(owner.path), "--passphrase-file", str(owner.passphrase_file)]

    def compute(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [command("dcp-compute"), "--scheduler", scheduler.url, *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    anonymous = compute("status", job)
    assert anonymous.returncode == 1 and "unauthenticated" in anonymous.stderr
    assert json.loads(compute("status", job, *signed).stdout)["job"] == job
    issued = compute("token", job, *signed)
    assert issued.returncode == 0, issued.stderr
    token = issued.stdout.strip()
    token_id = issued.stderr.split("token id ")[1].split()[0]
    shown = compute("status", job, "--token", token)
    assert shown.returncode == 0 and json.loads(shown.stdout)["job"] == job
    results = compute("results", job, "--token", token)
    assert (results.returncode, results.stdout) == (0, "")  # no slice is final yet
    assert compute("revoke-token", job, token_id, *signed).returncode == 0
    refused = compute("results", job, "--token", token)
    assert refused.returncode == 1 and "read_token_revoked" in refused.stderr
