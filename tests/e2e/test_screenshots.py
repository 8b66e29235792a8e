"""Screenshots of a real store for the README, taken by the browser: run after `saescope demo`.

    SAESCOPE_SCREENSHOT_DB=sqlite:///saescope.db python -m pytest tests/e2e/test_screenshots.py

writes docs/screenshots/*.png: the home page, the SAE page, the feature pages the README
describes, and the live prompt page; for a store with a release (the demo's), a family whose
split is clear (picked by ``tests.e2e.family_pick``'s rule), the release's feature map, and the
attribution graph of a prompt whose answer is a fact. The graph is a job in the live model
process, so the store must be writable (a copy of the demo's): the graph is saved there and
reused by the next run. Without SAESCOPE_SCREENSHOT_DB there is nothing real to photograph, and
the tests are skipped.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy.orm import Session

from sae_core.store.db import create_engine_for
from tests.app.server_process import serving
from tests.e2e.family_pick import Split, clear_splits

pytestmark = pytest.mark.e2e

STORE = os.environ.get("SAESCOPE_SCREENSHOT_DB")
FEATURES = [int(i) for i in os.environ.get("SAESCOPE_SCREENSHOT_FEATURES", "3544,3079").split(",")]
# the SAE of the feature and prompt pages (default: the narrowest SAE that has every one of FEATURES;
# in the demo's release, the 4,096-wide one on block 15)
SAE = os.environ.get("SAESCOPE_SCREENSHOT_SAE")
PROMPT = "def is_even(n):\n    if n % 2 == 0:\n        return True\n    return False"
OUT = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
GRAPH_PROMPT = "The capital of France is"  # SmolLM2-135M answers " Paris": which features say so
GRAPH_WAIT_S = 900  # a 6-token graph over four SAE layers is tens of CPU seconds, more when shared
needs_store = pytest.mark.skipif(
    not STORE, reason="set SAESCOPE_SCREENSHOT_DB to a store made by `saescope demo`"
)


@needs_store
def test_screenshots_of_a_real_store(page):
    OUT.mkdir(parents=True, exist_ok=True)
    with serving(STORE, "--live", timeout=180) as base:
        page.goto(base + "/")
        page.screenshot(path=OUT / "home.png")
        sae = f"/saes/{SAE or pictured_sae(base)}"
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


def pictured_sae(base: str) -> str:
    saes = httpx.get(f"{base}/api/v1/saes").json()["data"]
    wide_enough = [sae for sae in saes if sae["d_sae"] > max(FEATURES)]
    assert wide_enough, f"no SAE has feature {max(FEATURES)}: set SAESCOPE_SCREENSHOT_FEATURES"
    return min(wide_enough, key=lambda sae: (sae["d_sae"], sae["name"]))["name"]


@pytest.fixture(scope="module")
def release_server() -> Iterator[tuple[str, dict]]:
    """One live server on the store for the release's pictures, and its largest release."""
    if not STORE:
        pytest.skip("set SAESCOPE_SCREENSHOT_DB to a store made by `saescope demo`")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SAESCOPE_GRAPH_TIMEOUT_S", str(GRAPH_WAIT_S))
        with serving(STORE, "--live", timeout=180) as base:
            releases = httpx.get(f"{base}/api/v1/releases").json()["data"]
            release = max(releases, key=lambda r: len(r["saes"]))
            assert len(release["saes"]) > 1, "the store holds no release of several SAEs"
            yield base, release


@pytest.fixture(scope="module")
def split(release_server) -> Split:
    """The release's clearest split (tests/e2e/family_pick.py's rule)."""
    _, release = release_server
    engine = create_engine_for(STORE, readonly=True)
    with Session(engine) as session:
        splits = clear_splits(session, release["name"])
    engine.dispose()
    assert splits, "no family of the release splits clearly (see tests/e2e/family_pick.py)"
    return splits[0]


@needs_store
def test_screenshot_of_a_family(page, release_server, split):
    base, _ = release_server
    OUT.mkdir(parents=True, exist_ok=True)
    page.set_viewport_size({"width": 1400, "height": 900})
    page.goto(f"{base}/saes/{split.sae}/features/{split.index}/family")
    drawn = page.locator("svg.family-graph circle")
    assert drawn.count() >= 3, "the parent and its two children are drawn"
    page.screenshot(path=OUT / "family.png", full_page=True)


@needs_store
def test_screenshot_of_the_map(page, release_server, split):
    base, release = release_server
    OUT.mkdir(parents=True, exist_ok=True)
    layer = next(s["layer"] for s in release["saes"] if s["name"] == split.sae)
    page.goto(f"{base}/releases/{release['name']}/map?layer={layer}")
    page.locator("#map").wait_for()
    words = [w for part in (split.label or "").split() for w in part.strip('`"').split("`/`") if w.isalpha()]
    page.fill("#map-search", max(words, key=len, default=""))  # the most specific word lights fewest
    page.wait_for_timeout(500)  # the canvas redraws on input
    page.screenshot(path=OUT / "map.png")


@needs_store
def test_screenshot_of_a_graph(page, release_server):
    base, release = release_server
    OUT.mkdir(parents=True, exist_ok=True)
    job = page.request.post(
        f"{base}/api/v1/releases/{release['name']}/graphs",
        data={"prompt": GRAPH_PROMPT},
        timeout=60_000,
    ).json()
    deadline = time.monotonic() + GRAPH_WAIT_S
    while job["state"] in ("queued", "running"):
        assert time.monotonic() < deadline, job
        time.sleep(2)
        job = page.request.get(base + job["url"]).json()
    assert job["state"] == "done", job
    page.set_viewport_size({"width": 1400, "height": 900})
    page.goto(base + job["graph_url"])
    strongest = page.eval_on_selector_all(
        "#graph circle.node.feature",
        "nodes => nodes.sort((a, b) => (+b.dataset.influence || 0) - (+a.dataset.influence || 0))[0].dataset.node",
    )
    page.locator(f'#graph circle[data-node="{strongest}"]').click()
    page.locator("#node-panel .node-panel").wait_for()
    page.screenshot(path=OUT / "graph.png", full_page=True)
