"""The router's page at / in a real headless browser (Debian chromium, driven by selenium through
chromium-driver): it loads and lists the live experts, a request draws the grid with the experts
of each image, a refused request shows its error as text. The screenshot is kept as a test
artefact (ATOLL_TEST_ARTIFACTS, default test-artifacts/ at the repository root)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import ROOT
from sysdeps import needs
from test_router_http import router

ARTIFACTS = Path(os.environ.get("ATOLL_TEST_ARTIFACTS", ROOT / "test-artifacts"))


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1100,900",
    ):
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    service = Service("/usr/bin/chromedriver", log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()  # stops chromium and chromedriver, by their pids


@needs("chromium", "chromium-driver")
def test_the_page_draws_samples_names_their_experts_and_shows_errors(browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, 60)
    with router(live=(0, 1, 3), max_n=32) as (http, _, _):
        browser.get(http.url + "/")
        assert browser.title == "atoll router"
        wait.until(ec.text_to_be_present_in_element((By.ID, "summary"), "3 of 4 experts live (missing: 2)"))
        strategies = [o.text for o in Select(browser.find_element(By.ID, "strategy")).options]
        assert strategies == ["top1", "top2", "top3", "full"]
        assert len(browser.find_elements(By.CSS_SELECTOR, "#experts tbody tr")) == 3

        count = browser.find_element(By.ID, "count")
        count.clear()
        count.send_keys("6")
        Select(browser.find_element(By.ID, "strategy")).select_by_visible_text("top2")
        browser.find_element(By.ID, "go").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#grid figure")) == 6)
        captions = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#grid figcaption")]
        assert all(c.startswith("experts ") and "2" not in c for c in captions), captions
        loaded = browser.execute_script(
            "return [...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth === 8)"
        )
        assert loaded, "every sample is a decoded 8x8 PNG"
        assert "6 images, top2, 3 of 4 experts live" in browser.find_element(By.ID, "status").text
        assert "missing: 2" in browser.find_element(By.ID, "warning").text
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "router-page.png"
        assert browser.save_screenshot(str(shot)) and shot.read_bytes().startswith(b"\x89PNG")

        count.clear()
        count.send_keys("99")  # over this router's max_n: the server's 400, shown as text
        browser.find_element(By.ID, "go").click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "error"), "error 400: n must be in [1, 32], got 99"))
        browser.save_screenshot(str(ARTIFACTS / "router-page-error.png"))
