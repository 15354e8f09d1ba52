"""Fixtures for the dashboard's browser tests: Debian's headless Chromium driven by Playwright.

The browser is `/usr/bin/chromium` (installed by `.ci/run`), never a Playwright download. Each
test gets a fresh user-data directory under its tmp_path, and a page that records every script
error and console error, so a test can assert that the dashboard raised none.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import (
    BrowserContext,
    ConsoleMessage,
    Page,
    Playwright,
    expect,
    sync_playwright,
)

from tests.conftest import RedisServer
from tests.e2e.conftest import (  # noqa: F401  (fixtures used by the browser tests)
    Gateway,
    StartGateway,
    Upstream,
    make_config,
    start_gateway,
    upstream,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "browser-test-admin-token-0123456789"
ADMIN_PATH = "/_breakers"
# Assertions on the page wait this long by default: generous for a loaded machine.
expect.set_options(timeout=10_000)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).parent == Path(__file__).parent:
            item.add_marker(pytest.mark.browser)
            item.add_marker(pytest.mark.e2e)


@dataclass
class PageErrors:
    """Script errors (`pageerror`) and console errors a page raised, minus the expected ones."""

    seen: list[str] = field(default_factory=list)
    allowed: list[re.Pattern[str]] = field(default_factory=list)

    def allow(self, pattern: str) -> None:
        """Console errors matching `pattern` are expected (say, the 401 of a wrong token)."""
        self.allowed.append(re.compile(pattern))

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.seen.append(f"console error: {message.text} ({message.location})")

    def on_page_error(self, error: Exception) -> None:
        self.seen.append(f"script error: {error}")

    def unexpected(self) -> list[str]:
        return [e for e in self.seen if not any(p.search(e) for p in self.allowed)]

    def assert_none(self) -> None:
        errors = self.unexpected()
        assert not errors, "the page raised errors:\n" + "\n".join(errors)


@pytest.fixture(scope="module")
def playwright_driver() -> Iterator[Playwright]:
    # Module scope, not session: Playwright's sync API keeps an event loop running on this
    # thread while it lives, and the asyncio tests of other modules must not find one.
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)")
    with sync_playwright() as driver:
        yield driver


@pytest.fixture
def browser(playwright_driver: Playwright, tmp_path: Path) -> Iterator[BrowserContext]:
    """Headless Debian Chromium with a fresh profile in the test's tmp_path."""
    context = playwright_driver.chromium.launch_persistent_context(
        tmp_path / "chromium-profile",
        executable_path=str(CHROMIUM),
        headless=True,
        args=CHROMIUM_ARGS,
        viewport={"width": 1280, "height": 860},
    )
    context.set_default_timeout(15_000)
    try:
        yield context
    finally:
        context.close()


@pytest.fixture
def page_errors() -> PageErrors:
    return PageErrors()


@pytest.fixture
def page(browser: BrowserContext, page_errors: PageErrors) -> Page:
    """A page whose script and console errors land in `page_errors`."""
    page = browser.pages[0] if browser.pages else browser.new_page()
    page.on("console", page_errors.on_console)
    page.on("pageerror", page_errors.on_page_error)
    return page


@dataclass
class Fleet:
    """Two example gateways sharing one redis-server, each serving the admin API and page."""

    a: Gateway
    b: Gateway
    redis: RedisServer
    upstream: Upstream

    def dashboard(self, gateway: Gateway) -> str:
        return f"{gateway.url}{ADMIN_PATH}/"

    def api(self, gateway: Gateway, method: str, path: str, **kwargs: Any) -> Any:
        """An admin API call with the token; returns the decoded JSON body."""
        response = gateway.request(
            method,
            f"{ADMIN_PATH}{path}",
            headers={"Authorization": f"Bearer {TOKEN}"},
            **kwargs,
        )
        assert response.status_code < 400, (method, path, response.status_code, response.text)
        return response.json()

    def state_on(self, gateway: Gateway, service: str) -> str:
        state = self.api(gateway, "GET", f"/breakers/{service}")["state"]
        assert isinstance(state, str)
        return state


def admin_env(extra: Mapping[str, str | None] | None = None) -> dict[str, str | None]:
    return {"GATEWAY_BREAKER_ADMIN_TOKEN": TOKEN, **(extra or {})}


@pytest.fixture
def fleet(
    start_gateway: StartGateway,  # noqa: F811
    redis_server: RedisServer,
    upstream: Upstream,  # noqa: F811
) -> Fleet:
    """Gateways A and B on one redis-server. discovery opens after 3 failures and stays open
    for 60 s unless someone acts, so what the page shows is what the test did."""
    config = make_config(upstream.url, timeout_seconds=60)
    a = start_gateway(config, redis_url=redis_server.url, env=admin_env())
    b = start_gateway(config, redis_url=redis_server.url, env=admin_env())
    return Fleet(a=a, b=b, redis=redis_server, upstream=upstream)
