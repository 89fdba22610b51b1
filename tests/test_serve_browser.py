"""End to end in a real headless browser: Debian's Chromium, driven by Selenium, against the
workbench served by uvicorn on a tiny model. Screenshots go to the test's folder (and to
``$ENGRAMLAB_SCREENSHOTS`` when set)."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import make_tiny

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
selenium = pytest.importorskip("selenium", reason="the browser test needs selenium "
                                                  "(pip install selenium)")

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
if not (BROWSER and DRIVER):
    pytest.skip("no Chromium / chromedriver found: install Debian's chromium and "
                "chromium-driver (make test does where apt is available) to run the browser "
                "test", allow_module_level=True)


def _start(app):
    """Serve ``app`` on a free local port in a thread: (url, stop)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        if time.time() > deadline:
            raise RuntimeError("the workbench did not start within 20 s")
        time.sleep(0.05)

    def stop() -> None:
        server.should_exit = True
        thread.join(10)

    return f"http://127.0.0.1:{port}", stop


@pytest.fixture(scope="module")
def served():
    from engramlab.serve import make_app

    lm = make_tiny("llama")
    url, stop = _start(make_app(lm))
    yield lm, url
    stop()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def _screenshot(driver, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    driver.save_screenshot(str(path))
    folder = os.environ.get("ENGRAMLAB_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(folder) / name)


def test_the_lens_page_shows_the_models_own_prediction_in_its_output_row(served, browser,
                                                                         tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    lm, url = served
    prompt = "w3 w1 w4 w1 w5"
    browser.get(f"{url}/lens")
    wait = WebDriverWait(browser, 20)
    wait.until(ec.text_to_be_present_in_element((By.ID, "model"), lm.label))
    box = browser.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(prompt, Keys.ENTER)
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "tr.output td")))
    shown = [td.text for td in browser.find_elements(By.CSS_SELECTOR, "tr.output td")]
    with torch.no_grad():
        logits = lm.model(**lm.tokenize(prompt)).logits[0]
    own = [lm.decode(int(i)).replace("\n", "\\n") or "␣" for i in logits.argmax(-1)]
    assert shown == own
    rows = browser.find_elements(By.CSS_SELECTOR, "#grid tr")
    assert len(rows) == 1 + lm.n_layers + 1  # header, the layers, the output
    _screenshot(browser, tmp_path, "lens.png")
    # bad input reaches the page as the server's reason, not as a broken grid
    box = browser.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(" ", Keys.ENTER)
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "empty"))
    _screenshot(browser, tmp_path, "lens_error.png")


def test_an_edit_made_on_the_page_shows_its_new_object(served, browser, tmp_path,
                                                       isolated_cache):
    import json

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.test_serve import TINY_ROME

    lm, url = served
    browser.get(f"{url}/edit")
    wait = WebDriverWait(browser, 60)
    wait.until(ec.text_to_be_present_in_element((By.ID, "model"), lm.label))
    fields = {"prompt": "w1 {} w2", "subject": "w5", "target_new": "w40", "target_true": "w60",
              "paraphrases": "w9 w5 w2", "neighbours": "w1 w6 w2",
              "settings": json.dumps(TINY_ROME)}
    for name, value in fields.items():
        box = browser.find_element(By.ID, name)
        box.clear()
        box.send_keys(value)
    browser.find_element(By.ID, "run").click()
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#generations td.after")))
    after = browser.find_elements(By.CSS_SELECTOR, "#generations td.after")[0].text
    assert after.split()[0] == "w40"
    efficacy_after = browser.find_elements(By.CSS_SELECTOR, "#scores tr")[2]
    assert efficacy_after.find_elements(By.TAG_NAME, "td")[0].text == "1.00"
    wait.until(ec.presence_of_element_located((By.LINK_TEXT, "view in lens")))
    browser.find_element(By.ID, "compare").click()  # one edit with itself: cosine 1
    wait.until(ec.text_to_be_present_in_element((By.ID, "cosine"), "1.000"))
    _screenshot(browser, tmp_path, "edit.png")
    # the edit seen through the lens: its output row now ends on the new object
    browser.find_element(By.LINK_TEXT, "view in lens").click()
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "tr.output td")))
    assert browser.find_elements(By.CSS_SELECTOR, "tr.output td")[-1].text == "w40"
    _screenshot(browser, tmp_path, "lens_edited.png")


def test_an_uploaded_concept_is_erased_from_the_page(served, browser, tmp_path,
                                                     isolated_cache):
    import json

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.test_erase import _known_probes

    lm, url = served
    concept = tmp_path / "tiny.json"
    concept.write_text(json.dumps({
        "name": "tiny", "probes": [{"prompt": p.prompt, "answer": p.answer}
                                   for p in _known_probes(lm, 8)],
        "text": ". ".join(" ".join(f"w{i + s}" for i in range(8)) for s in range(4))}))
    browser.get(f"{url}/erase")
    wait = WebDriverWait(browser, 60)
    wait.until(ec.text_to_be_present_in_element((By.ID, "model"), lm.label))
    browser.find_element(By.ID, "file").send_keys(str(concept))
    browser.find_element(By.ID, "method").send_keys("ga")
    relearn = browser.find_element(By.ID, "relearn")
    relearn.clear()
    relearn.send_keys("2")
    browser.find_element(By.ID, "settings").send_keys(
        json.dumps({"steps": 3, "lr": 1e-3, "tune": False}))
    browser.find_element(By.ID, "run").click()
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#summary")))
    first = browser.find_elements(By.CSS_SELECTOR, "#summary tr")[1]
    assert first.find_elements(By.TAG_NAME, "td")[1].text == "1.00"  # held-out, before
    assert "ga erasure of 'tiny'" in browser.find_element(By.TAG_NAME, "pre").text
    _screenshot(browser, tmp_path, "erase.png")


def test_a_fact_traced_from_the_page_shows_its_heatmap(served, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    lm, url = served
    browser.get(f"{url}/trace")
    wait = WebDriverWait(browser, 60)
    wait.until(ec.text_to_be_present_in_element((By.ID, "model"), lm.label))
    for name, value in (("prompt", "w3 {} w9 w4"), ("subject", "w7 w8"), ("samples", "2"),
                        ("window", "1")):
        box = browser.find_element(By.ID, name)
        box.clear()
        box.send_keys(value)
    browser.find_element(By.ID, "run").click()
    wait.until(ec.presence_of_element_located((By.ID, "heatmap")))
    img = browser.find_element(By.ID, "heatmap")
    assert img.get_attribute("src").startswith("data:image/png;base64,")
    assert browser.execute_script("return arguments[0].naturalWidth", img) > 100  # it decoded
    _screenshot(browser, tmp_path, "trace.png")


def test_the_neuron_page_pages_through_the_atlas(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from engramlab.inspect import build_atlas
    from engramlab.serve import make_app
    from tests.test_atlas import CONFIG, CORPUS

    lm = make_tiny("llama")
    book = build_atlas(lm, CORPUS, CONFIG)
    url, stop = _start(make_app(lm, atlas=book))
    try:
        browser.get(f"{url}/neurons")
        wait = WebDriverWait(browser, 30)
        wait.until(ec.text_to_be_present_in_element((By.ID, "headline"), "layer 0 neuron 0"))
        browser.find_element(By.ID, "next").click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "headline"), "layer 0 neuron 1"))
        marks = [m.text for m in browser.find_elements(By.CSS_SELECTOR, "#contexts mark")]
        assert marks == [c["token"].strip() for c in book.neuron(0, 1)["contexts"]]
        _screenshot(browser, tmp_path, "neurons.png")
    finally:
        stop()
