"""A real Chromium walks a researcher's path through ``saescope serve`` on a synthetic store:
home -> SAE -> search by label and by token -> feature page -> heatmap values -> neighbour ->
the JSON twin. Saves a screenshot of the feature page to test-artifacts/feature-page.png."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from sae_core.store.db import create_engine_for
from tests.app.server_process import serving
from tests.app.synthetic_store import SCRIPT, StoreSpec, SyntheticStore, build_synthetic_store

pytestmark = pytest.mark.e2e

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[str, SyntheticStore]:
    url = f"sqlite:///{tmp_path_factory.mktemp('e2e') / 'store.db'}"
    engine = create_engine_for(url)
    store = build_synthetic_store(engine, StoreSpec())
    engine.dispose()
    return url, store


@pytest.fixture(scope="module")
def server(planted) -> Iterator[str]:
    with serving(planted[0]) as base:
        yield base


def result_indices(page) -> list[int]:
    return [int(a.inner_text()) for a in page.locator("#results table.features td.num a").all()]


def test_a_researchers_path_through_the_browser(page, server, planted):
    from playwright.sync_api import expect

    _, store = planted
    sae = store.spec.sae_name

    page.goto(server + "/")
    page.get_by_role("link", name=sae).click()
    expect(page).to_have_url(f"{server}/saes/{sae}")

    # Search by label as you type: the list narrows without a page load, the address follows.
    page.keyboard.press("/")
    page.keyboard.type("capital cit")
    expect(page).to_have_url(re.compile(r"\?q=capital\+cit$"))
    labels = page.locator("#results td.label").all_inner_texts()
    assert labels and all("capital cities" in label for label in labels)

    # Search by token: features that fire on " Paris", ranked by the token index.
    page.locator("input[name=q]").fill("")
    page.locator("input[name=token]").fill("Paris")
    expect(page).to_have_url(re.compile(r"token=Paris"))
    expect(page.locator("#results table.features tbody tr")).to_have_count(
        len(store.paris_features)
    )
    assert result_indices(page) == list(store.paris_features)

    # The feature page: every heatmap token carries its activation; the marked token is the max.
    index = store.labelled_paris
    page.locator(f"#results a[href$='/features/{index}']").click()
    expect(page).to_have_url(f"{server}/saes/{sae}/features/{index}")
    feature = json.loads(page.request.get(f"{server}/api/v1/saes/{sae}/features/{index}").text())
    first = page.locator(".examples .ex").first
    values = [
        float(v) for v in first.locator(".t").evaluate_all("spans => spans.map(s => s.dataset.act)")
    ]
    assert len(values) == store.spec.ctx_len
    assert max(values) == pytest.approx(feature["top_examples"][0]["max_act"], rel=1e-3)
    assert float(first.locator(".t.max").get_attribute("data-act")) == pytest.approx(
        max(values), rel=1e-3
    )
    assert "·" in first.locator(".t.max").get_attribute("title")  # hover shows text and value

    # "more" swaps in the other top examples in place.
    top = page.locator(".examples section").first
    shown = top.locator(".ex").count()
    top.locator("button.more").click()
    expect(top.locator(".ex")).to_have_count(store.spec.n_top)
    assert shown < store.spec.n_top

    # Hovering a neighbour fetches its preview; the planted <script> shows as text.
    neighbour_row = page.locator(
        "table.nb tr", has=page.locator(f"a[href$='/features/{store.script_feature}']")
    )
    neighbour_row.first.hover()
    expect(neighbour_row.first.locator(".pv")).to_contain_text(SCRIPT)

    ARTIFACTS.mkdir(exist_ok=True)
    page.mouse.move(0, 0)
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(ARTIFACTS / "feature-page.png"))

    # Keyboard: j goes to the next feature, k back.
    page.keyboard.press("j")
    expect(page).to_have_url(f"{server}/saes/{sae}/features/{index + 1}")
    page.keyboard.press("k")
    expect(page).to_have_url(f"{server}/saes/{sae}/features/{index}")

    # A neighbour link leads to the neighbour's page; its JSON twin says the same.
    neighbour = feature["neighbours_cos"][0]["index"]
    page.locator(f"table.nb a[href$='/features/{neighbour}']").first.click()
    expect(page).to_have_url(f"{server}/saes/{sae}/features/{neighbour}")
    page.get_by_role("link", name="JSON").click()
    twin = json.loads(page.locator("pre").first.inner_text())
    assert (twin["sae"], twin["index"]) == (sae, neighbour)
