"""The scheduler's web console (issue 16) in a real headless chromium against a real
scheduler process and a real worker: pages load, the numbers shown are the compute API's,
sign-in with a read token shows a private job and sign-out hides it, anonymous visitors and
other sites get nothing private, operator pages need the operator token."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect

from scheduler.client import ComputeClient
from scheduler.store.sqlite import SQLiteStore
from scheduler.web import operator_token_path
from scheduler.web.views import PAGE_SLICES

from ..conftest import Keystore, SchedulerProcess, WorkerProcess, wait_for
from ..test_pipeline import ECHO, job_file
from ..test_policy import admin, create_group
from .conftest import SHOTS

pytestmark = pytest.mark.timeout(240)

STATES = ("queued", "leased", "done", "failed", "cancelled")
SECRET = "patient record 1234"


def _deploy(tmp_path: Path, scheduler: SchedulerProcess, owner: Keystore) -> tuple[str, str, str]:
    """A public job (three slices, paid) and a private one (a group no worker joined);
    returns their ids and the group's join key."""
    key, _ = create_group(scheduler.db, "secret-lab")
    admin(scheduler.db, "bank", "mint", owner.identity.address, "10")
    with ComputeClient(scheduler.url, owner.identity) as client:
        public = client.deploy(job_file(tmp_path, "public-echo", ECHO, ["a", "bb", "ccc"], offer=1))
        private = client.deploy(
            job_file(tmp_path, "private-echo", ECHO, [SECRET], extra=f'group = "{key}"')
        )
    return public, private, key


def _counts(page: Page, scope: str = "") -> dict[str, int]:
    return {s: int(page.locator(f'{scope} [data-count="{s}"]').inner_text()) for s in STATES}


def _shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"scheduler-console-{name}.png"), full_page=True)


def _sign_in(page: Page, url: str, token: str) -> None:
    page.goto(url + "/console/sign-in")
    page.fill("#token", token)
    page.click("#sign-in")
    page.wait_for_load_state()


def test_anonymous_visitors_see_the_public_market_and_nothing_private(
    tmp_path: Path,
    scheduler: SchedulerProcess,
    make_keystore: Callable[[str], Keystore],
    page: Page,
) -> None:
    owner = make_keystore("owner")
    public, private, key = _deploy(tmp_path, scheduler, owner)
    api = httpx.get(scheduler.url + "/api/v1/jobs", timeout=30).json()["jobs"]
    assert len(api) == 1  # the API lists the public job only, anonymously

    response = page.goto(scheduler.url + "/")
    assert response is not None and response.status == 200
    assert page.url == scheduler.url + "/console/"
    rows = page.locator("#market tbody tr")
    assert rows.count() == len(api) == 1
    assert int(rows.locator('[data-field="slices"]').inner_text()) == api[0]["slices"] == 3
    assert int(rows.locator('[data-field="queued"]').inner_text()) == api[0]["queued"] == 3
    assert page.locator("#jobs").count() == 0  # no job of anyone's, by name or id
    html = page.content()
    for secret in (public, private, key, SECRET, "private-echo", "public-echo"):
        assert secret not in html
    assert owner.identity.address.lower() not in html.lower()
    _shot(page, "anonymous")

    # A job page, its refreshing numbers and the operator pages refuse, naming why.
    for path, status, code in [
        (f"/console/jobs/{private}", 401, "unauthenticated"),
        (f"/console/jobs/{public}", 401, "unauthenticated"),
        ("/console/workers", 401, "operator_token_needed"),
        ("/console/ledger", 401, "operator_token_needed"),
    ]:
        response = page.goto(scheduler.url + path)
        assert response is not None and response.status == status, path
        assert page.locator("#refusal code").inner_text() == code
        assert SECRET not in page.content() and "private-echo" not in page.content()
    counts = httpx.get(f"{scheduler.url}/console/jobs/{private}/counts.json", timeout=30)
    assert (counts.status_code, counts.json()["error"]["code"]) == (401, "unauthenticated")

    # A pasted token that is not one, or an unknown one, is refused by name.
    _sign_in(page, scheduler.url, "hunter2")
    assert page.locator("#problem code").inner_text() == "not_a_token"
    _sign_in(page, scheduler.url, "dcp-rt-" + "x" * 43)
    assert page.locator("#problem code").inner_text() == "read_token_invalid"
    _sign_in(page, scheduler.url, "dcp-op-" + "x" * 43)
    assert page.locator("#problem code").inner_text() == "operator_token_invalid"
    assert page.context.cookies() == []


