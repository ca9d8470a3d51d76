"""The Snakemake report of the smoke run, opened in headless Chromium: does it actually render?

``results/report.html`` is one self-contained page whose navbar, result lists and viewers are
drawn by React at load time, so a report that exists and is large can still show nothing. These
tests drive Debian's Chromium through Selenium and look at what a reader would see: the
categories in the navbar, the HTML tables (with real cells) and the per-run cards in iframes,
and the PNG figures decoded into ``<img>`` elements.

How the report is laid out (Snakemake 9): the navbar is the ``<nav>`` with the ``<h1>`` title; its
body lists the categories as links, and a category (or its single subcategory) shows a table with
one row per result: its label values, then an eye button (view) and an info button. Viewing
shows the result right of the navbar: PNG as an ``<img>`` with a ``data:`` URI, HTML in an
``<iframe>`` with a ``data:`` URI. Markdown and LaTeX results have no viewer; their eye button is a
download link whose ``href`` is the file as a ``data:`` URI. A label with exactly two values that
split the results in half (``seed`` in the smoke grid) becomes a toggle above the table instead
of a column.

Chromium comes from apt (``chromium``, ``chromium-driver``); chromedriver is given by path so that
Selenium Manager never goes online.
"""

from __future__ import annotations

import base64
import re
import shutil
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest
from system_packages import ensure_debian_packages

pytest.importorskip("selenium", reason="selenium is in the test extra: pip install -e '.[test]'")
from selenium import webdriver
from selenium.common.exceptions import (
    StaleElementReferenceException,
    TimeoutException,
    WebDriverException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

pytestmark = [pytest.mark.browser, pytest.mark.workflow]

# The flags of the issue: no sandbox (root in CI), and no background requests to Google's services,
# which would hang or log errors on an offline machine.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--window-size=1600,1000",
)
WAIT_S = 20
T = TypeVar("T")

NAVBAR = "//nav[h1]"
NAV_BODY = f"{NAVBAR}/div/div"
RESULT_ROWS = f"{NAV_BODY}//table/tbody/tr"
VIEWER = f"{NAVBAR}/following-sibling::div[1]"
RUN_LABELS = {"model", "method", "ratio", "seed"}
# A cell such as "0.297", "-4.22", "+3.22" or "50.89 ± 11.29".
NUMBER = re.compile(r"^[+-]?\d+(\.\d+)?( ± \d+(\.\d+)?)?$")
# SEVERE browser-log entries that say nothing about the report's scripts: a missing favicon is a
# failed resource request, which Chromium logs at SEVERE when the report is served over HTTP.
HARMLESS_LOG = ("favicon.ico",)
# Installed before the report's own scripts run, so that an exception thrown while React renders
# is kept even where the driver has no browser log.
ERROR_HOOK = """
window.__reportErrors = [];
window.addEventListener("error", (e) => window.__reportErrors.push(String(e.message)));
window.addEventListener("unhandledrejection", (e) => window.__reportErrors.push(String(e.reason)));
"""


@pytest.fixture(scope="session")
def chromium() -> tuple[str, str]:
    """Paths of the Chromium binary and chromedriver, installed with apt if missing.

    Session-scoped so that, on a machine without them, the tests skip before the smoke run.
    """
    reason = ensure_debian_packages({"chromium": "chromium", "chromedriver": "chromium-driver"})
    if reason:
        pytest.skip(reason)
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert binary and driver
    return binary, driver


@pytest.fixture(scope="module")
def browser(chromium: tuple[str, str]) -> Iterator[WebDriver]:
    """A headless Chromium under chromedriver, quit after the module."""
    binary, driver_path = chromium
    options = webdriver.ChromeOptions()
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.binary_location = binary
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": ERROR_HOOK})
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def report_uri(smoke_run: tuple[Path, Counter]) -> str:
    """The ``file://`` URI of the smoke run's report."""
    report = smoke_run[0] / "results" / "report.html"
    assert report.is_file(), f"{report} was not written"
    return report.as_uri()


