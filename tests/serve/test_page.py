"""The page at / in a real browser: Debian's headless Chromium (/usr/bin/chromium; .ci/run installs it) driven by
Playwright. Type a prompt, press Generate, see the live preview and then the image; the 3-D view loads its model
(the viewer's load event) and draws something; a bad size is explained in words; no console errors; usable with
the keyboard and at phone width."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .conftest import server_process

CHROMIUM = Path("/usr/bin/chromium")
# WebGL through SwiftShader; no background connections (this machine has no network: they would fail noisily).
ARGS = ["--no-sandbox", "--enable-unsafe-swiftshader", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROMPT = "a red cube left of a blue sphere"

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with server_process(tmp_path_factory.mktemp("page")) as proc:
        yield proc


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield browser
        browser.close()


def not_blank(png: bytes) -> bool:
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)
    return pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50


def test_generate_in_the_page(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    console = []
    page.on("console", lambda m: m.type == "error" and console.append(m.text))
    page.on("pageerror", lambda e: console.append(str(e)))
    page.goto(server.url + "/")
    page.get_by_label("Prompt", exact=True).fill(PROMPT)
    page.get_by_label("Size").fill("64x64")
    page.get_by_label("Steps").fill("40")
    page.get_by_label("Seed").fill("1")
    page.get_by_role("button", name="Generate").click()

    page.locator("#preview[src^='data:image/png']").wait_for(timeout=120_000)      # live preview from the events
    image = page.get_by_alt_text(PROMPT, exact=True)
    image.wait_for(timeout=120_000)
    assert page.evaluate("img => img.naturalWidth", image.element_handle()) == 64
    viewer = page.locator("model-viewer")
    assert viewer.get_attribute("alt") == f"3-D view: {PROMPT}"
    page.locator("model-viewer[data-loaded]").wait_for(timeout=120_000)           # its `load` event
    assert viewer.get_attribute("data-loaded") == "true" and page.evaluate("document.querySelector('model-viewer').loaded")
    page.wait_for_timeout(500)
    assert not_blank(viewer.screenshot())
    shot = page.screenshot(full_page=True)
    (tmp_path / "page.png").write_bytes(shot)
    assert not_blank(shot)
    settings = page.locator(".settings").first.inner_text()
    assert settings.startswith(PROMPT) and "Steps: 40" in settings and "Seed: 1" in settings
    assert page.get_by_role("link", name="Download PNG").get_attribute("href").endswith("/files/0.png")

    page.get_by_label("Size").fill("65x64")                     # keyboard: Ctrl+Enter in the prompt generates
    page.get_by_label("Prompt", exact=True).press("Control+Enter")
    error = page.get_by_role("alert")
    error.wait_for()
    assert "width=65" in error.inner_text() and "multiple of 8" in error.inner_text()

    page.set_viewport_size({"width": 390, "height": 844})       # phone width: nothing wider than the screen
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    assert console == []
