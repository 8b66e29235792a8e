"""A real Chromium edits a feature's label through the form on its page (static/labels.js puts the
typed token into the Authorization header; a refused edit shows why, in place)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from app.main import create_app
from app.settings import Settings
from sae_core.labels.run import LabelOptions, label_sae
from sae_core.store.db import create_engine_for
from tests.app.server_process import serving_app
from tests.label_fixtures import PARIS, write_planted_store

pytestmark = pytest.mark.e2e

TOKEN = "e2e-token"
SCRIPT = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[str, str]]:
    """The app over a labelled planted store, with editing on; yields (base URL, SAE name)."""
    store = write_planted_store(f"sqlite:///{tmp_path_factory.mktemp('label-e2e')}/store.db")
    engine = create_engine_for(store.url)
    label_sae(engine, store.sae_name, LabelOptions(embed=False, progress=False))
    engine.dispose()
    app = create_app(Settings(db_url=store.url, write_token=TOKEN, live=False))
    with serving_app(app) as base:
        yield base, store.sae_name


def _submit(page, label: str, token: str) -> None:
    page.click("#label-edit summary")
    page.fill("#label-edit input[name=label]", label)
    page.fill("#label-edit input[name=author]", "ada")
    page.fill("#label-edit input[name=token]", token)
    page.click("#label-edit button[type=submit]")


def test_wrong_token_is_refused_in_place(page, server):
    base, sae = server
    page.goto(f"{base}/saes/{sae}/features/{PARIS}")
    _submit(page, "nope", "wrong")
    page.locator("#label-edit p.error").wait_for()
    assert "write token" in page.locator("#label-edit p.error").inner_text()
    assert page.locator(".feature-label").inner_text().startswith("`Paris`")


def test_right_token_saves_and_the_page_shows_the_label_as_text(page, server):
    base, sae = server
    page.goto(f"{base}/saes/{sae}/features/{PARIS}")
    _submit(page, SCRIPT, TOKEN)
    page.wait_for_function(
        "document.querySelector('.feature-label').textContent.includes('alert(1)')"
    )
    assert page.locator(".feature-label").inner_text().startswith(SCRIPT)
    assert "human:ada" in page.locator(".feature-label").inner_text()
    # the page fixture fails this test if a dialog opened: the label is shown, never run