def _wait(driver: WebDriver, condition: Callable[[WebDriver], T], what: str, shot: Path) -> T:
    """Wait for ``condition``; on timeout fail with ``what`` and a screenshot saved to ``shot``."""
    # React replaces elements on every view change, so a handle found a moment ago can go stale.
    wait = WebDriverWait(driver, WAIT_S, ignored_exceptions=(StaleElementReferenceException,))
    try:
        return wait.until(condition)
    except TimeoutException:
        driver.save_screenshot(str(shot))
        errors = _js_errors(driver)
        pytest.fail(f"no {what} within {WAIT_S} s; screenshot: {shot}; JS errors: {errors}")


def _xpath_literal(text: str) -> str:
    """``text`` quoted for XPath (label values never hold a double quote)."""
    assert '"' not in text, text
    return f'"{text}"'


def _js_errors(driver: WebDriver) -> list[str]:
    """Uncaught exceptions on the page and SEVERE browser-log entries since the last call.

    Messages are cut short and deduplicated: a failed ``data:`` URI is logged in full, and an
    error in a render path repeats once per rendered row.
    """
    # None where the hook did not run, e.g. inside a result's iframe.
    hooked = driver.execute_script("return window.__reportErrors") or []
    errors = [f"uncaught: {msg}" for msg in hooked]
    try:
        log = driver.get_log("browser")
    except (AttributeError, WebDriverException):  # no log here: the hook is the only source
        log = []
    errors += [
        f"console: {entry['message']}"
        for entry in log
        if entry.get("level") == "SEVERE"
        and not any(pattern in entry.get("message", "") for pattern in HARMLESS_LOG)
    ]
    return list(dict.fromkeys(error[:300] for error in errors))


def _open_report(driver: WebDriver, uri: str, shot: Path) -> list[str]:
    """Load the report and wait until React has drawn the navbar; return the menu's labels."""
    driver.get(uri)
    _wait(
        driver,
        lambda d: not d.find_element(By.ID, "loading-screen").is_displayed(),
        "end of the report's scripts (the loading screen is still shown)",
        shot,
    )
    items = _wait(
        driver,
        lambda d: d.find_elements(By.XPATH, f"{NAV_BODY}/ul/li/a/span"),
        "navbar menu",
        shot,
    )
    return [item.text.strip() for item in items]


def _open_category(driver: WebDriver, name: str, shot: Path) -> None:
    """Show a category's results, entering its first subcategory when it has several."""
    link = f"{NAV_BODY}/ul/li/a[span[normalize-space()={_xpath_literal(name)}]]"
    _wait(driver, lambda d: d.find_element(By.XPATH, link), f"menu item {name!r}", shot).click()
    subcategories = f"{NAV_BODY}/ul/li/a"
    _wait(
        driver,
        lambda d: (
            d.find_elements(By.XPATH, RESULT_ROWS)
            or not d.find_elements(By.XPATH, link)
            and d.find_elements(By.XPATH, subcategories)
        ),
        f"results or subcategories of {name!r}",
        shot,
    )
    if not driver.find_elements(By.XPATH, RESULT_ROWS):
        driver.find_element(By.XPATH, subcategories).click()
        _wait(driver, lambda d: d.find_elements(By.XPATH, RESULT_ROWS), f"{name} results", shot)


def _label_names(driver: WebDriver) -> tuple[list[str], list[str]]:
    """The label columns of the shown result table, and the labels shown as toggles."""
    heads = driver.find_elements(By.XPATH, f"{NAV_BODY}//table/thead/tr/th")
    # textContent: the headers are upper-cased by CSS only.
    columns = [th.get_attribute("textContent").strip() for th in heads][:-1]
    toggles = driver.find_elements(By.XPATH, f"{NAV_BODY}//fieldset/span[1]")
    return columns, [span.get_attribute("textContent").strip() for span in toggles]


def _rows(driver: WebDriver) -> list[dict[str, str]]:
    """The label values of each shown result row, keyed by label."""
    columns, _ = _label_names(driver)
    rows = []
    for row in driver.find_elements(By.XPATH, RESULT_ROWS):
        cells = row.find_elements(By.XPATH, "td[position() < last()]")
        rows.append({col: cell.text.strip() for col, cell in zip(columns, cells)})
    return rows


def _view_button(driver: WebDriver, labels: dict[str, str]) -> WebElement:
    """The eye button of the result row with these label values."""
    match = " and ".join(f"td[normalize-space()={_xpath_literal(v)}]" for v in labels.values())
    return driver.find_element(By.XPATH, f"{RESULT_ROWS}[{match}]/td[last()]//a[1]")


