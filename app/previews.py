"""A feature seen in passing: a snippet of its top example around the max activation, with its
label and density (neighbour lists, family panels), read by one joined statement per SAE."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.families.reads import of_nodes, rows_of
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
    session: Session, lists: Sequence[tuple[SaeRow | sa.Row, list]]
) -> list[list[NeighbourPublic]]:
    """Each (SAE, [[idx, score], ...]) -> neighbours with label, density and a snippet of their
    top example. They are read together, a prepared statement per SAE (``rows_of``), with their
    top example and its context: a feature page asks for its neighbours and its family panel's
    links into other SAEs at once."""
    wanted = {(sae.id, int(i)) for sae, pairs in lists for i, _ in pairs}
    known = {(row.sae_id, row.idx): row for row in rows_of(session, PREVIEWS_OF, wanted)}
    vocabs = {sae.model_id: get_vocabulary(session, sae.model_id) for sae, pairs in lists if pairs}

    def neighbour(sae: SaeRow | sa.Row, idx: int, score: float) -> NeighbourPublic:
        row = known.get((sae.id, idx))
        has_example = row is not None and row.token_ids is not None  # dead: no examples
        # Built from the store's typed columns (and a float score): nothing to validate.
        return NeighbourPublic.model_construct(
            index=idx,
            score=score,
            label=row.label if row else None,
            density=row.density if row else None,
            snippet=snippet(row, vocabs[sae.model_id]) if has_example else None,
            snippet_max=row.max_act if has_example else 0.0,
            label_f1=row.label_f1 if row else None,
        )

    return [[neighbour(sae, int(i), float(s)) for i, s in pairs] for sae, pairs in lists]


# A feature's top example: the one a preview shows.
IS_TOP = sa.and_(
    ExampleRow.sae_id == FeatureRow.sae_id,
    ExampleRow.feature_idx == FeatureRow.idx,
    ExampleRow.kind == "top",
    ExampleRow.bin == 0,
    ExampleRow.rank == 0,
)
# Features' label, density and top example with its context, by ``rows_of``.
PREVIEWS_OF = (
    sa.select(FeatureRow.sae_id, FeatureRow.idx, FeatureRow.label, FeatureRow.label_f1, FeatureRow.density, *EXAMPLE_COLUMNS)
    .outerjoin(ExampleRow, IS_TOP)
    .outerjoin(ContextRow, WITH_CONTEXT)
    .where(of_nodes(FeatureRow.sae_id, FeatureRow.idx))
)
