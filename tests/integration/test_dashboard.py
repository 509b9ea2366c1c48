"""The web dashboard in a real headless Chromium (Debian's chromium and chromium-driver, driven by selenium)
against a real `forwardpass serve` of the demo repository: screenshots go to test-artifacts/dashboard/."""

from __future__ import annotations

import base64
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

webdriver = pytest.importorskip("selenium.webdriver")
datasets = pytest.importorskip("sklearn.datasets")
Image = pytest.importorskip("PIL.Image")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
ARTIFACTS = Path(os.environ.get("FORWARDPASS_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts")) / "dashboard"

pytestmark = pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                                reason="Debian's chromium and chromium-driver are not installed")  # fmt: skip


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000",
                 "--disable-extensions", "--no-first-run"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)  # the system driver: nothing downloaded
    driver.set_page_load_timeout(30)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def _wait(driver, condition, timeout: float = 30.0):
    # an element found by the condition may be redrawn before it is read: that poll is tried again
    return WebDriverWait(driver, timeout, poll_frequency=0.1, ignored_exceptions=(StaleElementReferenceException,)
                         ).until(condition)  # fmt: skip


def _errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _answer(driver, timeout: float = 30.0) -> str:
    found = _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, ".answer[data-answer]"), timeout)
    return found[0].get_attribute("data-answer")


def _digit_png(path: Path, index: int) -> np.ndarray:
    """sklearn's digit ``index`` as a 64x64 PNG, white ink on black (how the digits model reads them)."""
    digits = datasets.load_digits()
    pixels = (digits.images[index] * (255 / 16)).astype(np.uint8)
    Image.fromarray(pixels, "L").resize((64, 64), Image.NEAREST).save(path)
    return digits.target[index]


def test_the_dashboard_lists_models_predicts_chats_and_charts_with_no_console_error(browser, server, tmp_path):
    start = time.monotonic()
    browser.get(server.url + "/")
    rows = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "tbody tr"))
    loaded = time.monotonic() - start
    names = [r.find_element(By.CSS_SELECTOR, "td a").text for r in rows]
    assert {"digits", "iris", "smollm2", "diabetes"} <= set(names), names
    assert "READY" in browser.find_element(By.TAG_NAME, "tbody").text
    browser.save_screenshot(str(ARTIFACTS / "models.png"))
    assert loaded < 10, loaded

    # keyboard: the model links are reachable with Tab and open with Enter
    body = browser.find_element(By.TAG_NAME, "body")
    for _ in range(12):
        body.send_keys(Keys.TAB)
        active = browser.switch_to.active_element
        if active.tag_name == "a" and active.text == names[0]:
            active.send_keys(Keys.ENTER)
            break
    _wait(browser, lambda d: d.find_element(By.TAG_NAME, "h1").text.startswith(names[0]))

    # a digit from an uploaded PNG: the same answer as the API gives for that file, and the right one
    png = tmp_path / "digit.png"
    truth = _digit_png(png, 10)
    api = httpx.post(f"{server.url}/v1/models/digits:predict",
                     json={"instances": [{"b64": base64.b64encode(png.read_bytes()).decode()}]})  # fmt: skip
    assert api.status_code == 200 and api.json()["predictions"][0]["label"] == str(truth), api.text
    browser.get(server.url + "/#/model/digits")
    _wait(browser, lambda d: d.find_elements(By.ID, "image-file"))[0].send_keys(str(png))
    browser.find_element(By.XPATH, "//button[text()='Predict the file']").click()
    assert _answer(browser) == str(truth)
    browser.save_screenshot(str(ARTIFACTS / "digit-upload.png"))

    # a drawn 1: one vertical stroke down the middle of the canvas
    browser.get(server.url + "/#/model/iris")  # leave and come back: a fresh canvas
    _wait(browser, lambda d: d.find_element(By.TAG_NAME, "h1").text.startswith("iris"))
    browser.get(server.url + "/#/model/digits")
    canvas = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "canvas.draw"))[0]
    ActionChains(browser).move_to_element_with_offset(canvas, 0, -70).click_and_hold() \
        .move_by_offset(0, 35).move_by_offset(0, 35).move_by_offset(0, 35).move_by_offset(0, 35).release().perform()
    browser.find_element(By.ID, "predict-drawing").click()
    drawn = _answer(browser)
    browser.save_screenshot(str(ARTIFACTS / "digit-drawn.png"))
    assert drawn == "1"

    # a chat, streamed: a few tokens, with time to first token and token counts shown
    browser.get(server.url + "/#/model/smollm2")
    prompt = _wait(browser, lambda d: d.find_elements(By.ID, "chat-input"))[0]
    for name, value in (("max_tokens", "8"), ("temperature", "0"), ("seed", "1")):
        field = browser.find_element(By.NAME, name)
        field.clear()
        field.send_keys(value)
    prompt.send_keys("Say hello.")
    browser.find_element(By.ID, "chat-send").click()
    info = _wait(browser, lambda d: d.find_element(By.ID, "chat-info") if d.find_element(By.ID, "chat-info")
                 .get_attribute("data-tokens") else None, 120)  # fmt: skip
    assert 1 <= int(info.get_attribute("data-tokens")) <= 8 and "time to first token" in info.text
    assert browser.find_element(By.CSS_SELECTOR, ".msg.assistant").text.strip()
    browser.save_screenshot(str(ARTIFACTS / "chat.png"))

    # audio: a WAV file through the voice-activity model's WebSocket stream, 512 samples a frame
    wav = tmp_path / "tone.wav"
    t = np.arange(16000) / 16000
    __import__("soundfile").write(wav, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000)
    browser.get(server.url + "/#/model/silero-vad")
    _wait(browser, lambda d: d.find_elements(By.ID, "audio-file"))[0].send_keys(str(wav))
    browser.find_element(By.XPATH, "//button[text()='Stream it']").click()
    _wait(browser, lambda d: "31 windows of 32 ms" in d.find_element(By.ID, "main").text)

    # the charts: requests/s moves once requests come
    browser.get(server.url + "/#/metrics")
    _wait(browser, lambda d: int(d.find_element(By.ID, "main").get_attribute("data-polls") or 0) >= 2, 30)
    chart = browser.find_element(By.ID, "chart-requests")
    before = browser.execute_script("return arguments[0].toDataURL()", chart)
    polls = int(browser.find_element(By.ID, "main").get_attribute("data-polls"))
    flower = {"sepal length (cm)": 5.1, "sepal width (cm)": 3.5, "petal length (cm)": 1.4, "petal width (cm)": 0.2}
    with httpx.Client() as client:
        for _ in range(60):
            assert client.post(f"{server.url}/v1/models/iris:predict", json={"instances": [flower]}).status_code == 200
    _wait(browser, lambda d: int(d.find_element(By.ID, "main").get_attribute("data-polls")) >= polls + 2, 30)
    now = float(browser.find_element(By.ID, "now-requests").text.replace(",", "") or 0)
    after = browser.execute_script("return arguments[0].toDataURL()", chart)
    assert after != before
    assert now >= 0 and any(float(v) > 0 for v in browser.execute_script(
        "return Array.from(document.querySelectorAll('.now')).map(e => e.textContent.split(' / ')[0])"
        ".filter(t => t && t !== '-')"))  # fmt: skip
    browser.save_screenshot(str(ARTIFACTS / "metrics.png"))

    # a phone's width: nothing scrolls sideways
    browser.set_window_size(390, 844)
    browser.get(server.url + "/#/")
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "tbody tr"))
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")
    browser.save_screenshot(str(ARTIFACTS / "phone.png"))
    browser.set_window_size(1280, 1000)

    assert _errors(browser) == []


