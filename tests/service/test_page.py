"""The browser page at / in a real headless Chromium (Debian's ``chromium`` and ``chromium-driver``,
which scripts/setup.sh installs; without them the test skips and says why)."""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
from pycocotools import mask as coco_mask

from scripts.tools.service_process import LiveServer, serving
from service.backends import load_engine
from service.settings import Settings

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run")
# Run by the browser in every document before the page's own scripts (DevTools injects it, so the
# page's policy does not apply to it): records what the page's Content-Security-Policy refused.
RECORD_CSP_VIOLATIONS = ("window.cspViolations = []; document.addEventListener('securitypolicyviolation', "
                         "(e) => window.cspViolations.push(e.violatedDirective + ' ' + e.blockedURI));")


@pytest.fixture
def browser() -> Iterator:
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.skip(f"{CHROMIUM} or {CHROMEDRIVER} is missing: run scripts/setup.sh as root "
                    "(apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    profile = tempfile.mkdtemp(prefix="maskrcnn-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)))
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": RECORD_CSP_VIOLATIONS})
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def server(engine_dir: Path) -> Iterator[LiveServer]:
    with serving(Settings(request_timeout_ms=120_000), load_engine(engine_dir)) as live:
        yield live


def _rows(driver) -> list[list[str]]:
    from selenium.webdriver.common.by import By

    return [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
            for tr in driver.find_elements(By.CSS_SELECTOR, "#detections tbody tr")]


def _matches(rows: list[list[str]], detections: list[dict]) -> None:
    assert len(rows) == len(detections)
    for (name, score, box, area), expected in zip(rows, detections):
        assert name == expected["category_name"]
        assert float(score) == pytest.approx(expected["score"], abs=5e-4)
        assert [float(v) for v in box.split(",")] == pytest.approx(expected["bbox"], abs=0.05)
        assert int(area) == int(coco_mask.area(expected["segmentation"]))


def test_the_page_and_its_files_carry_a_strict_policy(server):
    for path in ("/", "/page/app.js", "/page/style.css"):
        headers = httpx.get(server.url + path).headers
        policy = dict(directive.strip().split(" ", 1) for directive in headers["content-security-policy"].split(";"))
        assert policy["script-src"] == policy["style-src"] == "'self'", policy
        assert policy["default-src"] == "'self'" and policy["frame-ancestors"] == "'none'", policy
        assert headers["x-content-type-options"] == "nosniff" and headers["referrer-policy"] == "no-referrer"
    assert "content-security-policy" not in httpx.get(server.url + "/docs").headers  # Swagger UI's inline script


def test_upload_draws_the_overlay_and_lists_what_predict_answers(server, browser, photos):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = photos / "astronaut.png"
    answer = server.post(image.read_bytes(), "image/png").json()["detections"]
    browser.get(server.url + "/")
    links = {a.text: a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "nav a")}
    assert links == {"API docs": server.url + "/docs", "metrics": server.url + "/metrics"}
    assert httpx.get(links["metrics"]).status_code == 200
    sent_before = server.metric("maskrcnn_requests_total", endpoint="/predict", status="200")

    browser.find_element(By.ID, "file").send_keys(str(image))
    WebDriverWait(browser, 120).until(
        lambda d: d.find_element(By.ID, "overlay").get_attribute("data-ready") == "true"
        or "error" in d.find_element(By.ID, "status").get_attribute("class"))
    assert browser.find_element(By.ID, "status").get_attribute("class") != "error", browser.find_element(By.ID, "status").text
    canvas = browser.find_element(By.ID, "overlay")
    assert (int(canvas.get_attribute("width")), int(canvas.get_attribute("height"))) == (512, 512)
    minimum = float(browser.find_element(By.ID, "score").get_attribute("value"))
    _matches(_rows(browser), [d for d in answer if d["score"] >= minimum])

    # the slider re-filters in the page: more rows at a lower minimum, nothing sent again
    lower = round(float(np.median([d["score"] for d in answer])), 2)
    browser.execute_script("const s = document.getElementById('score'); s.value = arguments[0];"
                           "s.dispatchEvent(new Event('input'));", str(lower))
    _matches(_rows(browser), [d for d in answer if d["score"] >= lower])
    assert len(_rows(browser)) > 0
    assert server.metric("maskrcnn_requests_total", endpoint="/predict", status="200") == sent_before + 1

    # all of it under the page's policy, which refused nothing; an inline script it does refuse
    assert browser.execute_script("return window.cspViolations") == []
    browser.execute_script("const s = document.createElement('script'); s.textContent = 'window.inlineRan = true';"
                           "document.body.append(s);")
    WebDriverWait(browser, 10).until(lambda d: d.execute_script("return window.cspViolations.length"))
    assert browser.execute_script("return [window.inlineRan, window.cspViolations]") == [None, ["script-src-elem inline"]]


def test_no_other_site_can_frame_the_page(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    # another site (another port: another origin) frames the page and, as a control, /docs (no frame-ancestors)
    (tmp_path / "framing.html").write_text(
        f'<iframe id="page" src="{server.url}/"></iframe><iframe id="docs" src="{server.url}/docs"></iframe>')
    other_site = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=tmp_path))
    threading.Thread(target=other_site.serve_forever, daemon=True).start()
    try:
        browser.get(f"http://127.0.0.1:{other_site.server_address[1]}/framing.html")  # returns once the frames loaded
        shown = {}
        for frame in ("page", "docs"):
            browser.switch_to.frame(browser.find_element(By.ID, frame))
            shown[frame] = (browser.execute_script("return document.URL.split(':')[0]"),
                            bool(browser.find_elements(By.CSS_SELECTOR, "#file, #swagger-ui")))
            browser.switch_to.default_content()
    finally:
        other_site.shutdown()
    assert shown == {"page": ("chrome-error", False), "docs": ("http", True)}, shown
