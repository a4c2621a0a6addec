"""The operator's page (GET /) in a real headless Chromium against a real agent.

Sign in, launch a task that prints slowly, watch its lines appear, cancel it, see
it cancelled in the list, purge it; a wrong token is refused. Every run saves its
screenshots in a temporary directory (named in the test's output); with
AGENT_SCREENSHOTS=docs/images they replace the ones docs/dashboard.md shows, so a
plain `make test` leaves the checkout as it was.

Needs Debian's chromium and chromium-driver and selenium; without the browser the
test skips, except under CI (CI set), where .ci/run installs it and it never skips.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import REPO

IMAGES = (REPO / os.environ["AGENT_SCREENSHOTS"] if os.environ.get("AGENT_SCREENSHOTS")
          else Path(tempfile.mkdtemp(prefix="agent-screenshots-")))
CHROMIUM = shutil.which("chromium")
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

if not (CHROMIUM and os.path.exists(DRIVER)) and not os.environ.get("CI"):
    pytest.skip("needs chromium and chromium-driver (apt-get install chromium chromium-driver)",
                allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

SLOW = ("import sys, time, os; "
        "print('<b>not bold</b> ' + os.environ['GREETING'], flush=True); "
        "print('to stderr', file=sys.stderr, flush=True); "
        "[(print(f'line {n}', flush=True), time.sleep(0.2)) for n in range(1, 600)]")
"""One line: an argument field is an <input>, where Enter submits the form."""


@pytest.fixture
def browser(tmp_path):
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp_path)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM or "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--window-size=1280,900",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(DRIVER)  # explicit: selenium-manager never downloads anything
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()
        service.stop()
        assert service.process is None or service.process.poll() is not None


def _wait(driver, condition, timeout=20.0):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition(d))


def _visible(driver, element_id):
    return driver.find_element(By.ID, element_id).is_displayed()


def _shot(driver, name):
    IMAGES.mkdir(parents=True, exist_ok=True)
    path = IMAGES / f"dashboard-{name}.png"
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")


def _sign_in(driver, token):
    field = driver.find_element(By.ID, "token")
    field.clear()
    field.send_keys(token)
    driver.find_element(By.ID, "sign-in").click()


def _text(driver, element_id):
    return driver.find_element(By.ID, element_id).get_attribute("textContent")


def test_sign_in_launch_watch_cancel_and_purge_in_a_real_browser(start_agent, tmp_path, browser):
    data = tmp_path / "data"
    agent = start_agent("--http", "tcp:0:interface=127.0.0.1", "--data-dir", str(data),
                        "--kill-grace", "1", doors=("TCP task protocol", "HTTP API"))
    url = f"http://127.0.0.1:{agent.ports['HTTP API']}/"
    token = (data / "token").read_text().strip()
    driver = browser

    driver.get(url)
    _wait(driver, lambda d: _visible(d, "view-sign-in"))
    _sign_in(driver, token + "x")  # a wrong token is refused, and not kept
    _wait(driver, lambda d: "refused" in _text(d, "notice"))
    assert _visible(driver, "view-sign-in") and not _visible(driver, "view-list")
    assert driver.execute_script("return sessionStorage.length") == 0
    _shot(driver, "refused")

    _sign_in(driver, token)
    _wait(driver, lambda d: _visible(d, "view-list"))
    assert driver.execute_script("return sessionStorage.getItem('agent-token')") == token

    driver.find_element(By.ID, "nav-fleet").click()  # this agent is in no fleet: it says so
    _wait(driver, lambda d: _visible(d, "view-fleet") and _visible(d, "fleet-none"))
    assert _text(driver, "fleet-none") == "this agent is not in a fleet (--fleet)"

    driver.find_element(By.ID, "nav-launch").click()
    _wait(driver, lambda d: _visible(d, "view-launch"))
    driver.find_element(By.ID, "launch-command").send_keys("python3")
    for arg in ("-u", "-c", SLOW):
        driver.find_element(By.ID, "add-arg").click()
        driver.find_elements(By.CSS_SELECTOR, "#launch-args input.arg")[-1].send_keys(arg)
    driver.find_element(By.ID, "launch-timeout").send_keys("120")
    driver.find_element(By.ID, "add-env").click()
    driver.find_element(By.CSS_SELECTOR, "#launch-env input.env-name").send_keys("GREETING")
    driver.find_element(By.CSS_SELECTOR, "#launch-env input.env-value").send_keys("hello")
    _shot(driver, "launch")
    driver.find_element(By.ID, "launch").click()

    _wait(driver, lambda d: _visible(d, "view-task"))
    _wait(driver, lambda d: "line 3" in _text(d, "stdout"))  # the lines arrive as they are written
    seen = _text(driver, "stdout")
    _wait(driver, lambda d: len(_text(d, "stdout")) > len(seen))
    stdout = _text(driver, "stdout")
    assert stdout.startswith("<b>not bold</b> hello\nline 1\nline 2\n"), stdout
    assert driver.find_elements(By.CSS_SELECTOR, "#stdout b") == []  # text, never HTML
    _wait(driver, lambda d: _text(d, "stderr") == "to stderr\n")
    task_id = _text(driver, "task-id")
    _shot(driver, "task-running")

    driver.find_element(By.ID, "cancel").click()
    _wait(driver, lambda d: _alert(d)).accept()
    _wait(driver, lambda d: "cancelled" in _text(d, "end"))
    assert "state" in _text(driver, "record") and "cancelled" in _text(driver, "record")
    _shot(driver, "task-cancelled")

    driver.find_element(By.LINK_TEXT, "tasks").click()
    row = f"tr[data-id='{task_id}'] td.state"
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, row)
          and d.find_element(By.CSS_SELECTOR, row).text == "cancelled")
    _shot(driver, "list")

    driver.find_element(By.CSS_SELECTOR, f"tr[data-id='{task_id}']").click()
    _wait(driver, lambda d: _visible(d, "view-task") and d.find_element(By.ID, "purge").is_enabled())
    driver.find_element(By.ID, "purge").click()
    _wait(driver, lambda d: _alert(d)).accept()
    _wait(driver, lambda d: _visible(d, "view-list") and "Purged" in _text(d, "notice"))
    _wait(driver, lambda d: not d.find_elements(By.CSS_SELECTOR, f"tr[data-id='{task_id}']"))

    assert driver.get_cookies() == []
    problems = [entry for entry in driver.get_log("browser")
                if entry["level"] == "SEVERE" and "401" not in entry["message"]
                and "/fleet/nodes - " not in entry["message"]]  # its 404: in no fleet
    assert problems == [], json.dumps(problems, indent=1)
    assert token not in agent.log  # never in a URL the agent logged
    agent.wait_for_log(f'"POST /tasks/{task_id}/cancel HTTP/1.1" 200')


def test_the_fleet_panel_lists_the_nodes_of_an_agent_in_a_fleet(start_agent, tmp_path,
                                                               browser, fleet_dsn):
    data = tmp_path / "data"
    agent = start_agent("--http", "tcp:0:interface=127.0.0.1", "--data-dir", str(data),
                        "--fleet", fleet_dsn, "--node-id", "node7", "--labels", "os=linux",
                        "--parallel", "4", "--fleet-url", "http://node7.example.com:8080",
                        doors=("TCP task protocol", "HTTP API"))
    agent.wait_for_log("joined the fleet")
    browser.get(f"http://127.0.0.1:{agent.ports['HTTP API']}/#/fleet")
    _wait(browser, lambda d: _visible(d, "view-sign-in"))
    _sign_in(browser, (data / "token").read_text().strip())

    row = "tr[data-id='node7'] td"
    _wait(browser, lambda d: _visible(d, "view-fleet") and d.find_elements(By.CSS_SELECTOR, row))
    cells = [cell.text for cell in browser.find_elements(By.CSS_SELECTOR, row)]
    assert cells[:3] == ["node7", "up", "0 / 4"] and cells[4:] == [
        "os=linux", "http://node7.example.com:8080"], cells
    assert cells[3].endswith(" s ago") and not _visible(browser, "fleet-none")
    _shot(browser, "fleet")


def _alert(driver):
    try:
        return driver.switch_to.alert
    except Exception:
        return False


def test_the_page_cannot_be_framed_and_runs_no_inline_script(start_agent, tmp_path, browser):
    data = tmp_path / "data"
    agent = start_agent("--http", "tcp:0:interface=127.0.0.1", "--data-dir", str(data),
                        doors=("TCP task protocol", "HTTP API"))
    url = f"http://127.0.0.1:{agent.ports['HTTP API']}/"
    browser.get(url)
    _wait(browser, lambda d: _visible(d, "view-sign-in"))
    ran = browser.execute_script("""
        const s = document.createElement('script');
        s.textContent = 'window.inlineRan = true';
        document.body.append(s);
        return window.inlineRan === true;""")
    assert ran is False  # the CSP refuses inline script
    start = time.monotonic()
    _wait(browser, lambda d: any("Content Security Policy" in e["message"]
                                 for e in d.get_log("browser")), timeout=5)
    assert time.monotonic() - start < 5