def test_api_clients_still_get_json_at_the_root_and_ui_files_are_whitelisted(server):
    home = httpx.get(server.url + "/")
    assert home.headers["content-type"].startswith("application/json") and home.json()["name"] == "forwardpass"
    page = httpx.get(server.url + "/", headers={"accept": "text/html"})
    assert page.headers["content-type"].startswith("text/html") and "script-src 'self'" in page.headers[
        "content-security-policy"]  # fmt: skip
    assert httpx.get(server.url + "/ui/app.js").status_code == 200
    for path in ("/ui/..%2Fdashboard.py", "/ui/dashboard.py", "/ui/%2e%2e"):
        assert httpx.get(server.url + path).status_code == 404
    summary = httpx.get(server.url + "/ui/api/models").json()["models"]
    digits = next(m for m in summary if m["name"] == "digits")
    assert digits["kind"] == "image" and digits["labels"][:2] == ["0", "1"] and digits["metrics"]["accuracy"] > 0.9


def test_on_a_server_that_requires_keys_the_key_typed_in_carries_the_wav_stream(browser, demo_repo, tmp_path):
    """A browser's WebSocket sends no header: the dashboard offers the key as the subprotocol bearer.<key>."""
    from fixtures import copy_models
    from serverproc import Server

    key = tmp_path / "key"
    key.write_text("s3cret/key+=\n")  # not an HTTP token: sent in base64url
    guarded = Server(copy_models(demo_repo, tmp_path / "models", "silero-vad"), args=("--api-key-file", str(key)))
    try:
        browser.get(guarded.url + "/#/")
        browser.execute_script("localStorage.removeItem('forwardpass-key')")
        browser.get_log("browser")  # the 401s of a page without its key are expected here, not counted
        field = _wait(browser, lambda d: d.find_elements(By.ID, "key"))[0]
        field.clear()
        field.send_keys("s3cret/key+=", Keys.ENTER)  # the key form, as a user saves a key
        _wait(browser, lambda d: "Key saved" in d.find_element(By.TAG_NAME, "body").text)
        wav = tmp_path / "tone.wav"
        t = np.arange(16000) / 16000
        __import__("soundfile").write(wav, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000)
        browser.get(guarded.url + "/#/model/silero-vad")
        browser.get_log("browser")
        _wait(browser, lambda d: d.find_elements(By.ID, "audio-file"))[0].send_keys(str(wav))
        browser.find_element(By.XPATH, "//button[text()='Stream it']").click()
        _wait(browser, lambda d: "31 windows of 32 ms" in d.find_element(By.ID, "main").text)
        assert _errors(browser) == []
    finally:
        browser.execute_script("localStorage.removeItem('forwardpass-key')")
        guarded.stop()
