"""A real Chromium types a prompt on the live page and sees ranked features and the heatmap."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from app.main import create_app
from app.settings import Settings
from tests.app.server_process import serving_app
from tests.graph_support import GRAPH_LAYERS, build_graph_store
from tests.live_support import LIVE_STORE, build_live_store, label_every_feature

pytestmark = pytest.mark.e2e
SAE = LIVE_STORE.sae_name


@pytest.fixture(scope="module")
def server(tmp_path_factory, llama_dir) -> Iterator[str]:
    """The app with live on, served by uvicorn in a thread; yields its base URL."""
    url = build_live_store(tmp_path_factory.mktemp("live-e2e"))
    app = create_app(Settings(db_url=url, model=str(llama_dir), live=True))
    with serving_app(app) as base:
        yield base


def test_typing_a_prompt_shows_ranked_features_and_the_heatmap(page, server):
    page.goto(f"{server}/saes/{SAE}/prompt")
    page.fill("#prompt-text", "Paris is the capital of France.")
    page.click("#prompt-form button[type=submit]")
    rows = page.locator("table.ranked tbody tr")
    rows.first.wait_for()
    assert rows.count() >= 2
    assert rows.first.locator("a").first.get_attribute("href").startswith(f"/saes/{SAE}/features/")
    first = page.locator("#hm-1")
    assert first.is_visible()
    shaded = first.locator(".hm .t[style]")
    assert shaded.count() >= 1 and "Paris" in first.locator(".hm").inner_text()
    # Choosing the second feature shades the prompt by it instead.
    rows.nth(1).locator("td.label label").click()
    assert page.locator("#hm-2").is_visible() and not first.is_visible()


def test_an_overlong_prompt_shows_the_limit(page, server):
    page.goto(f"{server}/saes/{SAE}/prompt")
    page.fill("#prompt-text", "Paris " * 400)
    page.click("#prompt-form button[type=submit]")
    error = page.locator("#prompt-result .live-error")
    error.wait_for()
    assert "at most 256" in error.inner_text()


@pytest.fixture(scope="module")
def release_server(tmp_path_factory, llama_dir) -> Iterator[str]:
    """A release of SAEs on three layers, its features labelled with a planted tag."""
    url = build_graph_store(tmp_path_factory.mktemp("release-e2e"))
    label_every_feature(url, "<script>alert(1)</script>")
    app = create_app(Settings(db_url=url, model=str(llama_dir), live=True))
    with serving_app(app) as base:
        yield base


def test_every_sae_of_the_release_on_the_prompt_page(page, release_server):
    page.goto(f"{release_server}/saes/{SAE}/prompt")
    page.fill("#prompt-text", "Paris <script>alert(2)</script> is the capital of France.")
    page.click("#release-form button[type=submit]")
    sections = page.locator("#release-result section.release-sae")
    sections.first.wait_for()
    assert sections.count() == len(GRAPH_LAYERS)
    labelled = page.locator(f'#release-result section[data-sae="{SAE}"] td.label').first
    assert labelled.inner_text().startswith("<script>alert(1)</script>")  # shown as text
    link = sections.first.locator("table.ranked a").first
    href = link.get_attribute("href")
    assert href.startswith("/saes/") and "/features/" in href
    link.click()
    page.wait_for_url(f"{release_server}{href}")
