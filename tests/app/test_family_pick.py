"""The rule that picks the README's family screenshot finds the planted split, and only it."""

from __future__ import annotations

from sqlalchemy.orm import Session

from sae_core.store.db import create_engine_for, migrate
from tests.app.family_store import build_family_store
from tests.e2e import family_pick


def test_the_planted_parent_with_two_children_is_the_clear_split(tmp_path, monkeypatch):
    engine = create_engine_for(f"sqlite:///{tmp_path}/family.db")
    migrate(engine)
    family = build_family_store(engine)
    with Session(engine) as session:
        splits = family_pick.clear_splits(session, family.release)
        assert [(s.sae, s.index) for s in splits] == [family.parent]
        assert [(sae, index) for sae, index, _ in splits[0].children] == list(family.children[:2])
        monkeypatch.setattr(family_pick, "MAX_OVERLAP", 0.0)  # children that share tokens: none
        assert family_pick.clear_splits(session, family.release) == []
    engine.dispose()
