"""/api/v1 on SQLite and Postgres: shapes, numbers read back from the store, 404s and 422s."""

from __future__ import annotations

import re

import pytest
import sqlalchemy as sa

from sae_core.store.db import FeatureRow, create_engine_for
from tests.app.synthetic_store import SCRIPT


def test_saes_list_reports_metrics_and_fractions_measured_on_the_store(client, store):
    body = client.get("/api/v1/saes").json()
    assert body["count"] == 1
    (sae,) = body["data"]
    assert sae["name"] == store.sae
    assert sae["model"] == store.spec.model_name
    assert (sae["d_sae"], sae["k"], sae["architecture"]) == (store.spec.n_features, 8, "topk")
    assert sae["explained_variance"] == pytest.approx(0.81)
    assert sae["train_tokens"] == 1_000_000
    assert sae["dead_fraction"] == pytest.approx(
        len(store.planted.dead_features) / store.spec.n_features
    )
    assert set(sae["metrics_how"]) == {"l0"}
    assert (sae["delta_ce"], sae["kl_div"]) == (pytest.approx(0.12), pytest.approx(0.2))
    held_out, other = sae["report_card"]
    assert (held_out["role"], held_out["corpus"], held_out["explained_variance"]) == ("held out", "synthetic", 0.81)
    assert (other["role"], other["delta_ce"], other["n_massive_tokens"]) == ("other corpus", 0.4, 5)
    assert sum(sae["density_hist"]["counts"]) == store.spec.n_features - len(
        store.planted.dead_features
    )


def test_one_sae_and_unknown_sae(client, store):
    sae = client.get(f"/api/v1/saes/{store.sae}").json()
    assert sae["name"] == store.sae
    with create_engine_for(store.url).connect() as conn:
        f1s = conn.scalars(
            sa.select(FeatureRow.label_f1).where(
                FeatureRow.count > 0, FeatureRow.label_f1.is_not(None)
            )
        ).all()
    hist = sae["label_f1_hist"]
    assert sum(hist["counts"]) == len(f1s) > 0 and hist["edges"][0] == 0 and hist["edges"][-1] == 1
    assert hist["counts"][3] == sum(0.3 <= f < 0.4 for f in f1s)
    assert client.get("/api/v1/saes").json()["data"][0]["label_f1_hist"] is None  # page only
    response = client.get("/api/v1/saes/no-such-sae")
    assert response.status_code == 404
    assert "no SAE named 'no-such-sae'" in response.json()["detail"]


def test_feature_holds_examples_intervals_logits_and_linked_neighbours(client, store):
    a, b = store.planted.neighbour_pair
    feature = client.get(f"/api/v1/saes/{store.sae}/features/{a}").json()
    spec = store.spec
    assert (feature["index"], feature["prev_index"], feature["next_index"]) == (a, a - 1, a + 1)
    assert len(feature["top_examples"]) == feature["n_top_examples"] == spec.n_top
    maxima = [e["max_act"] for e in feature["top_examples"]]
    assert maxima == sorted(maxima, reverse=True)
    assert maxima[0] == pytest.approx(feature["max_act"])
    for example in feature["top_examples"]:
        assert (
            len(example["tokens"])
            == len(example["token_ids"])
            == len(example["values"])
            == spec.ctx_len
        )
        peak = example["values"][example["max_pos"]]
        assert peak == pytest.approx(example["max_act"], rel=1e-3)  # the max is stored at level 255
        assert max(example["values"]) == peak
    assert [i["bin"] for i in feature["intervals"]] == list(reversed(range(spec.n_bins)))
    assert all(len(i["examples"]) == i["n_examples"] == spec.per_bin for i in feature["intervals"])
    assert len(feature["logit_top"]) == 10 and feature["logit_top"][0]["value"] == pytest.approx(
        1.0
    )
    first = feature["neighbours_cos"][0]
    neighbour = client.get(f"/api/v1/saes/{store.sae}/features/{b}").json()
    assert first["index"] == b and first["label"] == neighbour["label"]["text"]
    assert first["snippet_max"] == pytest.approx(neighbour["max_act"])
    assert 0 < len(first["snippet"]["tokens"]) <= 13


