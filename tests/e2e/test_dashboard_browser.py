"""The dashboard in a real browser: Debian's headless Chromium driven by Selenium (through
Debian's chromedriver; nothing is downloaded) against a real broker process and guests that
put pages through ``TmemClient``.

It checks what an operator relies on: a wrong token shows nothing but the sign-in form; the
figures shown equal ``GET /v1/stats`` within one update and follow the guests' puts; a click
on a guest shows its pools; the table sorts; a token in the URL fragment signs in and leaves
the address bar; the page reconnects by itself after a broker restart; the token never
reaches the broker's log. It saves a screenshot under the test's ``tmp_path`` (and to
``docs/img/dashboard.png`` when ``TMEM_UPDATE_DOCS_IMG=1``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from guest_agent import TmemClient
from tests.e2e.brokerproc import ADMIN, BrokerProcess

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
DOCS_IMG = Path(__file__).resolve().parents[2] / "docs" / "img" / "dashboard.png"

pytestmark = [
    pytest.mark.slow,  # about 20 s: a broker, its restart and a browser
    pytest.mark.timeout(240),
    pytest.mark.skipif(
        not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
        reason="needs Debian's chromium and chromium-driver (make system-deps)",
    ),
]

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

UPDATE_S = 1.0  # the dashboard's update interval (broker.api.dashboard.INTERVAL_S)


def page(seed: int) -> bytes:
    return (seed + 1).to_bytes(8, "big") * 512  # never all zero


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    with BrokerProcess(tmp_path / "data", durability="none", capacity="8MiB") as b:
        yield b


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1600,1250",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: WebDriver, check: Callable[[], Any], timeout: float, what: str) -> Any:
    """``check()``'s first truthy answer within ``timeout`` seconds; fails naming ``what``.

    The page replaces its tables and its notices feed at every update, so an element found
    by one WebDriver call may be gone at the next: a probe that meets such a stale element
    is simply tried again."""
    last: list[Any] = []

    def probe(_: WebDriver) -> Any:
        answer = check()
        last[:] = [answer]
        return answer

    try:
        return WebDriverWait(
            driver,
            timeout,
            poll_frequency=0.1,
            ignored_exceptions=(StaleElementReferenceException,),
        ).until(probe)
    except Exception as exc:  # selenium's TimeoutException: say what was awaited
        raise AssertionError(f"{what} within {timeout} s (last answer: {last})") from exc


def feed(driver: WebDriver) -> list[str]:
    """The notices feed's types, newest first, read in one script (the feed is rebuilt at
    every update, so reading it element by element can race with the page)."""
    types: list[str] = driver.execute_script(
        """return [...document.querySelectorAll("#notices li.notice b")].map((b) => b.textContent);"""
    )
    return types


def shown(driver: WebDriver) -> dict[str, Any]:
    """What the page shows: its figures and its guest rows, as ``(data-stat, data-value)``."""
    result: dict[str, Any] = driver.execute_script(
        """
        const board = document.getElementById("board");
        const figures = [...document.querySelectorAll(
            "#board .cards [data-stat], #shared-table [data-stat], #brokers-table [data-stat]")]
          .map((el) => [el.dataset.stat, el.dataset.value === undefined ? null : el.dataset.value]);
        const guests = [...document.querySelectorAll("#guests tbody tr[data-guest-id]")].map((tr) => [
          tr.dataset.guestId,
          [...tr.querySelectorAll("[data-stat]")].map((td) => [td.dataset.stat, td.dataset.value]),
        ]);
        return {visible: !board.hidden, figures: figures, guests: guests};
        """
    )
    return result


def lookup(stats: Any, path: str) -> Any:
    for part in path.split("."):
        stats = stats[int(part)] if isinstance(stats, list) else stats[part]
    return stats


def same(value: str | None, expected: Any) -> bool:
    """Whether a ``data-value`` is the exact value of a stats field."""
    if value is None:
        return False
    if isinstance(expected, str):
        return value == expected
    if expected is None:
        return value == ""
    try:
        return bool(json.loads(value) == expected)
    except ValueError:
        return False


def mismatches(view: dict[str, Any], stats: dict[str, Any]) -> list[str]:
    """Every figure shown whose value is not the one in ``stats`` (empty when all agree)."""
    bad = [
        f"{stat}: shown {value!r}, /v1/stats {lookup(stats, stat)!r}"
        for stat, value in view["figures"]
        if not same(value, lookup(stats, stat))
    ]
    by_id = {str(g["guest_id"]): g for g in stats["guests"]}
    if sorted(by_id) != sorted(gid for gid, _ in view["guests"]):
        bad.append(f"guest rows {[g for g, _ in view['guests']]} != {sorted(by_id)}")
        return bad
    for gid, cells in view["guests"]:
        bad += [
            f"guest {gid} {stat}: shown {value!r}, /v1/stats {by_id[gid][stat]!r}"
            for stat, value in cells
            if not same(value, by_id[gid][stat])
        ]
    return bad


def agrees_with_stats(driver: WebDriver, broker: BrokerProcess) -> Callable[[], Any]:
    """A probe: the page's figures equal ``/v1/stats`` read just before or just after them
    (the stats move only when the guests act, and they do not while this is awaited)."""

    def check() -> Any:
        view = shown(driver)
        if not view["visible"] or not view["figures"]:
            return False
        for _ in range(2):
            if not mismatches(view, broker.json("GET", "/v1/stats")):
                return view
            view = shown(driver)
        return False

    return check


def sign_in(driver: WebDriver, token: str) -> None:
    field = driver.find_element(By.ID, "token")
    field.clear()
    field.send_keys(token)
    driver.find_element(By.ID, "signin-button").click()


def nothing_shown(driver: WebDriver) -> bool:
    """Only the sign-in form: the board hidden and not one figure filled in."""
    view = shown(driver)
    return (
        not view["visible"]
        and all(value is None for _, value in view["figures"])
        and not view["guests"]
        and driver.find_element(By.ID, "signin").is_displayed()
    )


def make_guests(broker: BrokerProcess) -> dict[str, tuple[int, TmemClient, str]]:
    """Three guests with persistent and ephemeral pages, duplicates, zero pages, hits and
    misses, a declined put, a pressure report and a shared pool."""
    guests: dict[str, tuple[int, TmemClient, str]] = {}
    for name, weight in (("web-1", 100), ("db-1", 300), ("cache-1", 50)):
        created = broker.json("POST", "/v1/guests", {"name": name, "weight": weight}, expect=201)
        token = created["token"]
        guests[name] = (created["guest_id"], TmemClient(broker.url, token), token)
    _, web, _ = guests["web-1"]
    db_id, db, _ = guests["db-1"]
    cache_id, cache, _ = guests["cache-1"]
    swap = web.create_pool("persistent")
    assert all(web.put_many(swap, [(1, i, page(i % 40)) for i in range(120)]))
    assert all(web.put_many(swap, [(2, i, bytes(4096)) for i in range(10)]))
    files = web.create_pool("ephemeral")
    assert all(web.put_many(files, [(3, i, page(1000 + i)) for i in range(60)]))
    web.get_many(files, [(3, i) for i in range(30)])  # hits (exclusive: they leave the pool)
    web.get_many(files, [(4, i) for i in range(10)])  # misses
    db_swap = db.create_pool("persistent")
    assert all(db.put_many(db_swap, [(1, i, page(i % 40)) for i in range(200)]))  # dedup with web
    db.get_many(db_swap, [(1, i) for i in range(50)])
    db.report_pressure(psi_some_avg10=7.5, mem_available_bytes=512 << 20)
    shared = str(uuid.UUID(int=7))
    broker.json(
        "POST", "/v1/shared-auth", {"uuid": shared, "guest_id": cache_id, "allow": True}, expect=204
    )
    cache_pool = cache.create_pool("ephemeral", shared=True, uuid=shared)
    assert all(cache.put_many(cache_pool, [(9, i, page(5000 + i)) for i in range(40)]))
    broker.json("PATCH", f"/v1/guests/{db_id}", {"cap_pages": 400})  # a quota notice
    broker.json("POST", f"/v1/guests/{cache_id}/freeze", expect=204)
    assert not cache.put(cache_pool, 9, 99, page(1))  # declined: frozen
    broker.json("POST", f"/v1/guests/{cache_id}/thaw", expect=204)
    return guests


@pytest.fixture
def guests(broker: BrokerProcess) -> Iterator[dict[str, tuple[int, TmemClient, str]]]:
    made = make_guests(broker)
    yield made
    for _, client, _ in made.values():
        client.close()  # also when the test failed: no socket is left for a later test


def test_the_dashboard_in_a_browser(
    broker: BrokerProcess,
    browser: WebDriver,
    guests: dict[str, tuple[int, TmemClient, str]],
    tmp_path: Path,
) -> None:
    web_id, web, _ = guests["web-1"]
    guest_token = guests["db-1"][2]
    url = f"{broker.url}/dashboard"

    # A wrong token, and a guest's token, show nothing but the form.
    browser.get(url)
    assert nothing_shown(browser)
    sign_in(browser, "not-the-admin-token")
    error = browser.find_element(By.ID, "signin-error")
    wait_for(browser, lambda: "does not know" in error.text, 10, "the wrong token refused")
    assert nothing_shown(browser)
    sign_in(browser, guest_token)
    wait_for(browser, lambda: "guest's token" in error.text, 10, "a guest's token refused")
    assert nothing_shown(browser)

    # The admin token: every figure equals /v1/stats within one update.
    sign_in(browser, ADMIN)
    started = time.monotonic()
    view = wait_for(browser, agrees_with_stats(browser, broker), 3 * UPDATE_S, "figures = stats")
    assert time.monotonic() - started < 3 * UPDATE_S + 1
    stats_now = broker.json("GET", "/v1/stats")
    names = {stat for stat, _ in view["figures"]}
    for needed in (
        "capacity_bytes",
        "used_bytes",
        "charged_bytes",
        "dedup_ratio",
        "compression_ratio",
        "zero_pages",
        "gets",
        "get_hits",
        "puts_declined.frozen",
        "pressure.state",
        "pressure.high_watermark_bytes",
        "pressure.sheds_open",
        "pressure.guests_overdue",
    ):
        assert needed in names, needed
    assert stats_now["dedup_ratio"] > 1 and stats_now["zero_pages"] == 10
    assert stats_now["puts_declined"]["frozen"] == 1
    assert len(view["guests"]) == 3
    assert set(feed(browser)) >= {"quota", "freeze", "thaw"}

    # A guest puts pages: the figures follow within one update.
    before = stats_now["logical_pages"]
    swap = web.create_pool("persistent")
    assert all(web.put_many(swap, [(5, i, page(9000 + i)) for i in range(64)]))
    web.get_many(swap, [(5, i) for i in range(64)])
    after = broker.json("GET", "/v1/stats")
    assert after["logical_pages"] == before + 64

    def follows() -> bool:
        view = shown(browser)
        values = dict(view["figures"])
        return values.get("logical_pages") == str(after["logical_pages"]) and not mismatches(
            view, broker.json("GET", "/v1/stats")
        )

    wait_for(browser, follows, 3 * UPDATE_S, "the new pages shown")
    wait_for(
        browser,
        lambda: (
            browser.find_element(By.CSS_SELECTOR, '[data-rate="get_hits"]').get_attribute(
                "data-value"
            )
            not in (None, "", "0")
        ),
        3 * UPDATE_S,
        "a hit rate above zero",
    )

    # A click on a guest shows its pools, as GET /v1/guests/{id}/pools has them.
    browser.find_element(By.CSS_SELECTOR, f'#guests tr[data-guest-id="{web_id}"] td').click()
    pools = broker.json("GET", f"/v1/guests/{web_id}/pools")

    def pools_shown() -> Any:
        rows = browser.execute_script(
            """return [...document.querySelectorAll("#pools-table tbody tr[data-pool-id]")]
                 .map((tr) => Object.fromEntries([...tr.querySelectorAll("[data-field]")]
                   .map((td) => [td.dataset.field, td.dataset.value])));"""
        )
        return rows if len(rows) == len(pools) else False

    rows = wait_for(browser, pools_shown, 3 * UPDATE_S, "the pools of web-1")
    assert browser.find_element(By.ID, "pools").is_displayed()
    assert [r["pool_id"] for r in rows] == [str(p["pool_id"]) for p in pools]
    assert [r["kind"] for r in rows] == [p["kind"] for p in pools]
    assert [int(r["logical_pages"]) for r in rows] == [p["logical_pages"] for p in pools]
    assert [int(r["dedup_hits"]) for r in rows] == [p["dedup_hits"] for p in pools]

    # The guest table sorts by a click on a heading (persistent pages, then reversed).
    header = browser.find_element(By.CSS_SELECTOR, '#guests th[data-sort="persistent_pages"]')
    header.click()

    def order() -> list[int]:
        values: list[str | None] = browser.execute_script(
            """return [...document.querySelectorAll(
                 '#guests tbody td[data-stat="persistent_pages"]')].map((td) => td.dataset.value);"""
        )
        return [int(v or -1) for v in values]

    shown_order = order()
    assert shown_order == sorted(shown_order)
    browser.find_element(By.CSS_SELECTOR, '#guests th[data-sort="persistent_pages"]').click()
    shown_order = order()
    assert shown_order == sorted(shown_order, reverse=True)

    # A few seconds of work, so the charts have something to show in the screenshot.
    for round_ in range(5):
        start = 10_000 + 48 * round_
        assert all(web.put_many(swap, [(6, i, page(i)) for i in range(start, start + 48)]))
        web.get_many(swap, [(6, i) for i in range(start - 40, start + 48)])
        time.sleep(0.8 * UPDATE_S)
    # Memory gets short: persistent pages pass the policy's trigger (persistent_share of the
    # capacity), so quotas are lowered and web-1, far above its fair share, is asked to shed.
    trigger = broker.json("GET", "/v1/stats")["pressure"]["persistent_trigger_pages"]
    held = broker.json("GET", "/v1/stats")["persistent_pages"]
    more = trigger - held + 64
    assert all(web.put_many(swap, [(8, i, page(20_000 + i)) for i in range(more)]))

    def shed_shown() -> bool:
        values = dict(shown(browser)["figures"])
        cell = browser.find_elements(
            By.CSS_SELECTOR, f'#guests tr[data-guest-id="{web_id}"] td[data-field="shed"]'
        )
        return (
            values.get("pressure.state") == "quotas_lowered"
            and values.get("pressure.sheds_open") == "1"
            and bool(cell)
            and '"pages"' in (cell[0].get_attribute("data-value") or "")
        )

    wait_for(browser, shed_shown, 5 * UPDATE_S, "web-1's shed")
    wait_for(browser, agrees_with_stats(browser, broker), 3 * UPDATE_S, "figures = stats again")

    # the policy counts a shed open before the notice is stored and published, so the
    # notice may reach the feed one update after the figures
    wait_for(browser, lambda: "shed" in feed(browser), 3 * UPDATE_S, "the shed in the notices feed")
    shot = tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("TMEM_UPDATE_DOCS_IMG") == "1":
        DOCS_IMG.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, DOCS_IMG)

    # Sign out: nothing stays on the page.
    browser.find_element(By.ID, "signout").click()
    assert nothing_shown(browser)

    # The token in the URL fragment signs in, and leaves the address bar and the history.
    browser.get(f"{url}#token={ADMIN}")
    wait_for(browser, agrees_with_stats(browser, broker), 3 * UPDATE_S, "fragment sign-in")
    assert ADMIN not in browser.current_url and browser.current_url.endswith("/dashboard")
    browser.get(f"{url}#token=wrong-token")
    wait_for(browser, lambda: "does not know" in error_text(browser), 10, "fragment refused")
    assert nothing_shown(browser)

    # No script error, no failed request so far.
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []

    # The broker restarts: the page says it lost the broker, then reconnects by itself.
    browser.get(f"{url}#token={ADMIN}")
    wait_for(browser, agrees_with_stats(browser, broker), 3 * UPDATE_S, "signed in again")
    broker.stop()
    wait_for(browser, lambda: status(browser) == "down", 10, "the page to notice the broker gone")
    assert shown(browser)["visible"]  # what it showed stays while it retries
    broker.start()
    wait_for(browser, lambda: status(browser) == "live", 20, "the page to reconnect")
    wait_for(browser, agrees_with_stats(browser, broker), 3 * UPDATE_S, "figures after restart")

    for _, client, _ in guests.values():
        client.close()  # before the broker stops: the log then holds everything it wrote
    broker.stop()
    assert ADMIN not in broker.log_tail(10**7)  # the token never reached the broker's log


def error_text(browser: WebDriver) -> str:
    return str(browser.find_element(By.ID, "signin-error").text)


def status(browser: WebDriver) -> str:
    return str(browser.find_element(By.ID, "status").get_attribute("data-state"))