@contextmanager
def _inside(driver: WebDriver, frame: WebElement) -> Iterator[None]:
    """Run the block inside ``frame``, then return to the report."""
    driver.switch_to.frame(frame)
    try:
        yield
    finally:
        driver.switch_to.default_content()


def _view_html(driver: WebDriver, labels: dict[str, str], shot: Path) -> WebElement:
    """Open an HTML result in the viewer and return its newly created iframe."""
    old = driver.find_elements(By.XPATH, f"{VIEWER}//iframe")
    _view_button(driver, labels).click()
    # A new view replaces the iframe element (React keys it by a fresh random number).
    return _wait(
        driver,
        lambda d: [f for f in d.find_elements(By.XPATH, f"{VIEWER}//iframe") if f not in old],
        f"iframe of {labels}",
        shot,
    )[0]


def _frame_text(
    driver: WebDriver, frame: WebElement, what: str, shot: Path
) -> tuple[str, list[list[str]]]:
    """The body text of an iframe and the cell texts of its table rows, once it has loaded."""
    with _inside(driver, frame):
        _wait(driver, lambda d: d.find_elements(By.TAG_NAME, "td"), f"table cells in {what}", shot)
        text = driver.find_element(By.TAG_NAME, "body").text
        rows = [
            [cell.text.strip() for cell in tr.find_elements(By.XPATH, "td|th")]
            for tr in driver.find_elements(By.TAG_NAME, "tr")
        ]
    return text, rows


def _data_uri_text(uri: str) -> str:
    """The text a ``data:`` URI carries."""
    header, _, payload = uri.partition(",")
    assert header.startswith("data:"), uri[:80]
    if header.endswith(";base64"):
        return base64.b64decode(payload).decode()
    return urllib.parse.unquote(payload)


def _check_run_pages(driver: WebDriver, category: str, shot: Path) -> None:
    """Open every HTML result of a per-run category (and one other toggle value) and read it.

    Each page must render a table and name the run's model, method and ratio; the labels must be
    model, method, ratio and seed (columns or toggles).
    """
    _open_category(driver, category, shot)
    columns, toggles = _label_names(driver)
    assert RUN_LABELS.issubset(columns + toggles), (
        f"{category} labels {columns} (toggles {toggles}) lack {RUN_LABELS}; screenshot: {shot}"
    )
    rows = _rows(driver)
    assert rows and all(all(row.values()) for row in rows), f"empty labels in {category}: {rows}"

    def check(labels: dict[str, str]) -> None:
        frame = _view_html(driver, labels, shot)
        assert frame.size["width"] > 0 and frame.size["height"] > 0, f"{labels}: {shot}"
        text, cells = _frame_text(driver, frame, f"{category} {labels}", shot)
        missing = [v for k, v in labels.items() if k in RUN_LABELS and v not in text]
        assert not missing, f"{category} page of {labels} does not mention {missing}: {text[:300]}"
        numbers = [c for row in cells for c in row if NUMBER.match(c)]
        assert numbers, f"{category} page of {labels} shows no numbers: {cells[:5]}"

    for labels in rows:
        check(labels)
    # The other value of the toggle (seed) must swap in that run's own page.
    others = [
        label
        for label in driver.find_elements(By.XPATH, f"{NAV_BODY}//fieldset//label")
        if not label.find_element(By.TAG_NAME, "input").is_selected()
    ]
    if others:
        before = driver.find_element(By.XPATH, f"{VIEWER}//iframe").get_attribute("src")
        others[0].click()
        frame = _wait(
            driver,
            lambda d: [
                f
                for f in d.find_elements(By.XPATH, f"{VIEWER}//iframe")
                if f.get_attribute("src") != before
            ],
            f"{category} page for the other {toggles[0]}",
            shot,
        )[0]
        text, _ = _frame_text(driver, frame, f"{category} after the toggle", shot)
        assert rows[-1]["method"] in text, f"{text[:300]}; screenshot: {shot}"


