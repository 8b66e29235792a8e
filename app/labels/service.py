"""The label endpoints' data functions: the write token, a human edit, a feature's label
history and label search, each returning the models of ``app.labels.schemas``.

A request without the right to write ends in ``Refused`` (403 when editing is off, 401
without the right bearer token); ``app.errors`` answers it like every other error.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.labels.query_embeddings import QueryEmbedder
from app.labels.schemas import (
    LabelHistoryPublic,
    LabelRecordPublic,
    LabelSearchPublic,
    ReleaseLabelSearchPublic,
    ReleaseSearchHitPublic,
    SearchHitPublic,
)
from sae_core.labels import embeddings
from sae_core.labels import search as label_search
from sae_core.labels.history import label_history, set_human_label
from sae_core.store.db import FeatureEmbeddingRow, LabelRow
from sae_core.store.lookup import find_feature, find_release, find_sae
from sae_core.store.releases import release_saes


def _record(row: LabelRow) -> LabelRecordPublic:
    return LabelRecordPublic(
        label=row.label,
        source=row.source,
        author=row.author,
        created_at=row.created_at,
        precision=row.precision,
        recall=row.recall,
        f1=row.f1,
        rule=row.rule,
    )


def save_human_label(
    *, session: Session, sae_name: str, index: int, label: str, author: str
) -> LabelRecordPublic:
    """Write the edit (and its embedding, when the SAE has embeddings to search)."""
    sae = find_sae(session, sae_name)
    find_feature(session, sae, index)
    row = set_human_label(session, sae=sae, idx=index, label=label, author=author)
    has_vectors = session.scalar(
        sa.select(FeatureEmbeddingRow.feature_idx)
        .where(FeatureEmbeddingRow.sae_id == sae.id)
        .limit(1)
    )
    if has_vectors is not None and embeddings.embedder_available():
        embeddings.embed_one(session, sae.id, index, row.source, row.label)
    session.commit()
    return _record(row)


def get_label_history(*, session: Session, sae_name: str, index: int) -> LabelHistoryPublic:
    rows = label_history(session, sae=find_sae(session, sae_name), idx=index)
    return LabelHistoryPublic(data=[_record(r) for r in rows], count=len(rows))


def search_labels(
    *,
    session: Session,
    sae_name: str,
    query: str,
    mode: label_search.SearchMode,
    sort: label_search.SearchSort,
    limit: int,
    embedder: QueryEmbedder | None,
) -> LabelSearchPublic:
    """``embedder`` (the app's queued, cached query embedder) is None where the embedding model
    is not installed: semantic search then falls back to the label text and says so."""
    sae = find_sae(session, sae_name)
    result = label_search.search_labels(
        session,
        sae_id=sae.id,
        query=query,
        mode=mode,
        sort=sort,
        limit=limit,
        embed_query=embedder.embed if embedder else embeddings.embed_query,
    )
    hits = [SearchHitPublic(**_hit_fields(h)) for h in result.hits]
    return LabelSearchPublic(mode=result.mode, note=result.note, data=hits, count=len(hits))


def search_release_labels(
    *,
    session: Session,
    release_name: str,
    query: str,
    mode: label_search.SearchMode,
    sort: label_search.SearchSort,
    limit: int,
    embedder: QueryEmbedder | None,
) -> ReleaseLabelSearchPublic:
    """``search_labels`` over every SAE of a release, with one query embedding from the same
    queued, cached embedder: the same queue, 503 and cache hold for a release as for one SAE."""
    release = find_release(session, release_name)
    saes = {s.id: s for s in release_saes(session, release.id)}
    result = label_search.search_release_labels(
        session,
        saes={sae_id: s.name for sae_id, s in saes.items()},
        query=query,
        mode=mode,
        sort=sort,
        limit=limit,
        embed_query=embedder.embed if embedder else embeddings.embed_query,
    )
    hits = [
        ReleaseSearchHitPublic(
            **_hit_fields(h.hit),
            sae=saes[h.sae_id].name,
            layer=saes[h.sae_id].layer,
            d_sae=saes[h.sae_id].d_sae,
        )
        for h in result.hits
    ]
    return ReleaseLabelSearchPublic(
        release=release.name, mode=result.mode, note=result.note, data=hits, count=len(hits)
    )


def _hit_fields(hit: label_search.SearchHit) -> dict:
    return {
        "index": hit.idx,
        "label": hit.label,
        "label_source": hit.label_source,
        "label_f1": hit.label_f1,
        "score": hit.score,
        "matched": hit.matched,
    }
