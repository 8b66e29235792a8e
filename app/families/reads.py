"""Reads of many features at once, in a few SAEs (a family drawing has ~30; a feature page's
previews of its neighbours and linked features), by statements built once, at import.

A statement built per request (an ``or_`` of an ``in_`` per SAE) costs ~1 ms of SQLAlchemy CPU
to build and key for its compiled cache, as much as SQLite's own work for it; a statement built
once and executed with new parameters skips both. It runs on the session's Core connection: its
rows are plain columns, which the ORM's result handling would only wrap again."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Sequence

import sqlalchemy as sa
from sqlalchemy.orm import Session

Node = tuple[int, int]  # (sae_id, feature index)


def by_sae(nodes: Collection[Node]) -> dict[int, list[int]]:
    """Feature indexes by SAE: a query per SAE, each on its (sae_id, index) primary key."""
    grouped = defaultdict(list)
    for sae_id, index in nodes:
        grouped[sae_id].append(index)
    return grouped


def of_nodes(sae_id: sa.ColumnElement, index: sa.ColumnElement) -> sa.ColumnElement[bool]:
    """The condition of a statement ``rows_of`` runs: one SAE's rows at the bound indexes."""
    return sa.and_(sae_id == sa.bindparam("sae_id"), index.in_(sa.bindparam("indexes", expanding=True)))


def rows_in(session: Session, statement: sa.Select, sae_id: int, indexes: list[int]) -> Sequence[sa.Row]:
    """The rows of ``statement`` (whose condition is ``of_nodes``) for one SAE's ``indexes``."""
    return session.connection().execute(statement, {"sae_id": sae_id, "indexes": indexes}).all()


def rows_of(session: Session, statement: sa.Select, nodes: Collection[Node]) -> list[sa.Row]:
    """``rows_in`` of every SAE of ``nodes``."""
    return [row for sae_id, indexes in by_sae(nodes).items() for row in rows_in(session, statement, sae_id, indexes)]
