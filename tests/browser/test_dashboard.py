"""The dashboard in a real headless Chromium, on example gateways that share a real redis-server.

What a person sees: signing in with the token, a trip made through another gateway appearing
live, every control reaching the whole fleet, a wrong token refused, the stream coming back
after its gateway restarts, 1,000 services staying usable, and no script error anywhere.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from unittest import mock

import port_for
from axe_playwright_python.sync_playwright import Axe
from playwright.sync_api import Locator, Page, expect

from tests.browser.conftest import ADMIN_PATH, TOKEN, Fleet, PageErrors, admin_env
from tests.e2e.conftest import Gateway, StartGateway, Upstream, clean_env, counts
from tests.helpers import wait_until_sync

CONVERGE = 10.0  # seconds for the fleet and the page to follow a change (refresh is 3 s)


def sign_in(page: Page, url: str, token: str = TOKEN) -> None:
    page.goto(url)
    page.get_by_label("Admin token").fill(token)
    page.get_by_role("button", name="Sign in").click()


def card(page: Page, service: str) -> Locator:
    return page.locator(f'#breakers [data-service="{service}"]')


def confirm(
    page: Page, service: str, action: str, *, seconds: float | None = None, reason: str = ""
) -> None:
    """Click a card's control, fill the confirmation dialog, confirm, and wait for the change."""
    card(page, service).locator(f'button[data-action="{action}"]').click()
    dialog = page.locator("dialog#confirm")
    expect(dialog).to_be_visible()
    if seconds is not None:
        dialog.get_by_label("Duration in seconds").fill(str(seconds))
    if reason:
        dialog.get_by_label("Reason").fill(reason)
    dialog.locator("button[data-confirm]").click()
    expect(dialog).to_be_hidden()
    expect(page.locator("#notice")).to_contain_text(f"{service}:")


def wait_state(fleet: Fleet, gateway: Gateway, service: str, state: str) -> dict[str, Any]:
    """Wait until `gateway`'s admin API reports `state` for `service`; returns its view."""
    seen: dict[str, Any] = {}

    def reached() -> bool:
        seen.update(fleet.api(gateway, "GET", f"/breakers/{service}"))
        return seen["state"] == state

    wait_until_sync(reached, CONVERGE, 0.05, f"{gateway.name} to report {service} {state}")
    return seen


def expect_fleet_agrees(page: Page, service: str, instances: int = 2) -> None:
    """The page's fleet table and the card both say every instance holds the stored version."""
    rows = page.locator("#fleet-rows tr")
    expect(rows).to_have_count(instances, timeout=CONVERGE * 1000)
    expect(page.locator('#fleet-rows tr[data-agrees="true"]')).to_have_count(
        instances, timeout=CONVERGE * 1000
    )
    expect(card(page, service).locator(".b-fleet")).to_have_attribute(
        "data-agrees", "true", timeout=CONVERGE * 1000
    )


def assert_accessible(page: Page, where: str) -> None:
    results = Axe().run(page)
    assert results.violations_count == 0, f"axe on {where}:\n{results.generate_report()}"


def test_a_trip_through_b_shows_live_on_a_and_reset_on_a_closes_it_on_b(
    fleet: Fleet, page: Page, page_errors: PageErrors, tmp_path: Path
) -> None:
    sign_in(page, fleet.dashboard(fleet.a))
    discovery = card(page, "discovery")
    expect(discovery).to_have_attribute("data-state", "closed")
    expect(discovery.locator(".badge")).to_have_text("closed")
    expect(page.locator("#conn")).to_have_attribute("data-conn", "live")
    # A page that reloads would lose this mark.
    page.evaluate("window.__notReloaded = true")

    for _ in range(3):
        assert fleet.b.get("/discovery/status/500").status_code == 500
    expect(discovery).to_have_attribute("data-state", "open", timeout=3000)
    expect(discovery.locator(".badge")).to_have_text("open")
    assert page.evaluate("window.__notReloaded") is True
    assert fleet.b.get("/discovery/anything").status_code == 503
    # Non-closed first.
    expect(page.locator("#breakers > li").first).to_have_attribute("data-service", "discovery")
    expect(discovery.locator(".b-last")).to_contain_text("failure_threshold")
    assert_accessible(page, "the dashboard with an open breaker")
    page.screenshot(path=tmp_path / "dashboard-open.png", full_page=True)

    confirm(page, "discovery", "reset")
    wait_state(fleet, fleet.b, "discovery", "closed")
    reached = counts(fleet.upstream)
    assert fleet.b.get("/discovery/status/200").status_code == 200
    assert reached() == 1
    expect(discovery).to_have_attribute("data-state", "closed")
    page_errors.assert_none()


