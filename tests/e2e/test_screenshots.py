"""Screenshots of a real store for the README, taken by the browser: run after `saescope demo`.

    SAESCOPE_SCREENSHOT_DB=sqlite:///saescope.db python -m pytest tests/e2e/test_screenshots.py

writes docs/screenshots/*.png: the home page, the SAE page, the feature pages the README
describes, and the live prompt page. Without SAESCOPE_SCREENSHOT_DB there is nothing real to
photograph, and the test is skipped.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.app.server_process import serving

pytestmark = pytest.mark.e2e

STORE = os.environ.get("SAESCOPE_SCREENSHOT_DB")
FEATURES = [int(i) for i in os.environ.get("SAESCOPE_SCREENSHOT_FEATURES", "3544,3079").split(",")]
PROMPT = "def is_even(n):\n    if n % 2 == 0:\n        return True\n    return False"
OUT = Path(__file__).resolve().parents[2] / "docs" / "screenshots"


@pytest.mark.skipif(not STORE, reason="set SAESCOPE_SCREENSHOT_DB to a store made by `saescope demo`")
def test_screenshots_of_a_real_store(page):
    OUT.mkdir(parents=True, exist_ok=True)
    with serving(STORE, "--live", timeout=180) as base:
        page.goto(base + "/")
        sae = page.locator("a[href^='/saes/']").first.get_attribute("href")
        page.screenshot(path=OUT / "home.png")
        page.goto(base + sae)
        page.screenshot(path=OUT / "sae.png")
        for index in FEATURES:
            page.goto(f"{base}{sae}/features/{index}")
            assert page.locator("[data-act]").count() > 0, "the feature page shows token heatmaps"
            page.screenshot(path=OUT / f"feature-{index}.png", full_page=False)
        page.goto(f"{base}{sae}/prompt")
        page.fill("#prompt-text", PROMPT)
        page.click("#prompt-form button[type=submit]")
        page.locator("table.ranked tbody tr").first.wait_for(timeout=120_000)
        page.screenshot(path=OUT / "prompt.png")
