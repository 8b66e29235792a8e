"""User data reaches HTML only escaped: the planted ``<script>alert(1)</script>`` (a vocabulary
token, a label, a metric's description, a URL) shows as text in every page and fragment."""

from __future__ import annotations

from urllib.parse import quote

import pytest

from tests.app.synthetic_store import SCRIPT

ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"

# Every page and fragment, each with where the planted text reaches it.
PAGES = [
    "/",  # the training run's description of L0
    "/saes/{sae}",  # label in the feature rows, L0's description
    "/saes/{sae}?q=script",
    "/saes/{sae}/features/0",  # label, example tokens, logit tokens
    "/saes/{sae}/features/1",  # feature 0 is a neighbour: its label
    "/saes/{sae}/-/fragments/features?q=tags",
    "/saes/{sae}/-/fragments/features/0/examples?offset=0",
    "/saes/{sae}/-/fragments/features/0/preview",
]


@pytest.mark.parametrize("path", PAGES)
def test_planted_script_shows_as_text(client, store, path):
    html = client.get(path.format(sae=store.sae)).text
    assert SCRIPT not in html
    assert ESCAPED in html


def test_error_page_repeats_an_unknown_name_escaped(client):
    markup = "<img src=x onerror=alert(1)>"
    response = client.get(f"/saes/{quote(markup, safe='')}")
    assert response.status_code == 404
    assert markup not in response.text and "&lt;img src=x onerror=alert(1)&gt;" in response.text


def test_token_search_with_markup_is_escaped_in_the_form(client, store):
    html = client.get(f"/saes/{store.sae}", params={"token": SCRIPT, "q": '"><b>'}).text
    assert SCRIPT not in html and '"><b>' not in html
    assert f'value="{ESCAPED}"' in html
