"""The browser page at / in a real headless Chromium (Debian's ``chromium`` and ``chromium-driver``,
which scripts/setup.sh installs; without them the test skips and says why)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
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
