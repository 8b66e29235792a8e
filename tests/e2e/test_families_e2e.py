"""A real Chromium through the family views of a synthetic release: the family panel -> the
family page (hover a node, click through) -> the feature map (hover a point, search, toggle a
width, click a point). Planted ``<script>`` labels must show as text and never run (the page
fixture fails on any dialog). Screenshots go to test-artifacts/family-page.png and map.png."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sae_core.store.db import create_engine_for
from tests.app.family_store import Family, build_family_store
from tests.app.server_process import serving
from tests.app.synthetic_store import SCRIPT

pytestmark = pytest.mark.e2e

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
FAMILY = Family()


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    url = f"sqlite:///{tmp_path_factory.mktemp('family-e2e') / 'store.db'}"
    engine = create_engine_for(url)
    build_family_store(engine)
    engine.dispose()
    with serving(url) as base:
        yield base


def test_from_the_family_panel_through_the_graph(page, server):
    from playwright.sync_api import expect

    sae, index = FAMILY.parent
    page.goto(f"{server}/saes/{sae}/features/{index}")
    panel = page.locator("section.family")
    expect(panel.locator("caption", has_text="children")).to_be_visible()
    expect(panel).to_contain_text(f"{SCRIPT} tags")  # the label, as text
    panel.get_by_role("link", name="graph ›").click()
    expect(page).to_have_url(f"{server}/saes/{sae}/features/{index}/family")

    nodes = page.locator("svg.family-graph a.node")
    expect(nodes).to_have_count(5)
    script_node = page.locator("svg.family-graph a.node[data-sae='tiny-96'][data-index='0'] title")
    assert script_node.text_content() == f"96:0 · {SCRIPT} tags · density " + script_node.text_content().split("density ")[1]
    page.locator("svg.family-graph a.node[data-index='10'] circle").hover()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "family-page.png"), full_page=True)

    # A stricter threshold drops the weakest child; then click through to the grandchild's family.
    page.locator("input[name=threshold]").fill("0.8")
    page.get_by_role("button", name="draw").click()
    expect(nodes).to_have_count(4)
    page.locator("svg.family-graph a.node[data-sae='tiny-192'][data-index='20'] circle").click()
    expect(page).to_have_url(f"{server}/saes/tiny-192/features/20/family?by=cosine&threshold=0.8")
    expect(page.locator("svg.family-graph a.node.focus[data-index='20']")).to_have_count(1)


def test_the_feature_map(page, server):
    from playwright.sync_api import expect

    page.goto(f"{server}/releases/{FAMILY.release}/map")
    canvas = page.locator("#map")
    expect(canvas).to_have_attribute("data-ready", "1")
    box = canvas.bounding_box()

    def point(sae: str, index: int) -> tuple[float, float]:
        x, y = page.evaluate(f"window.saescopeMap.screenOf(window.saescopeMap.find({sae!r}, {index}))")
        return box["x"] + x, box["y"] + y

    page.mouse.move(*point(*FAMILY.script_child))
    tip = page.locator("#map-tip")
    expect(tip).to_be_visible()
    assert tip.get_attribute("data-sae") and SCRIPT in tip.text_content()  # whichever point is nearest
    # zoom in around the parent, then pan: the point under the mouse follows
    x, y = point(*FAMILY.parent)
    page.mouse.move(x, y)
    page.mouse.wheel(0, -600)
    zoomed = point(*FAMILY.parent)
    assert abs(zoomed[0] - x) < 2 and abs(zoomed[1] - y) < 2  # zoom keeps the point under the mouse
    page.mouse.down()
    page.mouse.move(x + 40, y + 25, steps=4)
    page.mouse.up()
    panned = point(*FAMILY.parent)
    assert abs(panned[0] - x - 40) < 2 and abs(panned[1] - y - 25) < 2

    page.locator("#map-search").fill("capital cit")
    expect(page.locator("#map-found")).to_contain_text("match")
    page.locator(".map-width[value='2']").uncheck()  # hide the widest SAE
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "map.png"))

    sae, index = FAMILY.parent
    page.mouse.move(*point(sae, index))
    hovered = page.locator("#map-tip")
    target = (hovered.get_attribute("data-sae"), hovered.get_attribute("data-index"))
    page.mouse.click(*point(sae, index))
    expect(page).to_have_url(f"{server}/saes/{target[0]}/features/{target[1]}")
