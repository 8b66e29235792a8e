"""The family panel, the family page and the feature map over a synthetic release (SQLite and
PostgreSQL): planted links come out as parents, children, nodes and edges, user text is escaped."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from sae_core.store.db import create_engine_for
from tests.app.family_store import Family, build_family_store
from tests.app.synthetic_store import SCRIPT
from tests.conftest import postgres_schema


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def family_url(request, tmp_path_factory) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('family') / 'store.db'}"
        engine = create_engine_for(url)
        build_family_store(engine)
        engine.dispose()
        yield url
        return
    with postgres_schema(request.getfixturevalue("pg_url"), "family") as url:
        engine = create_engine_for(url)
        build_family_store(engine)
        engine.dispose()
        yield url


@pytest.fixture(scope="module")
def client(family_url) -> Iterator[TestClient]:
    with TestClient(
        create_app(Settings(db_url=family_url, live=False)), raise_server_exceptions=False
    ) as c:
        yield c


FAMILY = Family()


def test_the_feature_json_names_parents_and_children(client):
    sae, index = FAMILY.parent
    family = client.get(f"/api/v1/saes/{sae}/features/{index}").json()["family"]
    assert family["release"] == FAMILY.release and family["parents"] == [] and family["peers"] == []
    children = [(c["sae"], c["feature"]["index"]) for c in family["children"]]
    assert children == list(FAMILY.children)  # by cosine; the weak link is not this feature's
    first = family["children"][0]
    assert (first["cosine"], first["n_both"], first["n_self"], first["n_other"]) == (
        0.91,
        50,
        100,
        60,
    )
    assert first["jaccard"] == pytest.approx(50 / (100 + 60 - 50))
    assert first["feature"]["label"] == f"{SCRIPT} tags" and first["feature"]["snippet"]
    sae, index = FAMILY.grandchild  # two parents, each with the other side's counts
    parents = client.get(f"/api/v1/saes/{sae}/features/{index}").json()["family"]["parents"]
    assert [(p["feature"]["index"], p["n_self"], p["n_other"]) for p in parents] == [
        (10, 25, 45),
        (11, 25, 35),
    ]


def test_a_feature_without_links_has_no_family(client):
    assert client.get("/api/v1/saes/tiny-48/features/3").json()["family"] is None
    page = client.get("/saes/tiny-48/features/3").text
    assert 'class="family"' not in page


def test_the_feature_page_shows_the_panel_escaped(client):
    sae, index = FAMILY.parent
    page = client.get(f"/saes/{sae}/features/{index}").text
    panel = page[page.index('<section class="family">') :]
    assert f'href="/saes/{sae}/features/{index}/family"' in panel
    for child_sae, child in FAMILY.children:
        assert f'href="/saes/{child_sae}/features/{child}"' in panel
    assert SCRIPT not in page and "&lt;script&gt;alert(1)&lt;/script&gt; tags" in panel


def test_the_family_graph_has_the_planted_nodes_and_edges(client):
    sae, index = FAMILY.parent
    response = client.get(f"/api/v1/saes/{sae}/features/{index}/family")
    assert response.status_code == 200
    graph = response.json()
    nodes = [(n["sae"], n["index"]) for n in graph["nodes"]]
    assert nodes == [FAMILY.parent, *FAMILY.children, FAMILY.grandchild]  # two hops, by width
    assert [n["focus"] for n in graph["nodes"]] == [True, False, False, False, False]
    assert [r[0] for r in graph["rows"]] == ["tiny-48", "tiny-96", "tiny-192"]
    edges = {(e["source"], e["target"]): e["weight"] for e in graph["edges"]}
    assert edges == {(0, 1): 0.91, (0, 2): 0.85, (0, 3): 0.62, (2, 4): 0.80, (3, 4): 0.70}
    assert {s["child"]: s["parent"] for s in graph["splits"]} == {1: 0, 2: 0, 3: 0, 4: 2}
    # thresholds and the other measure
    strict = client.get(
        f"/api/v1/saes/{sae}/features/{index}/family", params={"threshold": 0.8}
    ).json()
    assert [(n["sae"], n["index"]) for n in strict["nodes"]] == [
        FAMILY.parent,
        ("tiny-96", 0),
        ("tiny-96", 10),
        FAMILY.grandchild,
    ]
    params = {
        "by": "jaccard",
        "threshold": 0.35,
    }  # 50/110 and 40/105 from the parent, 20/50 from 96:10
    by_jaccard = client.get(f"/api/v1/saes/{sae}/features/{index}/family", params=params).json()
    assert [(n["sae"], n["index"]) for n in by_jaccard["nodes"]] == [
        FAMILY.parent,
        ("tiny-96", 0),
        ("tiny-96", 10),
        FAMILY.grandchild,
    ]
    assert {(e["source"], e["target"]) for e in by_jaccard["edges"]} == {(0, 1), (0, 2), (2, 3)}
    assert all(e["weight"] == pytest.approx(e["jaccard"]) for e in by_jaccard["edges"])


def test_the_family_page_draws_an_escaped_svg(client):
    sae, index = FAMILY.parent
    response = client.get(f"/saes/{sae}/features/{index}/family")
    assert response.status_code == 200
    assert response.headers["link"].startswith(
        f"</api/v1/saes/{sae}/features/{index}/family?by=cosine"
    )
    page = response.text
    svg = page[page.index("<svg") : page.index("</svg>")]
    assert svg.count("<circle") == 5 and svg.count('<line class="edge"') == 5
    assert SCRIPT not in page and "<title>96:0 · &lt;script&gt;alert(1)&lt;/script&gt; tags" in svg
    assert 'class="node focus"' in svg
    assert re.search(r'href="/saes/tiny-192/features/20/family\?by=cosine&amp;threshold=0.4"', svg)


@pytest.mark.parametrize(
    "url, status",
    [
        ("/api/v1/saes/tiny-48/features/999/family", 404),
        ("/api/v1/saes/nope/features/1/family", 404),
        ("/api/v1/saes/tiny-48/features/1/family?threshold=2", 422),
        ("/api/v1/saes/tiny-48/features/1/family?by=dot", 422),
        ("/saes/tiny-48/features/999/family", 404),
        ("/api/v1/releases/nope/map", 404),
        ("/api/v1/releases/tiny-release/map?layer=7", 404),
        ("/releases/nope/map", 404),
    ],
)
def test_family_and_map_errors(client, url, status):
    response = client.get(url)
    assert response.status_code == status
    if url.startswith("/api/"):
        assert response.json()["detail"]


def test_the_map_json_is_columnar_and_complete(client):
    points = client.get(f"/api/v1/releases/{FAMILY.release}/map").json()
    assert points["layer"] == 2 and points["layers"] == [2]
    assert [s["d_sae"] for s in points["saes"]] == [48, 96, 192]
    n = 48 + 96 + 192
    assert all(len(points[k]) == n for k in ("sae", "index", "x", "y", "density", "label"))
    assert points["label"][points["index"].index(0)] == f"{SCRIPT} tags"


def test_the_map_json_is_gzipped_when_accepted_and_304_when_unchanged(client):
    url = f"/api/v1/releases/{FAMILY.release}/map"
    plain = client.get(url, headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers
    zipped = client.get(url, headers={"Accept-Encoding": "br, gzip;q=0.8"})
    assert zipped.headers["content-encoding"] == "gzip"
    assert int(zipped.headers["content-length"]) < len(plain.content) / 2
    assert zipped.json() == plain.json() and zipped.headers["etag"] == plain.headers["etag"]
    refused = client.get(url, headers={"Accept-Encoding": "gzip;q=0"})
    assert "content-encoding" not in refused.headers
    again = client.get(url, headers={"If-None-Match": plain.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    assert client.get(url, headers={"If-None-Match": '"stale"'}).status_code == 200


def test_the_map_page_embeds_its_points_escaped(client):
    response = client.get(f"/releases/{FAMILY.release}/map")
    assert response.status_code == 200
    page = response.text
    assert SCRIPT not in page
    data = page[
        page.index('id="map-data">') + len('id="map-data">') : page.index(
            "</script>", page.index('id="map-data">')
        )
    ]
    assert "\\u003cscript\\u003ealert(1)\\u003c/script\\u003e tags" in data
    assert len(json.loads(data)["index"]) == 48 + 96 + 192


def test_a_search_over_the_release_names_each_sae(client):
    found = client.get(
        f"/api/v1/releases/{FAMILY.release}/features", params={"q": "capital cit", "limit": 5}
    ).json()
    assert [s["sae"] for s in found["saes"]] == ["tiny-48", "tiny-96", "tiny-192"]
    for sae in found["saes"]:
        one = client.get(
            f"/api/v1/saes/{sae['sae']}/features", params={"q": "capital cit", "limit": 5}
        ).json()
        assert sae["results"] == one and one["count"] > 0  # the same as searching that SAE alone
    by_token = client.get(
        f"/api/v1/releases/{FAMILY.release}/features", params={"token": "Paris"}
    ).json()
    assert all([f["index"] for f in s["results"]["data"]] == [3, 1, 2] for s in by_token["saes"])
    assert client.get("/api/v1/releases/nope/features", params={"q": "x"}).status_code == 404


def test_the_map_is_built_once_and_rebuilt_when_a_label_changes(tmp_path):
    """The served map is cached per store; a label written by any process (here: straight into
    the store, as `saescope label` would) and a map written again show in the next answer. It is
    built as a worker starts."""
    import sqlalchemy as sa
    from sqlalchemy.orm import Session

    from app.families import map as feature_map
    from sae_core.labels.history import set_human_label
    from sae_core.store.db import SaeRow
    from sae_core.store.families import FeatureMapRow, mark_mapped
    from sae_core.store.lookup import find_sae

    url = f"sqlite:///{tmp_path / 'store.db'}"
    engine = create_engine_for(url)
    build_family_store(engine)
    built = []
    real_build = feature_map._build_map

    def counting_build(*args):
        built.append(args[2:4])
        return real_build(*args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(feature_map, "_build_map", counting_build)
        with TestClient(create_app(Settings(db_url=url, live=False))) as client:
            assert len(built) == 1  # built as the worker started, before anyone asked
            first = client.get(f"/api/v1/releases/{FAMILY.release}/map").json()
            assert client.get(f"/api/v1/releases/{FAMILY.release}/map").json() == first
            assert client.get(f"/releases/{FAMILY.release}/map").status_code == 200
            assert len(built) == 1  # the API twice and the page: served from the start-up build
            sae, index = FAMILY.parent
            with Session(engine) as session:
                set_human_label(
                    session,
                    sae=find_sae(session, sae),
                    idx=index,
                    label="relabelled by hand",
                    author="test",
                )
                session.commit()
            again = client.get(f"/api/v1/releases/{FAMILY.release}/map").json()
            position = next(
                i
                for i, (s, f) in enumerate(zip(again["sae"], again["index"], strict=True))
                if again["saes"][s]["name"] == sae and f == index
            )
            assert again["label"][position] == "relabelled by hand" and len(built) == 2
            with engine.begin() as conn:  # the map written again (as `saescope families` does)
                conn.execute(sa.update(FeatureMapRow).values(x=FeatureMapRow.y, y=FeatureMapRow.x))
                mark_mapped(conn, conn.scalars(sa.select(SaeRow.id)).all())
            moved = client.get(f"/api/v1/releases/{FAMILY.release}/map").json()
            assert moved["x"] == again["y"] and len(built) == 3
    engine.dispose()