def test_each_control_reaches_the_fleet_and_the_page_follows(
    fleet: Fleet, page: Page, page_errors: PageErrors, tmp_path: Path
) -> None:
    sign_in(page, fleet.dashboard(fleet.a))
    expect(card(page, "sona")).to_have_attribute("data-state", "closed")

    # By keyboard alone: the control opens the dialog, Escape cancels it and changes nothing.
    force = card(page, "sona").locator('button[data-action="force-open"]')
    dialog = page.locator("dialog#confirm")
    force.focus()
    page.keyboard.press("Enter")
    expect(dialog).to_be_visible()
    expect(dialog.get_by_label("Duration in seconds")).to_be_focused()
    assert_accessible(page, "the confirmation dialog")
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    expect(force).to_be_focused()
    assert fleet.state_on(fleet.b, "sona") == "closed"

    # Force open, timed and with a reason, typed in and confirmed with Enter: B rejects
    # without calling the upstream.
    page.keyboard.press("Enter")
    expect(dialog).to_be_visible()
    page.keyboard.type("600")
    page.keyboard.press("Tab")
    expect(dialog.get_by_label("Reason")).to_be_focused()
    page.keyboard.type("upstream migration")
    page.keyboard.press("Enter")
    expect(dialog).to_be_hidden()
    expect(card(page, "sona")).to_have_attribute("data-state", "forced_open")
    view = wait_state(fleet, fleet.b, "sona", "forced_open")
    assert view["manual"]["reason"] == "upstream migration"
    assert view["manual"]["until"] > time.time() + 500
    reached = counts(fleet.upstream)
    assert fleet.b.get("/sona/x").status_code == 503
    assert reached() == 0
    manual = card(page, "sona").locator(".b-manual")
    expect(manual).to_contain_text("forced open")
    expect(manual).to_contain_text("upstream migration")
    expect_fleet_agrees(page, "sona")

    confirm(page, "auth", "metrics-only", reason="watching a new release")
    expect(card(page, "auth")).to_have_attribute("data-state", "metrics_only")
    wait_state(fleet, fleet.b, "auth", "metrics_only")
    expect_fleet_agrees(page, "auth")

    # A trip through B as well, for the screenshot: open, forced open and metrics only at once.
    for _ in range(3):
        fleet.b.get("/discovery/status/500")
    expect(card(page, "discovery")).to_have_attribute("data-state", "open")
    expect_fleet_agrees(page, "discovery")
    # Traffic through A over a few refreshes, so the sparklines of the screenshot have bars.
    for _ in range(4):
        note = page.locator("#refresh-note").inner_text()
        for i in range(12):
            fleet.a.get("/auth/status/200" if i % 4 else "/auth/status/500")
            fleet.a.get("/discovery/anything")
            fleet.a.get("/sona/anything")
        expect(page.locator("#refresh-note")).not_to_have_text(note)
    expect(card(page, "sona").locator(".spark-text")).to_contain_text("rejected")
    expect(card(page, "auth").locator(".f-rate")).to_contain_text("%")
    card(page, "sona").locator("details summary").click()
    expect(card(page, "sona").locator(".history")).to_contain_text("upstream migration")
    assert_accessible(page, "the dashboard with manual modes")
    page.screenshot(path=tmp_path / "dashboard.png", full_page=True)

    # Metrics only never rejects, however many failures.
    statuses = {fleet.b.get("/auth/status/500").status_code for _ in range(6)}
    assert statuses == {500}

    # Disable replaces the forced mode: everything passes, even failures.
    confirm(page, "sona", "disable", reason="let everything through")
    expect(card(page, "sona")).to_have_attribute("data-state", "disabled")
    wait_state(fleet, fleet.b, "sona", "disabled")
    statuses = {fleet.b.get("/sona/status/500").status_code for _ in range(5)}
    assert statuses == {500}
    expect_fleet_agrees(page, "sona")

    # Release: back to the automatic state machine on both.
    confirm(page, "sona", "release")
    view = wait_state(fleet, fleet.b, "sona", "closed")
    assert view["manual"] is None
    expect(card(page, "sona")).to_have_attribute("data-state", "closed")
    expect(card(page, "sona").locator(".b-manual")).to_be_hidden()
    expect_fleet_agrees(page, "sona")

    confirm(page, "auth", "release")
    wait_until_sync(
        lambda: fleet.api(fleet.b, "GET", "/breakers/auth")["manual"] is None,
        CONVERGE,
        0.05,
        "B to lift auth's manual mode",
    )
    automatic = fleet.api(fleet.b, "GET", "/breakers/auth")["state"]
    expect(card(page, "auth")).to_have_attribute("data-state", automatic)

    # Reset closes the open breaker everywhere.
    confirm(page, "discovery", "reset")
    wait_state(fleet, fleet.b, "discovery", "closed")
    expect(card(page, "discovery")).to_have_attribute("data-state", "closed")
    expect_fleet_agrees(page, "discovery")

    # Every action is in the history, with its reason.
    causes = [e["cause"] for e in fleet.api(fleet.b, "GET", "/breakers/sona/history")["history"]]
    assert "manual" in causes
    assert "manual_released" in causes
    page_errors.assert_none()


