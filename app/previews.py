"""A feature seen in passing: a snippet of its top example around the max activation, with its
label and density (neighbour lists, family panels), read in one joined query."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.schemas import NeighbourPublic, TokensPublic
from app.vocab import Vocabulary, get_vocabulary
from sae_core.store.db import ContextRow, ExampleRow, FeatureRow, SaeRow, unpack_acts, unpack_tokens

# Tokens each side of a neighbour's max token: enough to read, small enough for a table row.
SNIPPET_RADIUS = 6

# An example's columns and its context's tokens: one joined query reads both.
EXAMPLE_COLUMNS = (
    ExampleRow.feature_idx,
    ExampleRow.context_id,
    ExampleRow.kind,
    ExampleRow.bin,
    ExampleRow.rank,
    ExampleRow.max_act,
    ExampleRow.max_pos,
    ExampleRow.acts,
    ContextRow.token_ids,
)
WITH_CONTEXT = sa.and_(
    ContextRow.sae_id == ExampleRow.sae_id, ContextRow.id == ExampleRow.context_id
)


def snippet(row: sa.Row, vocab: Vocabulary) -> TokensPublic:
    """The tokens of an example (a row of ``EXAMPLE_COLUMNS``) around its max activation."""
    token_ids = unpack_tokens(row.token_ids)
    values = unpack_acts(row.acts, row.max_act, len(token_ids)).round(4)
    window = slice(max(0, row.max_pos - SNIPPET_RADIUS), row.max_pos + SNIPPET_RADIUS + 1)
    ids = token_ids[window].tolist()
    return TokensPublic.model_construct(
        tokens=vocab.texts_of(ids), token_ids=ids, values=values[window].tolist()
    )


def neighbour_previews(
    session: Session, sae: SaeRow, lists: Sequence[list]
) -> list[list[NeighbourPublic]]:
    """Each [[idx, score], ...] list -> neighbours with label, density and a snippet of their top
    example: one query reads the features with their top example and its context."""
    wanted = sorted({int(i) for pairs in lists for i, _ in pairs})
    if not wanted:
        return [[] for _ in lists]
    is_top = sa.and_(
        ExampleRow.sae_id == FeatureRow.sae_id,
        ExampleRow.feature_idx == FeatureRow.idx,
        ExampleRow.kind == "top",
        ExampleRow.bin == 0,
        ExampleRow.rank == 0,
    )
    rows = session.execute(
        sa.select(FeatureRow.idx, FeatureRow.label, FeatureRow.label_f1, FeatureRow.density, *EXAMPLE_COLUMNS)
        .outerjoin(ExampleRow, is_top)
        .outerjoin(ContextRow, WITH_CONTEXT)
        .where(FeatureRow.sae_id == sae.id, FeatureRow.idx.in_(wanted))
    )
    known = {row.idx: row for row in rows}
    vocab = get_vocabulary(session, sae.model_id)

    def neighbour(idx: int, score: float) -> NeighbourPublic:
        row = known.get(idx)
        has_example = row is not None and row.token_ids is not None  # dead: no examples
        return NeighbourPublic(
            index=idx,
            score=score,
            label=row.label if row else None,
            density=row.density if row else None,
            snippet=snippet(row, vocab) if has_example else None,
            snippet_max=row.max_act if has_example else 0.0,
            label_f1=row.label_f1 if row else None,
        )

    return [[neighbour(int(i), float(s)) for i, s in pairs] for pairs in lists]