def test_report_loads_with_its_categories(
    browser: WebDriver, report_uri: str, tmp_path: Path
) -> None:
    """The scripts run to the end without errors and the navbar lists the result categories."""
    shot = tmp_path / "loaded.png"
    menu = _open_report(browser, report_uri, shot)
    browser.save_screenshot(str(shot))
    for category in ("Tables", "Figures", "Agents"):
        assert category in menu, f"no category {category!r} in the navbar {menu}; {shot}"
    errors = _js_errors(browser)
    assert not errors, f"{errors}; screenshot: {shot}"


def test_tables_render_with_cells(browser: WebDriver, report_uri: str, tmp_path: Path) -> None:
    """The HTML tables show method rows with numbers; Markdown and LaTeX are embedded for download.

    The results table holds the structured methods (isomorphic among them), the unstructured
    table iCBS.
    """
    shot = tmp_path / "tables.png"
    _open_report(browser, report_uri, shot)
    _open_category(browser, "Tables", shot)
    for table, method in (("results", "isomorphic"), ("unstructured", "icbs")):
        frame = _view_html(browser, {"table": table, "format": "html"}, shot)
        browser.save_screenshot(str(shot))
        _, cells = _frame_text(browser, frame, f"the {table} table", shot)
        rows = [row for row in cells if method in row]
        assert rows, f"no {method} row in the {table} table {cells[:4]}; screenshot: {shot}"
        numbers = [cell for cell in rows[0] if NUMBER.match(cell)]
        assert len(numbers) >= 3, f"{table}: {method} row {rows[0]} lacks numbers; {shot}"
        with _inside(browser, frame):
            shown = browser.find_element(By.TAG_NAME, "table").size
        assert shown["width"] > 100 and shown["height"] > 20, f"{table} table {shown}; {shot}"
        for fmt in ("markdown", "latex"):
            href = _view_button(browser, {"table": table, "format": fmt}).get_attribute("href")
            assert method in _data_uri_text(href), f"{table} {fmt}: {href[:120]}"
    errors = _js_errors(browser)
    assert not errors, f"{errors}; screenshot: {shot}"


def test_figures_decode(browser: WebDriver, report_uri: str, tmp_path: Path) -> None:
    """Every figure opens as an ``<img>`` whose PNG decodes to a non-empty bitmap."""
    shot = tmp_path / "figure.png"
    _open_report(browser, report_uri, shot)
    _open_category(browser, "Figures", shot)
    rows = _rows(browser)
    assert rows, f"no figures listed; screenshot: {shot}"
    previous = None
    for labels in rows:
        _view_button(browser, labels).click()
        # Compare the source, since React may reuse one <img> for every figure.
        img = _wait(
            browser,
            lambda d, previous=previous: [
                i
                for i in d.find_elements(By.XPATH, f"{VIEWER}//img")
                if i.get_attribute("src") != previous
                and d.execute_script("return arguments[0].complete", i)
            ],
            f"image of {labels}",
            shot,
        )[0]
        browser.save_screenshot(str(shot))
        src = img.get_attribute("src")
        width, height = browser.execute_script(
            "return [arguments[0].naturalWidth, arguments[0].naturalHeight]", img
        )
        assert src.startswith("data:image/"), f"{labels}: src {src[:80]}; screenshot: {shot}"
        assert width > 0 and height > 0, f"{labels} did not decode; screenshot: {shot}"
        assert img.size["width"] > 0, f"{labels} is not laid out; screenshot: {shot}"
        previous = src
    errors = _js_errors(browser)
    assert not errors, f"{errors}; screenshot: {shot}"


def test_agent_transcripts_render(browser: WebDriver, report_uri: str, tmp_path: Path) -> None:
    """Each multi-agent transcript opens in an iframe with its run's labels and numbers."""
    shot = tmp_path / "agents.png"
    _open_report(browser, report_uri, shot)
    _check_run_pages(browser, "Agents", shot)
    errors = _js_errors(browser)
    assert not errors, f"{errors}; screenshot: {shot}"


def test_run_cards_render(browser: WebDriver, report_uri: str, tmp_path: Path) -> None:
    """Each run's card (category Runs) opens in an iframe with its run's labels and numbers."""
    shot = tmp_path / "runs.png"
    categories = _open_report(browser, report_uri, shot)
    assert "Runs" in categories, f"no Runs category in {categories}; screenshot: {shot}"
    _check_run_pages(browser, "Runs", shot)
    errors = _js_errors(browser)
    assert not errors, f"{errors}; screenshot: {shot}"