def test_a_wrong_token_is_refused_and_the_token_stays_out_of_urls(
    start_gateway: StartGateway, page: Page, page_errors: PageErrors
) -> None:
    gateway = start_gateway(env=admin_env())
    url = f"{gateway.url}{ADMIN_PATH}/"
    # The browser logs the refused call itself; that is the only error expected here.
    page_errors.allow(r"401 \(Unauthorized\)")
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))

    sign_in(page, url, "not-the-admin-token-at-all")
    expect(page.locator("#login-error")).to_contain_text("Refused")
    expect(page.locator("#conn")).to_have_attribute("data-conn", "refused")
    expect(page.locator("#dashboard")).to_be_hidden()
    assert page.evaluate("sessionStorage.length") == 0

    sign_in(page, url)
    expect(card(page, "discovery")).to_have_attribute("data-state", "closed")
    expect(page.locator("#conn")).to_have_attribute("data-conn", "live")
    assert page.evaluate("document.cookie") == ""
    assert all(TOKEN not in u and "not-the-admin" not in u for u in [*requests, page.url])

    # The token lives in the page's memory only: no storage an upstream's page could read,
    # and a reload asks for it again.
    assert page.evaluate("sessionStorage.length + localStorage.length") == 0
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_label("Admin token")).to_be_visible()
    sign_in(page, url)
    expect(card(page, "discovery")).to_have_attribute("data-state", "closed")
    page.reload()
    expect(page.get_by_label("Admin token")).to_be_visible()
    expect(page.locator("#dashboard")).to_be_hidden()
    assert_accessible(page, "the sign-in form")
    page_errors.assert_none()


def test_the_stream_comes_back_after_its_gateway_restarts_and_misses_nothing(
    fleet: Fleet, page: Page, page_errors: PageErrors, tmp_path: Path
) -> None:
    sign_in(page, fleet.dashboard(fleet.a))
    expect(page.locator("#conn")).to_have_attribute("data-conn", "live")
    streams: list[str | None] = []
    page.on(
        "request",
        lambda request: (
            streams.append(request.headers.get("last-event-id"))
            if request.url.endswith(f"{ADMIN_PATH}/events")
            else None
        ),
    )
    confirm(page, "auth", "force-open", reason="before the restart")
    expect(card(page, "auth")).to_have_attribute("data-state", "forced_open")

    # A dies; while it is down, discovery trips through B.
    fleet.a.process.kill()
    fleet.a.process.wait()
    expect(page.locator("#conn")).to_have_attribute("data-conn", "disconnected")
    expect(page.locator("#conn")).to_contain_text("reconnecting in")
    for _ in range(3):
        fleet.b.get("/discovery/status/500")
    wait_state(fleet, fleet.b, "discovery", "open")

    # A comes back on the same address: the page reconnects by itself and shows the trip.
    with mock.patch.object(port_for, "select_random", return_value=fleet.a.port):
        restarted = Gateway(
            "gateway1-restarted",
            "examples.gateway:app",
            clean_env(
                {
                    "LOG_LEVEL": "debug",
                    "GATEWAY_BREAKER_CONFIG": str(tmp_path / "gateway1.yaml"),
                    "REDIS_URL": fleet.redis.url,
                    **admin_env(),
                }
            ),
            tmp_path,
        )
    try:
        restarted.wait_ready()
        expect(page.locator("#conn")).to_have_attribute(
            "data-conn", "live", timeout=CONVERGE * 1000 + 15_000
        )
        expect(card(page, "discovery")).to_have_attribute("data-state", "open")
        expect(card(page, "auth")).to_have_attribute("data-state", "forced_open")
        # Every reconnection asked for what came after the last event the page had.
        assert streams, "the page never reconnected"
        assert all(last is not None for last in streams)
        # Console errors of the failed reconnection attempts are the browser's, not the page's.
        page_errors.allow(r"Failed to load resource: net::ERR_")
        page_errors.assert_none()
    finally:
        page.close()
        restarted.stop()


