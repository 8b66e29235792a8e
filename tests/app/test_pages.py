"""Pages and htmx fragments on SQLite and Postgres: content, JSON twins, fragments, errors."""

from __future__ import annotations

import re

import pytest

ALTERNATE = re.compile(r'^<(/api/v1/[^>]+)>; rel="alternate"; type="application/json"$')


def twin(response) -> str:
    match = ALTERNATE.match(response.headers["link"])
    assert match, response.headers.get("link")
    return match.group(1)


def test_home_lists_the_sae_with_its_json_twin(client, store):
    response = client.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert f'href="/saes/{store.sae}"' in response.text
    assert 'title="mean active latents per held-out token' in response.text  # the run's own words
    assert client.get(twin(response)).json()["count"] == 1


def test_sae_page_has_metrics_histogram_search_and_first_page_of_features(client, store):
    response = client.get(f"/saes/{store.sae}")
    assert response.status_code == 200
    html = response.text
    assert twin(response) == f"/api/v1/saes/{store.sae}"
    assert "<svg" in html and html.count("<rect") == 20 + 10  # density and label-F1 histograms
    assert (
        "held-out F1 of the features&#39; labels" in html
        or "held-out F1 of the features' labels" in html
    )
    assert 'hx-get="/saes/tiny-l1-topk/-/fragments/features"' in html
    assert (
        html.count(f'href="/saes/{store.sae}/features/') == store.spec.n_features
    )  # all fit in one page
    assert "explained variance" in html and "0.81" in html
    assert html.index("ΔCE") < html.index("explained variance")  # the headline comes first
    card = html[html.index('<table class="report-card">') :]
    assert "held out" in card and "other corpus" in card and "0.64" in card and "5 left out" in card
    assert "<script>alert(1)</script>" not in card and "&lt;script&gt;" in card  # a corpus name is escaped


def test_sae_page_applies_the_search_in_its_query(client, store):
    html = client.get(f"/saes/{store.sae}", params={"token": "Paris"}).text
    rows = re.findall(rf'href="/saes/{store.sae}/features/(\d+)"', html)
    assert [int(r) for r in rows] == list(store.planted.paris_features)
    assert 'value="Paris"' in html  # the form shows what was searched


def test_feature_rows_fragment_is_the_partial_alone(client, store):
    response = client.get(
        f"/saes/{store.sae}/-/fragments/features", params={"q": "capital", "limit": 2}
    )
    assert response.status_code == 200
    assert "<html" not in response.text and "<table" in response.text
    assert response.headers["hx-replace-url"] == f"/saes/{store.sae}?q=capital&limit=2"
    assert "offset=2" in response.text  # the pager's next link


def test_feature_page_renders_heatmaps_with_activation_values(client, store):
    index = store.planted.neighbour_pair[0]
    response = client.get(f"/saes/{store.sae}/features/{index}")
    assert response.status_code == 200
    html = response.text
    assert twin(response) == f"/api/v1/saes/{store.sae}/features/{index}"
    feature = client.get(twin(response)).json()
    spans = re.findall(r'<span class="t( max)?" data-act="([^"]+)"', html)
    n_examples = 10 + 3 * store.spec.n_bins  # the page's first top examples and samples per bin
    assert sum(1 for marked, _ in spans if marked) == n_examples
    assert len(spans) > n_examples * store.spec.ctx_len  # plus the neighbours' mini heatmaps
    peak = feature["top_examples"][0]
    assert f'data-act="{peak["max_act"]:.4g}"' in html
    assert f'<link rel="prev" href="/saes/{store.sae}/features/{index - 1}">' in html
    assert f'<link rel="next" href="/saes/{store.sae}/features/{index + 1}">' in html
    for neighbour in feature["neighbours_cos"] + feature["neighbours_coact"]:
        assert f'href="/saes/{store.sae}/features/{neighbour["index"]}"' in html
    assert f"{store.spec.n_top - 10} more" in html  # the button that fetches the other top examples


def test_first_and_last_feature_have_one_neighbour_link_each(client, store):
    first = client.get(f"/saes/{store.sae}/features/0").text
    last = client.get(f"/saes/{store.sae}/features/{store.spec.n_features - 1}").text
    assert 'rel="prev"' not in first and 'rel="next"' in first
    assert 'rel="next"' not in last and 'rel="prev"' in last


def test_examples_fragment_continues_where_the_page_stopped(client, store):
    url = f"/saes/{store.sae}/-/fragments/features/1/examples"
    response = client.get(url, params={"kind": "top", "offset": 10, "limit": 5})
    assert "<html" not in response.text
    assert response.text.count('class="t max"') == 5
    assert "offset=15" in response.text and "5 more" in response.text
    last = client.get(url, params={"kind": "top", "offset": 15, "limit": 5}).text
    assert last.count('class="t max"') == 5 and "more</button>" not in last
    one_bin = client.get(url, params={"kind": "interval", "bin": 1, "offset": 3}).text
    assert one_bin.count('class="t max"') == store.spec.per_bin - 3


def test_neighbour_preview_fragment(client, store):
    response = client.get(f"/saes/{store.sae}/-/fragments/features/1/preview")
    assert response.status_code == 200 and "<html" not in response.text
    assert (
        "capital cities like Paris" in response.text and response.text.count('class="t max"') == 3
    )


def test_jump_redirects_to_the_feature(client, store):
    response = client.get(f"/saes/{store.sae}/jump", params={"index": 7}, follow_redirects=False)
    assert (
        response.status_code == 303
        and response.headers["location"] == f"/saes/{store.sae}/features/7"
    )


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/saes/nope", 404),
        ("/saes/{sae}/features/48", 404),
        ("/saes/{sae}/features/-3", 422),
        ("/saes/{sae}?limit=0", 422),
        ("/saes/{sae}/jump?index=x", 422),
        ("/saes/{sae}/-/fragments/features/99/preview", 404),
        ("/no/such/page", 404),
    ],
)
def test_page_errors_are_friendly_html(client, store, path, status):
    response = client.get(path.format(sae=store.sae))
    assert response.status_code == status
    assert response.headers["content-type"].startswith("text/html")
    assert "<h1>" + str(status) + "</h1>" in response.text and "Traceback" not in response.text


def test_static_files_are_served(client):
    htmx = client.get("/static/htmx-2.0.4.min.js")
    assert htmx.status_code == 200 and htmx.text.startswith("var htmx=function()")
    assert "keydown" in client.get("/static/keys.js").text
