"""The web chat in a real headless browser (Debian's chromium + chromedriver through selenium): the page starts with a
tiny model, shows the notice and example questions, a typed question gets a streamed reply, the clear button empties
the conversation, and a screenshot is saved (``WEB_DEMO_SCREENSHOT=assets/web_demo.png`` writes the README's).

Skipped, saying why, where chromium, its driver or selenium is missing (.ci/run installs them with apt-get)."""
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.test_serving import free_port

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1200,900"]

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER and importlib.util.find_spec("selenium")),
    reason="the browser test needs chromium and chromedriver (apt-get install chromium chromium-driver) and selenium "
           "(requirements-test.txt)")


@pytest.fixture(scope="module")
def page(tiny_model_dir, tmp_path_factory):
    model = os.environ.get("WEB_DEMO_MODEL") or str(tiny_model_dir)  # a real model for the README's screenshot
    port = free_port()
    log = open(tmp_path_factory.mktemp("web") / "web.log", "wb")
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "src.evaluate.web_demo", "--model", model, "--port", str(port),
                             "--max-new-tokens", "48"], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            pytest.fail(f"the web demo did not come up (exit code {proc.poll()})")
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(20)
        log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chrome')}"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _wait(fn, timeout=120.0, what="the page"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_question_gets_a_streamed_reply(page, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(page)
    box = _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "textarea"), what="the message box")[0]
    body = browser.find_element(By.TAG_NAME, "body").text
    assert "NOT medical advice" in body
    assert "¿Cuáles son las causas más frecuentes de anemia?" in body and "高血压患者" in body  # examples, languages
    box.send_keys("What causes iron-deficiency anaemia?")
    box.send_keys(Keys.ENTER)
    _wait(lambda: "iron-deficiency anaemia" in browser.execute_script(
        "return [...document.querySelectorAll('.user-row')].map(e => e.innerText).join(' ')"), what="the question")
    reply = _wait(lambda: browser.execute_script(_STATE)[0].strip(), what="a streamed reply")
    # The reply has finished once the stop button is gone and its text no longer changes.
    seen: dict = {}
    last = _wait(lambda: _settled(browser, seen), timeout=240, what="the end of the reply")
    assert last.strip() and reply
    shot = Path(os.environ.get("WEB_DEMO_SCREENSHOT") or tmp_path / "web_demo.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000

    browser.find_element(By.CSS_SELECTOR, "button[aria-label='Clear']").click()
    _wait(lambda: browser.execute_script("return document.querySelectorAll('.bot-row').length === 0"), 30,
          "the cleared conversation")


# Read the page in one script call: gradio re-renders the chat while it streams, so element handles go stale.
_STATE = """
const bots = [...document.querySelectorAll('.bot-row')].map(e => e.innerText);
const busy = [...document.querySelectorAll('button')].some(b => b.offsetParent !== null &&
    (b.getAttribute('aria-label') === 'Stop' || (b.className || '').toString().includes('stop')));
return [bots.length ? bots[bots.length - 1] : '', busy];
"""


def _settled(browser, seen: dict):
    text, busy = browser.execute_script(_STATE)
    done = bool(text.strip()) and text == seen.get("text") and not busy
    seen["text"] = text
    return text if done else None