def test_posts_from_another_origin_are_refused(
    tmp_path: Path, scheduler: SchedulerProcess, make_keystore: Callable[[str], Keystore]
) -> None:
    owner = make_keystore("owner")
    _, private, _ = _deploy(tmp_path, scheduler, owner)
    with ComputeClient(scheduler.url, owner.identity) as client:
        token = client.issue_token(private).token
    host = scheduler.url.split("://", 1)[1]
    for origin in (
        {"Origin": "http://evil.example"},
        {"Origin": f"http://{host}.evil.example"},
        {"Origin": "null"},
        {},
    ):
        response = httpx.post(
            scheduler.url + "/console/sign-in", data={"token": token}, headers=origin, timeout=30
        )
        assert response.status_code == 403
        assert "cross_origin_post" in response.text
        assert "set-cookie" not in response.headers
    # From the console's own origin the same post signs in: the cookie is HttpOnly, Strict.
    response = httpx.post(
        scheduler.url + "/console/sign-in",
        data={"token": token},
        headers={"Origin": scheduler.url},
        timeout=30,
    )
    assert response.status_code == 303
    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/console" in cookie
    assert "Secure" not in cookie  # plain http on loopback: a Secure cookie would not return


def test_owners_and_the_operator_see_what_the_api_says(
    tmp_path: Path,
    scheduler: SchedulerProcess,
    make_keystore: Callable[[str], Keystore],
    workers: Callable[..., WorkerProcess],
    page: Page,
) -> None:
    owner, worker_key = make_keystore("owner"), make_keystore("worker")
    worker = workers(scheduler.url, worker_key, 1)
    wait_for(lambda: "connected to" in worker.output())
    public, private, _ = _deploy(tmp_path, scheduler, owner)
    with ComputeClient(scheduler.url, owner.identity) as client:
        list(client.results(public, wait=True, timeout=60))
        private_token = client.issue_token(private)
        public_token = client.issue_token(public).token
        api_public, api_private = client.status(public), client.status(private)
        api_results = [r.result for r in client.results(public)]
    assert api_public["counts"].get("done") == 3 and api_private["counts"].get("queued") == 1

    # Script errors and Content-Security-Policy violations (a refused page's status is
    # checked where it is asked for; chromium also asks for /favicon.ico).
    problems: list[str] = []
    page.on(
        "console",
        lambda m: (
            problems.append(m.text)
            if m.type == "error" and not m.text.startswith("Failed to load resource")
            else None
        ),
    )
    page.on("pageerror", lambda e: problems.append(str(e)))

    # Signed in with the private job's read token: its page, its numbers, nothing else.
    _sign_in(page, scheduler.url, private_token.token)
    assert page.url == f"{scheduler.url}/console/jobs/{private}"
    assert _counts(page, "#job") == {s: api_private["counts"].get(s, 0) for s in STATES}
    assert page.locator("#slice-total").inner_text() == str(api_private["slices"])
    assert page.locator("#slices tbody tr").count() == 1
    # The page's script follows the job: cancelled through the API, the page says so.
    with ComputeClient(scheduler.url, owner.identity) as client:
        assert client.cancel(private) == 1
        api_private = client.status(private)
    expect(page.locator("#job-state")).to_have_text("cancelled", timeout=20_000)
    assert _counts(page, "#job") == {s: api_private["counts"].get(s, 0) for s in STATES}
    assert api_private["counts"].get("cancelled") == 1
    page.goto(scheduler.url + "/console/")
    assert [r.get_attribute("data-job") for r in page.locator("#jobs tbody tr").all()] == [private]
    assert page.locator("#market tbody tr").count() == 0  # the public job is done: off the market
    response = page.goto(f"{scheduler.url}/console/jobs/{public}")
    assert response is not None and response.status == 403
    assert page.locator("#refusal code").inner_text() == "read_token_wrong_job"
    response = page.goto(scheduler.url + "/console/workers")
    assert response is not None and response.status == 403
    assert page.locator("#refusal code").inner_text() == "operator_token_needed"
    _shot(page, "refused")

    # A second token adds the public job: its results are the API's.
    _sign_in(page, scheduler.url, public_token)
    assert page.url == f"{scheduler.url}/console/jobs/{public}"
    assert _counts(page, "#job") == {s: api_public["counts"].get(s, 0) for s in STATES}
    shown = [c.inner_text() for c in page.locator("#slices td.result code").all()]
    assert shown == [r.decode() for r in api_results if r is not None] == ["a", "bb", "ccc"]
    _shot(page, "job")
    page.goto(scheduler.url + "/console/")
    listed = {r.get_attribute("data-job") for r in page.locator("#jobs tbody tr").all()}
    assert listed == {public, private}
    totals = {s: api_public["counts"].get(s, 0) + api_private["counts"].get(s, 0) for s in STATES}
    assert _counts(page, ".summary") == totals
    status = httpx.get(scheduler.url + "/api/v1/status", timeout=30).json()
    assert int(page.locator("#connected").inner_text()) == status["sessions"] == 1
    _shot(page, "owner")

    # Revoking a token takes its job away at the next page.
    with ComputeClient(scheduler.url, owner.identity) as client:
        client.revoke_token(private, private_token.token_id)
    page.reload()
    listed = {r.get_attribute("data-job") for r in page.locator("#jobs tbody tr").all()}
    assert listed == {public}

    # Sign-out forgets every token: the job pages refuse again.
    page.click("#sign-out")
    page.wait_for_url(scheduler.url + "/console/")
    assert page.locator("#jobs").count() == 0 and public not in page.content()
    response = page.goto(f"{scheduler.url}/console/jobs/{public}")
    assert response is not None and response.status == 401

    # The operator: the token in the file beside the database, which is the owner's only.
    token_file = operator_token_path(scheduler.db)
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert token_file.read_text().strip() not in scheduler.log.read_text()  # never logged
    _sign_in(page, scheduler.url, token_file.read_text().strip())
    assert page.url == scheduler.url + "/console/workers"
    store = SQLiteStore(scheduler.db)
    try:
        (known,) = store.workers()
        ledger = store.ledger()
    finally:
        store.close()
    address = worker_key.identity.address  # EIP-55, as every page shows addresses
    assert known.address.lower() == address.lower()
    row = page.locator(f'#workers tr[data-worker="{address}"]')
    assert row.count() == 1 and row.locator(".state").inner_text() == "connected"
    assert int(row.locator('[data-field="accepted"]').inner_text()) == known.accepted == 3
    assert int(row.locator('[data-field="refused"]').inner_text()) == known.refused
    _shot(page, "workers")
    page.goto(scheduler.url + "/console/ledger")
    assert page.locator("#ledger tbody tr").count() == len(ledger) > 0
    _shot(page, "ledger")
    page.goto(scheduler.url + "/console/")
    listed = {r.get_attribute("data-job") for r in page.locator("#jobs tbody tr").all()}
    assert listed == {public, private}  # the operator reads every job
    assert problems == []


def test_a_jobs_slices_come_a_page_at_a_time(
    tmp_path: Path,
    scheduler: SchedulerProcess,
    make_keystore: Callable[[str], Keystore],
    page: Page,
) -> None:
    owner = make_keystore("owner")
    values = [f"v{i}" for i in range(PAGE_SLICES + 10)]
    with ComputeClient(scheduler.url, owner.identity) as client:
        job = client.deploy(job_file(tmp_path, "many", ECHO, values))
        token = client.issue_token(job).token
        api = client.status(job)
    _sign_in(page, scheduler.url, token)
    assert page.url == f"{scheduler.url}/console/jobs/{job}"
    assert _counts(page, "#job")["queued"] == api["counts"]["queued"] == len(values)
    rows = page.locator("#slices tbody tr")
    assert [r.get_attribute("data-slice") for r in rows.all()] == [
        str(i) for i in range(PAGE_SLICES)
    ]
    page.click("#next-page")
    page.wait_for_url(f"{scheduler.url}/console/jobs/{job}?after={PAGE_SLICES - 1}")
    assert [r.get_attribute("data-slice") for r in rows.all()] == [
        str(i) for i in range(PAGE_SLICES, len(values))
    ]
    assert page.locator("#next-page").count() == 0
