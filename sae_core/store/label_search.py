"""Full-text search over feature labels, on the index that migration 0001 builds.

SQLite matches through FTS5 (``features_fts``, an external-content table joined on ``rowid``);
Postgres through the GIN index on ``to_tsvector('simple', coalesce(label, ''))``. The user's text
is reduced to its words (``\\w+``) and each is quoted, so no character of a query reaches the FTS
syntax. Two ways to combine them, one per caller:

- ``every_word`` (browsing as one types): every word must match, the last one as a prefix;
- any word (the labels search's fallback from semantic search): ranked by how well they match.

Relevance is higher-is-better: FTS5's bm25 negated, or Postgres's ``ts_rank``.
"""

from __future__ import annotations

import re

import sqlalchemy as sa

from sae_core.store.db import FeatureRow

MAX_QUERY_WORDS = 16  # labels are a few words; more terms only slow the index down

features = FeatureRow.__table__
fts5 = sa.table("features_fts", sa.column("rowid"), sa.column("rank"), sa.column("features_fts"))
POSTGRES_LABEL_TSV = sa.literal_column("to_tsvector('simple', coalesce(features.label, ''))")


def query_words(q: str) -> list[str]:
    return re.findall(r"\w+", q)[:MAX_QUERY_WORDS]


def fts5_query(words: list[str], *, every_word: bool = True) -> str:
    """['capital', 'fra'] -> '"capital" "fra"*' (every word, the last as a prefix), or
    '"capital" OR "fra"' (any word)."""
    if every_word:
        return " ".join(f'"{w}"' for w in words) + "*"
    return " OR ".join(f'"{w}"' for w in words)


def tsquery(words: list[str], *, every_word: bool = True) -> str:
    """['capital', 'fra'] -> 'capital & fra:*', or 'capital | fra' (the words are \\w+ only, so
    nothing to escape)."""
    if every_word:
        return " & ".join(words) + ":*"
    return " | ".join(words)


def match_labels(
    stmt: sa.Select, words: list[str], dialect: str, *, every_word: bool, ranked: bool
) -> tuple[sa.Select, sa.ColumnElement | None]:
    """Restrict ``stmt`` (a select over ``features``) to features whose label matches ``words``
    (at least one); with ``ranked``, also return a relevance column (higher first). Ranking costs
    a score per match, so counting goes without it."""
    if dialect == "sqlite":
        # LIMIT -1 keeps SQLite from flattening the subquery into the join: the FTS match then
        # runs once, first, instead of once per feature of the SAE (~200x slower at 1k features).
        columns = [fts5.c.rowid.label("rid")] + ([fts5.c.rank.label("rank")] if ranked else [])
        matches = (
            sa.select(*columns)
            .where(fts5.c.features_fts.op("MATCH")(fts5_query(words, every_word=every_word)))
            .limit(-1)
            .subquery("label_matches")
        )
        stmt = stmt.join(matches, matches.c.rid == sa.literal_column("features.rowid"))
        return stmt, -matches.c.rank if ranked else None  # FTS5 rank is bm25, lower is better
    query = sa.func.to_tsquery(
        sa.literal_column("'simple'"), tsquery(words, every_word=every_word)
    )
    relevance = sa.func.ts_rank(POSTGRES_LABEL_TSV, query) if ranked else None
    return stmt.where(POSTGRES_LABEL_TSV.op("@@")(query)), relevance
