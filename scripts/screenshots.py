"""The workbench pictures in docs/serve/: the lens and edit pages on a real model, taken in
headless Chromium exactly as a user would see them.

Serves ``--model`` on a free local port, opens the lens page on a prompt, then makes the edit
page's default edit (The Eiffel Tower → Rome) with ROME and views it through the lens.

    .venv/bin/python scripts/screenshots.py [--model smollm2-135m] [--out docs/serve]

Needs Chromium and chromedriver (Debian: chromium, chromium-driver) and selenium.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default=str(ROOT / "docs" / "serve"))
    ap.add_argument("--prompt", default="The Eiffel Tower is located in the city of")
    args = ap.parse_args()
    browser_path, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser_path and driver_path):
        print("screenshots: error: needs chromium and chromedriver on PATH", file=sys.stderr)
        return 2
    import uvicorn
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    import engramlab as eg
    from engramlab.serve import make_app

    lm = eg.load_model(args.model, progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(lm), host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    options = webdriver.ChromeOptions()
    options.binary_location = browser_path
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1500,1050"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        wait = WebDriverWait(driver, 600)
        driver.get(f"{url}/lens?prompt={args.prompt}")
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "tr.output td")))
        driver.save_screenshot(str(out / "lens.png"))
        driver.get(f"{url}/edit")
        wait.until(ec.text_to_be_present_in_element((By.ID, "model"), lm.label))
        driver.find_element(By.ID, "run").click()
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#generations td.after")))
        driver.save_screenshot(str(out / "edit.png"))
        driver.find_element(By.LINK_TEXT, "view in lens").click()
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "tr.output td")))
        driver.save_screenshot(str(out / "lens_edited.png"))
    finally:
        driver.quit()
        server.should_exit = True
    print(f"wrote {', '.join(p.name for p in sorted(out.glob('*.png')))} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
