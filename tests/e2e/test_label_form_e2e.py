"""A real Chromium edits a feature's label through the form on its page (static/labels.js puts the
typed token into the Authorization header; a refused edit shows why, in place)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn

from app.main import create_app
from app.settings import Settings
from sae_core.labels import LabelOptions, label_sae
from sae_core.store import create_engine_for
from tests.label_fixtures import PARIS, write_planted_store

pytestmark = pytest.mark.e2e
playwright_sync = pytest.importorskip("playwright.sync_api")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
TOKEN = "e2e-token"
SCRIPT = "<script>alert(1)</script>"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[str, str]]:
    """The app over a labelled planted store, with editing on; yields (base URL, SAE name)."""
    store = write_planted_store(f"sqlite:///{tmp_path_factory.mktemp('label-e2e')}/store.db")
    engine = create_engine_for(store.url)
    label_sae(engine, store.sae_name, LabelOptions(embed=False, progress=False))
    engine.dispose()
    app = create_app(Settings(db_url=store.url, write_token=TOKEN, live=False))
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("the app server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", store.sae_name
    uv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def page(server) -> Iterator:
    with playwright_sync.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page()
        finally:
            browser.close()


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
    assert page.locator(".feature-label").inner_text().startswith('" Paris"')


def test_right_token_saves_and_the_page_shows_the_label_as_text(page, server):
    base, sae = server
    page.goto(f"{base}/saes/{sae}/features/{PARIS}")
    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    _submit(page, SCRIPT, TOKEN)
    page.wait_for_function(
        "document.querySelector('.feature-label').textContent.includes('alert(1)')"
    )
    assert page.locator(".feature-label").inner_text().startswith(SCRIPT)
    assert "human:ada" in page.locator(".feature-label").inner_text()
    assert dialogs == []  # the label is shown, never run
