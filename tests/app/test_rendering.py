"""The token heatmap markup, whichever form the tokens come in."""

from __future__ import annotations

import re
from types import SimpleNamespace

from app.rendering import heatmap
from app.schemas import TokensPublic

TEXTS = ["<b>", " a\n", " a\n", "&"]
VALUES = [0.0, 2.0, 0.0, 4.0]
MAPPINGS = [{"text": t, "value": v} for t, v in zip(TEXTS, VALUES, strict=True)]


def test_parallel_lists_items_and_mappings_give_the_same_heatmap():
    parallel = heatmap(TokensPublic(tokens=TEXTS, token_ids=[1, 2, 2, 3], values=VALUES), 4.0, 3)
    items = heatmap([SimpleNamespace(**m) for m in MAPPINGS], 4.0, 3)
    mappings = heatmap(MAPPINGS, 4.0, 3)
    assert parallel == items == mappings


def test_spans_carry_value_shade_and_escaped_text():
    html = str(heatmap(MAPPINGS, 4.0, 3))
    spans = re.findall(r'<span class="(t(?: max)?)" data-act="([^"]+)"([^>]*)>([^<]*)</span>', html)
    assert [act for _, act, _, _ in spans] == ["0", "2", "0", "4"]
    assert [css for css, _, _, _ in spans] == ["t", "t", "t", "t max"]
    assert 'style="--a:0.5"' in spans[1][2] and "style" not in spans[2][2]
    assert [text for _, _, _, text in spans] == ["&lt;b&gt;", " a↵", " a↵", "&amp;"]
    assert "<b>" not in html


def test_a_marked_token_that_did_not_fire_is_still_marked():
    html = str(heatmap([{"text": "x", "value": 0.0}, {"text": "y", "value": 0.0}], 1.0, 1))
    assert html.count('class="t max" data-act="0"') == 1 and html.count('class="t"') == 1
