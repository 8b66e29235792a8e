"""A real Chromium builds a graph from the form, then hovers, clicks, pins, groups and exports,
on a graph whose labels carry <script> tags that must never run."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from app.main import create_app
from app.settings import Settings
from tests.app.server_process import serving_app
from tests.graph_support import RELEASE, build_graph_store

pytestmark = pytest.mark.e2e
PLANTED = "<script>alert('graph')</script>"


@pytest.fixture(scope="module")
def server(tmp_path_factory, llama_dir) -> Iterator[str]:
    url = build_graph_store(tmp_path_factory.mktemp("graph-e2e"))
    app = create_app(Settings(db_url=url, model=str(llama_dir), live=True))
    with serving_app(app) as base:
        yield base


def test_build_hover_click_pin_group_and_export(page, server):
    page.goto(f"{server}/releases/{RELEASE}/graphs")
    page.fill("#graph-prompt", "The quick brown fox")
    page.click("#graph-form button[type=submit]")
    page.wait_for_url(f"{server}/graphs/*", timeout=120_000)
    slug = page.url.rsplit("/", 1)[1]
    assert page.locator("#graph .node").count() >= 3

    # plant a <script> label on a layer-2 feature and open that graph (an import)
    document = page.request.get(f"{server}/api/v1/graphs/{slug}").json()
    node = next(
        n
        for n in document["nodes"]
        if n["feature_type"] == "cross layer transcoder" and n["layer"] == "2"
    )
    node["clerp"] = PLANTED
    imported = page.request.post(
        f"{server}/api/v1/releases/{RELEASE}/graphs/import",
        data=json.dumps(document),
        headers={"content-type": "application/json"},
    )
    assert imported.status == 201
    page.goto(server + imported.json()["url"])
    circle = page.locator(f'#graph circle[data-node="{node["node_id"]}"]')

    circle.hover()
    tip = page.locator("#graph-tip")
    assert tip.is_visible() and PLANTED in tip.inner_text()

    circle.click()
    panel = page.locator("#node-panel .node-panel")
    panel.wait_for()
    assert PLANTED in panel.locator(".node-label").inner_text()
    assert (
        panel.locator("a", has_text="feature page")
        .get_attribute("href")
        .endswith(f"/features/{node['feature']}")
    )

    panel.locator("button.pin").click()
    page.wait_for_url("**pin=*")
    assert page.locator(f'#graph circle.pinned[data-node="{node["node_id"]}"]').count() == 1

    # hide the pinned node's edges, then group two nodes
    page.locator(f'#graph circle[data-node="{node["node_id"]}"]').click()
    page.locator("#node-panel button.hide-edges").click()
    edges = page.locator(
        f'#graph line[data-target="{node["node_id"]}"], #graph line[data-source="{node["node_id"]}"]'
    )
    assert edges.count() >= 1 and not edges.first.is_visible()
    others = page.locator("#graph circle.feature")
    others.nth(0).click(modifiers=["Shift"])
    others.nth(1).click(modifiers=["Shift"])
    page.fill("#group-name", "my <b>group</b>")
    page.click("#group-button")
    page.wait_for_url("**group=*")
    assert page.locator(".group-tag").inner_text().startswith("my <b>group</b>")

    href = page.locator("#export").get_attribute("href")
    exported = page.request.get(server + href).json()
    assert exported["qParams"]["pinnedIds"] == [node["node_id"]]
    assert exported["qParams"]["supernodes"][0][0] == "my <b>group</b>"
    assert any(n["clerp"] == PLANTED for n in exported["nodes"])
