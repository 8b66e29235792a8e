"""Feature search: label full text, features that fire on a token, filters, sorting, paging.

Label text goes through the store's full-text index (``sae_core.store.label_search``): every
word must match, the last one as a prefix so results follow typing. A query with no word
characters (e.g. ``(``) falls back to a case-insensitive substring match.
"""

from __future__ import annotations

from typing import NamedTuple

import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.queries import SUMMARY_COLUMNS, feature_summary
from app.schemas import FeatureSearch, FeaturesPublic
from app.store_cache import StoreCache, label_version, published
from app.vocab import get_vocabulary
from sae_core.store.db import FeatureRow, SaeRow, TokenFeatureRow
from sae_core.store.label_search import match_labels, query_words
from sae_core.store.lookup import find_sae

features = FeatureRow.__table__
token_features = TokenFeatureRow.__table__


def _label_match(
    stmt: sa.Select, q: str, dialect: str, *, ranked: bool
) -> tuple[sa.Select, sa.ColumnElement | None]:
    """Restrict ``stmt`` to labels holding every word of ``q`` (the last as a prefix, so results
    follow typing); with ``ranked``, also return a relevance column (higher first)."""
    words = query_words(q)
    if not words:
        contained = sa.func.lower(features.c.label).contains(q.strip().lower(), autoescape=True)
        return stmt.where(contained), None
    return match_labels(stmt, words, dialect, every_word=True, ranked=ranked)


def _token_match(
    stmt: sa.Select, sae_id: int, token_ids: list[int]
) -> tuple[sa.Select, sa.ColumnElement]:
    """Restrict ``stmt`` to features in the token index of ``token_ids``; relevance is the
    feature's mean activation on the token (the best of the token's spellings)."""
    on_token = (
        sa.select(
            token_features.c.feature_idx, sa.func.max(token_features.c.mean_act).label("token_act")
        )
        .where(token_features.c.sae_id == sae_id, token_features.c.token_id.in_(token_ids))
        .group_by(token_features.c.feature_idx)
        .subquery()
    )
    return stmt.join(on_token, on_token.c.feature_idx == features.c.idx), on_token.c.token_act


def _filters(search: FeatureSearch) -> list[sa.ColumnElement]:
    conditions = []
    if search.min_density is not None:
        conditions.append(features.c.density >= search.min_density)
    if search.max_density is not None:
        conditions.append(features.c.density <= search.max_density)
    if search.alive is not None:
        conditions.append(features.c.count > 0 if search.alive else features.c.count == 0)
    if search.min_max_act is not None:
        conditions.append(features.c.max_act >= search.min_max_act)
    if search.max_max_act is not None:
        conditions.append(features.c.max_act <= search.max_max_act)
    return conditions


def _sort_key(search: FeatureSearch, relevance: sa.ColumnElement | None) -> sa.ColumnElement:
    columns = {
        "index": features.c.idx,
        "density": features.c.density,
        "max_act": features.c.max_act,
        "label_score": features.c.label_f1,
        "relevance": relevance if relevance is not None else features.c.idx,
    }
    return columns[search.effective_sort()]


def _ordering(search: FeatureSearch, key: sa.ColumnElement, idx: sa.ColumnElement) -> list:
    """ORDER BY ``key`` in the search's order, then feature index."""
    ordered = key.asc() if search.effective_order() == "asc" else key.desc()
    if search.effective_sort() == "label_score":  # the only nullable key; elsewhere plain order
        ordered = sa.nulls_last(ordered)  # lets the index serve
    return [ordered, idx]


class Matching(NamedTuple):
    stmt: sa.Select  # SUMMARY_COLUMNS of the matching features, filtered and joined
    relevance: sa.ColumnElement | None  # higher is better; None when no ranking was asked for
    token_act: sa.ColumnElement | None  # mean activation on the searched token


def _matching(
    sae_id: int, search: FeatureSearch, token_ids: list[int] | None, dialect: str, *, ranked: bool
) -> Matching:
    stmt = sa.select(*SUMMARY_COLUMNS).where(features.c.sae_id == sae_id, *_filters(search))
    relevance = token_act = None
    if token_ids is not None:
        stmt, token_act = _token_match(stmt, sae_id, token_ids)
        relevance = token_act
    if search.q and search.q.strip():
        stmt, label_relevance = _label_match(
            stmt, search.q, dialect, ranked=ranked and relevance is None
        )
        relevance = relevance if relevance is not None else label_relevance
    return Matching(stmt, relevance, token_act)


def search_features(*, session: Session, sae_name: str, search: FeatureSearch) -> FeaturesPublic:
    """One page of the search's results. A label search sorts every match in the store's
    full-text index (~5-10 ms of SQLite's CPU at 16k features), and readers ask for the same few
    pages again and again (the first page of a word, the prefixes typed on the way to it), so
    pages are kept until a label changes: only labels change under a published SAE."""
    sae = find_sae(session, sae_name)
    asked = tuple(search.model_dump().items())
    found = _found.read(
        session, (published(sae), asked), label_version(session), lambda: _search(session, sae, search)
    )
    return FeaturesPublic(data=[feature_summary(values) for values in found.rows], count=found.total)


class Found(NamedTuple):
    """A page of results as plain values: tuples and dicts of numbers and strings, which the cycle
    collector stops tracking, so a full cache adds nothing to its passes (pydantic models would
    add two tracked objects per row)."""

    rows: tuple[dict, ...]  # SUMMARY_COLUMNS (and token_act) by name
    total: int  # matches before offset and limit


_found: StoreCache[Found] = StoreCache(size=1024)


def _search(session: Session, sae: SaeRow, search: FeatureSearch) -> Found:
    dialect = session.get_bind().dialect.name
    token_ids = None
    if search.token:
        token_ids = get_vocabulary(session, sae.model_id).find(search.token)
        if not token_ids:
            return Found(rows=(), total=0)
    stmt, relevance, token_act = _matching(
        sae.id, search, token_ids, dialect, ranked=search.effective_sort() == "relevance"
    )
    key = _sort_key(search, relevance)
    # The page is picked on narrow rows (index and sort key) and only its features' summary is
    # read: sorting every match of a label search with its text costs more than reading 50 again.
    picked_columns = [features.c.idx, key.label("key")]
    if token_act is not None:
        picked_columns.append(token_act.label("token_act"))
    # A label or token search visits every match to sort them, so the page query counts them
    # too; a plain listing walks an index and stops at the page, so it is counted on its own.
    counted_along = token_ids is not None or bool(search.q and search.q.strip())
    if counted_along:
        picked_columns.append(sa.func.count().over().label("total"))
    picked = (
        stmt.with_only_columns(*picked_columns)
        .order_by(*_ordering(search, key, features.c.idx))
        .offset(search.offset)
        .limit(search.limit)
        .subquery("page")
    )
    carried = [picked.c[name] for name in ("token_act", "total") if name in picked.c]
    page = (
        session.execute(
            sa.select(*SUMMARY_COLUMNS, *carried)
            .join(picked, sa.and_(features.c.sae_id == sae.id, features.c.idx == picked.c.idx))
            .order_by(*_ordering(search, picked.c.key, picked.c.idx))
        )
        .mappings()
        .all()
    )
    if counted_along and page:
        total = page[0]["total"]
    else:  # a listing, or a page past the last match
        counted = _matching(sae.id, search, token_ids, dialect, ranked=False).stmt
        total = session.scalar(
            sa.select(sa.func.count()).select_from(
                counted.with_only_columns(features.c.idx).subquery()
            )
        )
    return Found(rows=tuple(dict(values) for values in page), total=total or 0)
