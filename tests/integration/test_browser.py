"""The resolution page in a real browser: headless Chromium driven by selenium (chromedriver),
against real node processes as ``idis-local`` starts them (HTTPS from the local CA).

Trusting the local CA: Chromium on Linux trusts what its NSS database holds, which would need
``certutil`` and a profile-wide import. Instead Chromium is told to accept exactly the public
keys of the local CA and of the three nodes' certificates (``--ignore-certificate-errors-spki-list``,
honoured with a ``--user-data-dir``): any other certificate is still refused, unlike with
``--ignore-certificate-errors``.

Chromium and chromedriver are Debian's (``/usr/bin/chromium``, ``/usr/bin/chromedriver``);
``.ci/run`` installs them where they are missing, so this test is never skipped.

A screenshot of the record page is written to the test's temporary folder; with
``IDIS_UPDATE_SCREENSHOT=1`` it also replaces ``docs/resolution-page.png`` (the README's).
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.integration.conftest import Local

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "resolution-page.png"


def spki_hashes(state: Path) -> list[str]:
    """base64(SHA-256(SubjectPublicKeyInfo)) of the local CA and every node certificate."""
    out = []
    for pem in sorted((state / "tls").glob("*.pem")):
        certificate = x509.load_pem_x509_certificate(pem.read_bytes())
        spki = certificate.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        out.append(base64.b64encode(hashlib.sha256(spki).digest()).decode())
    return out


@pytest.fixture
def browser(local: Local, tmp_path: Path) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1200,860",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--ignore-certificate-errors-spki-list=" + ",".join(spki_hashes(local.state)),
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def test_search_record_page_and_a_redirect_followed_in_chromium(
    local: Local, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    top = local.base("top-level")
    wait = WebDriverWait(browser, 20)
    # The home page of the top-level node: type an identifier the node does not hold, ask for the record.
    browser.get(top + "/")
    assert "top-level" in browser.find_element(By.TAG_NAME, "header").text
    browser.find_element(By.NAME, "id").send_keys("88.100.1/SN-0001")
    browser.find_element(By.NAME, "noredirect").click()
    browser.find_element(By.CSS_SELECTOR, "form.search button").click()
    wait.until(lambda d: d.current_url.endswith("/88.100.1/SN-0001?noredirect"))
    assert browser.find_element(By.CSS_SELECTOR, "h1.identifier").text == "88.100.1/SN-0001"
    rows = [row.text for row in browser.find_elements(By.CSS_SELECTOR, "tr.value")]
    assert len(rows) == 3 and "MOTOR-X200" in rows[1] and "2026-11-01" in rows[2]
    link = browser.find_element(By.CSS_SELECTOR, "tr.value a.data")
    assert link.get_attribute("href") == "https://factory-1.example.com/products/SN-0001"
    assert link.get_attribute("rel") == "noopener noreferrer nofollow"
    chain = [item.text for item in browser.find_elements(By.CSS_SELECTOR, "ol.trace li")]
    assert [hop.split(":", 2)[:2] for hop in chain] == [
        local.grpc(node).split(":") for node in ("top-level", "secondary-100", "enterprise-1")
    ]
    # The style sheet ran under the page's Content-Security-Policy (allowed by its hash), and
    # the browser reported no violation.
    header = browser.find_element(By.TAG_NAME, "header")
    assert header.value_of_css_property("background-color") in ("rgba(29, 53, 87, 1)", "rgb(29, 53, 87)")
    console: list[dict[str, str]] = browser.get_log("browser")  # type: ignore[no-untyped-call]  # untyped in selenium
    assert not [entry for entry in console if "Content Security Policy" in entry["message"]]
    shot = tmp_path / "resolution-page.png"
    assert browser.save_screenshot(str(shot)) and shot.read_bytes().startswith(b"\x89PNG")
    if os.environ.get("IDIS_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shot, SCREENSHOT)

    # A URL value pointing back at a page of the hierarchy: the browser follows the redirect
    # from the enterprise node's page to the top-level node's, without leaving loopback.
    target = f"{top}/88.100.1/BROWSER-0001?noredirect"
    local.register("88.100.1/BROWSER-0001", [{"index": 1, "type": "URL", "data": target}])
    browser.get(local.base("enterprise-1") + "/88.100.1/BROWSER-0001")
    wait.until(lambda d: d.current_url == target)
    assert browser.find_element(By.CSS_SELECTOR, "h1.identifier").text == "88.100.1/BROWSER-0001"
    assert browser.find_element(By.CSS_SELECTOR, "tr.value a.data").text == target
