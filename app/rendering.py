"""Jinja2 set-up (autoescaped, with the filters the templates use) and the page response helper."""

from __future__ import annotations

import functools
import html
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
from fastapi import Request
from fastapi.templating import Jinja2Templates
from markupsafe import Markup
from starlette.responses import Response

from app.charts import histogram_chart
from app.schemas import FeaturePublic, LabelPublic, MetricsPublic, SaePublic, TokensPublic

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES_DIR = ROOT / "templates"
STATIC_DIR = ROOT / "static"
HTMX = "htmx-2.0.4.min.js"  # vendored from the npm package htmx.org@2.0.4 (BSD-0)
SWAGGER_UI = "swagger-ui-5.35.0"  # swagger-ui-dist@5.35.0's bundle and css (Apache-2.0), for /docs

# Newlines and tabs are tokens too; show them rather than let them reflow the heatmap. Every
# other C0 control character and DEL shows as its control picture (ESC ␛, BEL ␇, DEL ␡): raw, it
# would be invisible, or act on a terminal the page is copied into.
_VISIBLE_WHITESPACE = str.maketrans(
    {code: 0x2400 + code for code in range(0x20)}
    | {0x7F: 0x2421}
    | {"\n": "↵", "\t": "⇥", "\r": "␍"}
)


def number(value: float | int | None, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, int) or (
        isinstance(value, float) and value.is_integer() and abs(value) >= 1000
    ):
        return f"{int(value):,}"
    return f"{value:.{digits}g}"


def percent(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.3g}%"


def token_text(text: str) -> str:
    return text.translate(_VISIBLE_WHITESPACE)


def shade(value: float, max_value: float) -> float:
    """Activation -> heatmap opacity in [0, 1], relative to the feature's max."""
    if max_value <= 0 or value <= 0:
        return 0.0
    return round(min(value / max_value, 1.0), 2)


@functools.lru_cache(maxsize=1 << 16)  # a vocabulary's worth: pages repeat the same tokens
def _shown_token(text: str) -> str:
    """A token's text as heatmap markup: whitespace made visible, then escaped (quotes too)."""
    return html.escape(token_text(text), quote=True)


@functools.lru_cache(maxsize=1 << 16)
def _quiet_span(text: str) -> str:
    """The span of a token where the feature did not fire (most tokens): the same for every page."""
    shown = _shown_token(text)
    return f'<span class="t" data-act="0" title="{shown} · 0">{shown}</span>'


def _span(text: str, values: list[float], max_value: float, marked: bool) -> str:
    """One token's span, or a character split across tokens: shaded by the strongest of their
    ``values``, each of which the title lists."""
    shown = _shown_token(text)
    css = "t max" if marked else "t"
    value = max(values)
    each = " / ".join(f"{v:.3g}" if v > 0 else "0" for v in values)
    if value > 0:
        return (
            f'<span class="{css}" data-act="{value:.4g}" style="--a:{shade(value, max_value)}"'
            f' title="{shown} · {each}">{shown}</span>'
        )
    return f'<span class="{css}" data-act="0" title="{shown} · {each}">{shown}</span>'


def heatmap(
    tokens: TokensPublic | Iterable[Any], max_value: float, max_pos: int | None = None
) -> Markup:
    """The token heatmap (``_partials/heatmap.html``), built here because pages hold thousands
    of tokens: one span per token, shaded by ``--a`` = value / max_value, its activation in
    ``data-act`` and, with its text, in ``title``; the token at ``max_pos`` is marked.
    ``tokens`` is a ``TokensPublic`` (parallel lists), or items or mappings with ``text`` and
    ``value``; their text is escaped. A token with no text of its own continues the character
    before it (``Vocabulary.texts_of``): the two share one span."""
    if isinstance(tokens, TokensPublic):
        texts, values = tokens.tokens, tokens.values
    else:
        items = list(tokens)
        if items and isinstance(items[0], Mapping):
            texts, values = [t["text"] for t in items], [t["value"] for t in items]
        else:
            texts, values = [t.text for t in items], [t.value for t in items]
    spans = list(map(_quiet_span, texts))
    for position, value in enumerate(values):
        if value > 0 or position == max_pos:
            spans[position] = _span(texts[position], [value], max_value, position == max_pos)
    for start, end in _split_characters(texts):
        spans[start:end] = [
            _span(texts[start], values[start:end], max_value, max_pos in range(start, end))
        ] + [""] * (end - start - 1)
    return Markup('<span class="hm">' + "".join(spans) + "</span>")


def _split_characters(texts: list[str]) -> list[tuple[int, int]]:
    """[start, end) of each run of a token and the text-less tokens that continue it."""
    runs = []
    for position in (p for p, text in enumerate(texts) if not text and p > 0):
        if runs and runs[-1][1] == position:
            runs[-1] = (runs[-1][0], position + 1)
        else:
            runs.append((position - 1, position + 1))
    return runs


def url_segment(value: Any) -> str:
    """One path segment, percent-encoded (``/`` included) so user data cannot change the route."""
    return quote(str(value), safe="")


def _hints(model) -> dict[str, str]:
    return {name: field.description or "" for name, field in model.model_fields.items()}


def make_templates() -> Jinja2Templates:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=True,
        # Templates ship with the code: without this, every render and include stats its file.
        auto_reload=False,
    )
    env.filters.update(num=number, pct=percent, tok=token_text, seg=url_segment)
    env.globals.update(
        heatmap=heatmap,
        histogram_chart=histogram_chart,
        htmx=HTMX,
        sae_hints=_hints(SaePublic),
        card_hints=_hints(MetricsPublic),
        feature_hints=_hints(FeaturePublic),
        label_hints=_hints(LabelPublic),
    )
    return Jinja2Templates(env=env)


def render(
    request: Request, template: str, context: dict[str, Any], *, alternate: str | None = None
) -> Response:
    """A page, with a ``Link: rel="alternate"`` header naming its JSON twin."""
    response = request.app.state.templates.TemplateResponse(request, template, context)
    if alternate:
        response.headers["Link"] = f'<{alternate}>; rel="alternate"; type="application/json"'
    return response
