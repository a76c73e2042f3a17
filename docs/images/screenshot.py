"""Remake serve-page.png, the README's picture of the page: `python docs/images/screenshot.py`.

Starts `fastldm serve` (the embedded RGBD model) on a free port, generates one image in Debian's headless
Chromium through Playwright (as tests/serve/test_page.py does) and saves the page once its 3-D view has loaded."""
from __future__ import annotations

import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

from fastldm.testing import server_process

PROMPT = "a red cube left of a blue sphere"
OUT = Path(__file__).with_name("serve-page.png")
ARGS = ["--no-sandbox", "--enable-unsafe-swiftshader", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update"]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, server_process(Path(tmp) / "server.log", "--threads", "1") as server:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
            page = browser.new_page(viewport={"width": 1200, "height": 760})
            page.goto(server.url + "/")
            page.get_by_label("Prompt", exact=True).fill(PROMPT)
            page.get_by_label("Size").fill("128x128")
            page.get_by_label("Steps").fill("30")
            page.get_by_label("Seed").fill("1")
            page.get_by_role("button", name="Generate").click()
            page.locator("model-viewer[data-loaded]").wait_for(timeout=300_000)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(OUT))
            browser.close()
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