def test_neighbour_snippets_are_their_top_example_around_its_max(client, store):
    """Alive neighbours show their strongest example's tokens around its peak; dead ones none."""
    checked = {"alive": 0, "dead": 0}
    for index in range(8):
        feature = client.get(f"/api/v1/saes/{store.sae}/features/{index}").json()
        for n in feature["neighbours_cos"] + feature["neighbours_coact"]:
            if store.planted.dead(n["index"]):
                assert (n["snippet"], n["snippet_max"], n["density"]) == (None, 0.0, 0.0)
                checked["dead"] += 1
                continue
            url = f"/api/v1/saes/{store.sae}/features/{n['index']}/examples?limit=1"
            top = client.get(url).json()["data"][0]
            window = slice(max(0, top["max_pos"] - 6), top["max_pos"] + 7)
            assert n["snippet"] == {k: top[k][window] for k in ("tokens", "token_ids", "values")}
            assert n["snippet_max"] == top["max_act"]
            checked["alive"] += 1
    assert checked["alive"] and checked["dead"]


def test_feature_example_limits(client, store):
    feature = client.get(f"/api/v1/saes/{store.sae}/features/1?top_limit=3&interval_limit=1").json()
    assert len(feature["top_examples"]) == 3 and feature["n_top_examples"] == store.spec.n_top
    assert all(len(i["examples"]) == 1 for i in feature["intervals"])


def test_token_text_comes_from_the_stored_vocabulary(client, store):
    feature = client.get(f"/api/v1/saes/{store.sae}/features/{store.planted.script_feature}").json()
    assert feature["logit_top"][0]["text"] == SCRIPT
    assert any(SCRIPT in e["tokens"] for e in feature["top_examples"])
    assert feature["label"]["text"].startswith(SCRIPT)


def test_dead_feature_has_no_examples(client, store):
    dead = store.planted.dead_features[0]
    feature = client.get(f"/api/v1/saes/{store.sae}/features/{dead}").json()
    assert feature["count"] == 0 and feature["top_examples"] == [] and feature["intervals"] == []


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/features/48", 404),  # one past the last feature
        ("/features/100000", 404),
        ("/features/-1", 422),
        ("/features/abc", 422),
        ("/features/1?top_limit=-1", 422),
        ("/features/1/examples?kind=bogus", 422),
        ("/features/1/examples?limit=0", 422),
        ("/features/48/examples", 404),
        ("/features/48/preview", 404),
    ],
)
def test_bad_feature_requests_answer_json_errors(client, store, path, status):
    response = client.get(f"/api/v1/saes/{store.sae}{path}")
    assert response.status_code == status
    assert isinstance(response.json()["detail"], str) and response.json()["detail"]


def test_examples_are_paginated_and_filtered_by_bin(client, store):
    url = f"/api/v1/saes/{store.sae}/features/1/examples"
    first = client.get(url, params={"limit": 5}).json()
    rest = client.get(url, params={"offset": 5, "limit": 100}).json()
    assert first["count"] == rest["count"] == store.spec.n_top
    assert [e["rank"] for e in first["data"] + rest["data"]] == list(range(store.spec.n_top))
    one_bin = client.get(url, params={"kind": "interval", "bin": 2}).json()
    assert one_bin["count"] == store.spec.per_bin and {e["bin"] for e in one_bin["data"]} == {2}


def test_preview_has_the_summary_and_the_strongest_examples(client, store):
    preview = client.get(f"/api/v1/saes/{store.sae}/features/1/preview").json()
    assert (
        preview["feature"]["index"] == 1
        and preview["feature"]["label"] == "capital cities like Paris"
    )
    assert [e["rank"] for e in preview["examples"]] == [0, 1, 2]


def test_openapi_documents_the_api_with_schemas_named_by_role(client):
    schema = client.get("/openapi.json").json()
    assert "/api/v1/saes/{sae}/features/{index}" in schema["paths"]
    assert {"FeaturePublic", "FeaturesPublic", "SaePublic", "ExamplePublic"} <= set(
        schema["components"]["schemas"]
    )
    assert not any(
        path.startswith("/saes") for path in schema["paths"]
    )  # pages stay out of the API docs
    docs = client.get("/docs")
    assert docs.status_code == 200 and "cdn" not in docs.text  # works offline
    for asset in re.findall(r'(?:src|href)="(/static/[^"]+)"', docs.text):
        assert client.get(asset).status_code == 200, asset


def test_unknown_api_path_is_a_json_404(client):
    response = client.get("/api/v1/nothing-here")
    assert response.status_code == 404 and response.json() == {"detail": "Not Found"}
