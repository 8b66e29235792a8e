"""Releases in the browser: ``/api/v1/releases``, ``/api/v1/releases/{name}`` and the home page's
grid of layers by widths, on SQLite and Postgres."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from sae_core.store.db import create_engine_for
from tests.app.synthetic_store import StoreSpec, add_release, build_synthetic_store
from tests.conftest import postgres_schema

SPEC = StoreSpec(n_features=16, n_contexts=12)
RELEASE = "grid<b>"  # the store may hold any name; pages must escape it
CELLS = [(1, 16), (1, 64), (3, 16)]  # with the synthetic SAE (layer 2, 16 wide): a 3 x 2 grid


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def client(request, tmp_path_factory) -> Iterator[TestClient]:
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite:///{tmp_path_factory.mktemp('releases') / 'store.db'}"
        else:
            url = stack.enter_context(postgres_schema(request.getfixturevalue("pg_url"), "rel_app"))
        engine = create_engine_for(url)
        build_synthetic_store(engine, SPEC)
        add_release(engine, SPEC, RELEASE, CELLS)
        engine.dispose()
        app = create_app(Settings(db_url=url, live=False))
        with TestClient(app, raise_server_exceptions=False) as test_client:
            yield test_client


def test_releases_api_lists_each_release_with_its_grid(client):
    body = client.get("/api/v1/releases").json()
    assert body["count"] == 1
    [release] = body["data"]
    assert release["name"] == RELEASE and release["model"] == SPEC.model_name
    assert (release["layers"], release["widths"]) == ([1, 2, 3], [16, 64])
    cells = [(sae["layer"], sae["d_sae"]) for sae in release["saes"]]
    assert cells == [(1, 16), (1, 64), (2, 16), (3, 16)]  # by layer, then width
    assert all(sae["release"] == RELEASE for sae in release["saes"])
    assert client.get("/api/v1/releases/grid%3Cb%3E").json() == release
    assert release["saes"][0]["explained_variance"] == pytest.approx(0.5 + 0.1 + 0.016)


def test_unknown_release_is_a_404_naming_it(client):
    response = client.get("/api/v1/releases/nope")
    assert response.status_code == 404
    assert response.json() == {"detail": "no release named 'nope' in this store; see /api/v1/releases for the list"}


def test_saes_say_their_release(client):
    saes = client.get("/api/v1/saes").json()["data"]
    assert {sae["release"] for sae in saes} == {RELEASE}
    assert client.get(f"/api/v1/saes/{SPEC.sae_name}").json()["release"] == RELEASE


def test_home_page_shows_the_release_as_a_grid_of_layers_by_widths(client):
    html = client.get("/").text
    assert "grid&lt;b&gt;" in html and "grid<b>" not in html
    grid = html[html.index('<table class="saes release"') : html.index("</table>")]
    rows = grid.split("<tr>")[2:]  # after the header row
    assert len(rows) == 3 and grid.count("latents</th>") == 2
    assert f'href="/saes/{SPEC.sae_name}-l1-w64"' in rows[0]
    assert f'href="/saes/{SPEC.sae_name}"' in rows[1] and "EV 0.81" in rows[1]
    assert rows[2].count("–") == 1  # layer 3 has no 64-wide SAE
