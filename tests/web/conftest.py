"""A real headless browser for the web consoles: Debian's chromium, driven by Playwright.

``packaging/system-deps.sh`` (run by ``make test``) installs chromium where apt-get exists and
we are root. Where it cannot be installed the browser tests skip and say why; where it could
have been and is missing they fail.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from ..screenshots import SHOTS as SHOTS  # the tests import it from here


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    if shutil.which("apt-get") and os.geteuid() == 0:
        pytest.fail("chromium is missing (packaging/system-deps.sh installs it)")
    pytest.skip("no chromium here and no way to install it (needs apt-get as root)")


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    executable = _chromium()
    with sync_playwright() as playwright:
        # --no-sandbox: chromium's own sandbox needs user namespaces, which CI as root lacks.
        launched = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(20_000)
    opened = context.new_page()
    yield opened
    context.close()