def test_a_thousand_services_stay_usable(
    start_gateway: StartGateway,
    upstream: Upstream,
    page: Page,
    page_errors: PageErrors,
    tmp_path: Path,
) -> None:
    services = {
        f"svc-{i:04d}": {
            "upstream": f"{upstream.url}/svc-{i:04d}",
            "failure_threshold": 3,
            "timeout_seconds": 60,
        }
        for i in range(1000)
    }
    gateway = start_gateway(
        {"circuit_breaker": {"enabled": True, "services": services}}, env=admin_env()
    )
    page.goto(f"{gateway.url}{ADMIN_PATH}/")
    # Main-thread tasks longer than 50 ms, from here on: a frozen page shows up as a long one.
    page.evaluate(
        """() => {
            window.__longTasks = [];
            new PerformanceObserver((list) => {
                for (const entry of list.getEntries()) window.__longTasks.push(entry.duration);
            }).observe({ type: "longtask" });
        }"""
    )
    page.get_by_label("Admin token").fill(TOKEN)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#breakers > li")).to_have_count(1000)
    expect(page.locator("#shown-count")).to_have_text("1000 of 1000 shown")

    for _ in range(3):
        gateway.get("/svc-0777/status/500")
    first = page.locator("#breakers > li").first
    expect(first).to_have_attribute("data-service", "svc-0777")
    expect(first).to_have_attribute("data-state", "open")

    page.get_by_label("Filter").fill("svc-09")
    expect(page.locator("#breakers > li:visible")).to_have_count(100)
    expect(page.locator("#shown-count")).to_have_text("100 of 1000 shown")
    page.get_by_label("Filter").fill("")
    page.get_by_label("Only not closed").check()
    expect(page.locator("#breakers > li:visible")).to_have_count(1)

    # The controls answer while 1,000 cards refresh.
    confirm(page, "svc-0777", "reset")
    expect(card(page, "svc-0777")).to_have_attribute("data-state", "closed")
    expect(page.locator("#breakers > li:visible")).to_have_count(0)
    page.get_by_label("Only not closed").uncheck()
    expect(page.locator("#breakers > li:visible")).to_have_count(1000)
    # Let a few refreshes of all 1,000 cards run, then look at the longest task.
    refreshed = page.locator("#refresh-note").inner_text()
    for _ in range(2):
        expect(page.locator("#refresh-note")).not_to_have_text(refreshed, timeout=CONVERGE * 1000)
        refreshed = page.locator("#refresh-note").inner_text()
    longest = max(page.evaluate("window.__longTasks"), default=0.0)
    tasks = page.evaluate("window.__longTasks")
    (tmp_path / "long-tasks.txt").write_text(
        f"longest main-thread task: {longest:.0f} ms\n{tasks}\n"
    )
    # Generous on purpose (machines under load are slow); a freeze is many seconds.
    assert longest < 5000, f"the page froze for {longest:.0f} ms"
    page_errors.assert_none()


def test_a_brownout_shows_health_and_the_share_shed(
    fleet: Fleet, page: Page, page_errors: PageErrors
) -> None:
    sign_in(page, fleet.dashboard(fleet.a))
    health = card(page, "discovery").locator(".f-health")
    expect(health).to_have_text("1.00")
    policy = {"mode": "adaptive", "min_calls": 20, "failure_threshold": 1000, "window_seconds": 30}
    fleet.api(fleet.a, "PATCH", "/breakers/discovery/policy", json=policy)
    wait_until_sync(  # a live policy change switches the mode fleet-wide
        lambda: fleet.api(fleet.b, "GET", "/breakers/discovery")["policy"]["mode"] == "adaptive",
        CONVERGE,
        0.05,
        "b to run discovery in mode adaptive",
    )
    for _ in range(60):  # half of what each gateway lets through fails
        for gateway in (fleet.a, fleet.b):
            assert gateway.get("/discovery/flaky?rate=0.5").status_code in (200, 500, 503)
    expect(health).to_contain_text("shedding", timeout=CONVERGE * 1000)
    expect(health).to_have_attribute("data-low", "true")
    view = fleet.api(fleet.a, "GET", "/breakers/discovery")
    assert view["health"] < 0.8
    assert view["rejection_probability"] > 0.2
    assert view["state"] == "closed"
    page_errors.assert_none()
