"""The store: Alembic migrations on SQLite and PostgreSQL, older stores upgraded, newer refused,
the label full-text index kept in sync, packed arrays round-trip."""

from __future__ import annotations

import numpy as np
import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy.orm import Session

from sae_core.store.db import (
    FeatureRow,
    FeatureWordRow,
    SaeRow,
    StoreError,
    alembic_config,
    create_engine_for,
    driver_rows,
    migrate,
    pack_acts,
    pack_tokens,
    schema_revision,
    unpack_acts,
    unpack_tokens,
)
from sae_core.store.releases import (
    claim_release,
    get_release,
    join_release,
    list_releases,
    release_saes,
)

HEAD = "0010"


def seed_rows(conn) -> None:
    conn.exec_driver_sql(
        "insert into subject_models (id, name, source, architecture, d_model, n_layers, vocab_size, created_at) "
        "values (1, 'm', 's', 'llama', 8, 2, 10, CURRENT_TIMESTAMP)"
    )
    conn.exec_driver_sql(
        "insert into saes (id, name, model_id, layer, hook_name, architecture, d_in, d_sae, path, train_cfg, metrics, "
        "corpus, precompute_cfg, n_tokens, density_hist, status, created_at) values (1, 'sae', 1, 0, 'h', 'topk', 8, 4, "
        "'p', '{}', '{}', '{}', '{}', 0, '{}', 'complete', CURRENT_TIMESTAMP)"
    )
    conn.exec_driver_sql(
        "insert into features (sae_id, idx, count, density, max_act, mean_act, act_hist, intervals, logit_top, "
        "logit_bottom, logit_hist, neighbours_cos, neighbours_coact, label) values "
        "(1, 0, 1, 0.1, 1.0, 1.0, '{}', '[]', '[]', '[]', '{}', '[]', '[]', 'French city names')"
    )


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'store.db'}"


def upgrade_to(engine, revision: str) -> None:
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), revision)


def check_migrations(url: str) -> None:
    engine = create_engine_for(url)
    upgrade_to(engine, "0001")
    with engine.begin() as conn:
        seed_rows(conn)
    migrate(engine)  # the older store is upgraded in place, its rows kept
    assert schema_revision(engine) == HEAD
    assert not sa.inspect(engine).has_table("precompute_state")  # 0002 made it, 0009 dropped it: checkpoints are files
    assert "raw" in {column["name"] for column in sa.inspect(engine).get_columns("vocab")}
    assert sa.inspect(engine).has_table("feature_links") and sa.inspect(engine).has_table("feature_map")
    assert sa.inspect(engine).has_table("graphs")
    assert "map_built_at" in {column["name"] for column in sa.inspect(engine).get_columns("saes")}
    assert sa.inspect(engine).has_table("feature_word_lists")
    assert not sa.inspect(engine).has_table("feature_words")  # 0008 made it, 0010 packed it
    with engine.connect() as conn:
        assert conn.exec_driver_sql("select label from features").scalar() == "French city names"
    with Session(engine) as session:  # the SAE of the older store is now a release of one
        release = get_release(session, "sae")
        assert release is not None and release.model_id == 1
        assert [sae.name for sae in release_saes(session, release.id)] == ["sae"]
        assert [r.name for r in list_releases(session)] == ["sae"]
    migrate(engine)  # at head: nothing to do
    with engine.begin() as conn:
        conn.exec_driver_sql("update alembic_version set version_num = '9999'")
    with pytest.raises(StoreError, match="'9999'.*upgrade saescope"):
        migrate(engine)
    engine.dispose()


def test_migrations_sqlite(sqlite_url):
    check_migrations(sqlite_url)


@pytest.mark.postgres
def test_migrations_postgres(pg_schema):
    check_migrations(pg_schema)


def test_the_migration_marks_the_saes_that_have_a_map(sqlite_url):
    engine = create_engine_for(sqlite_url)
    upgrade_to(engine, "0006")
    with engine.begin() as conn:
        seed_rows(conn)
        conn.exec_driver_sql(
            "insert into saes (id, name, model_id, layer, hook_name, architecture, d_in, d_sae, path, train_cfg, "
            "metrics, corpus, precompute_cfg, n_tokens, density_hist, status, created_at) select 2, 'unmapped', "
            "model_id, layer, hook_name, architecture, d_in, d_sae, path, train_cfg, metrics, corpus, precompute_cfg, "
            "n_tokens, density_hist, status, created_at from saes where id = 1"
        )
        conn.exec_driver_sql("insert into feature_map (sae_id, feature_idx, x, y) values (1, 0, 0.5, 0.5)")
    migrate(engine)
    with Session(engine) as session:
        marks = {sae.name: sae.map_built_at for sae in session.scalars(sa.select(SaeRow))}
    assert marks["sae"] is not None and marks["sae"].tzinfo is not None and marks["unmapped"] is None
    engine.dispose()


def check_feature_words_packed(url: str) -> None:
    """A store's rows of words (0008) come out of 0010 as one packed row per feature, in rank
    order, and go back the same way down."""
    engine = create_engine_for(url)
    upgrade_to(engine, "0009")
    words = {(1, 0): [(7, 5, 9), (3, 2, 40), (8, 2, 2)], (1, 2): [(4, 1, 1)]}  # (token, count, occurrences)
    with engine.begin() as conn:
        seed_rows(conn)
        for (sae_id, idx), listed in words.items():
            for rank in reversed(range(len(listed))):  # written out of order: the ranks set it
                conn.exec_driver_sql(
                    "insert into feature_words (sae_id, feature_idx, rank, token_id, count, occurrences) "
                    f"values ({sae_id}, {idx}, {rank}, {', '.join(map(str, listed[rank]))})"
                )
    migrate(engine)
    with Session(engine) as session:
        rows = session.scalars(sa.select(FeatureWordRow).order_by(FeatureWordRow.feature_idx)).all()
        assert {
            (r.sae_id, r.feature_idx): list(
                zip(*(unpack_tokens(b).tolist() for b in (r.token_ids, r.counts, r.occurrences)), strict=True)
            )
            for r in rows
        } == words
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), "0009")
    with engine.connect() as conn:
        back = conn.exec_driver_sql(
            "select sae_id, feature_idx, rank, token_id, count, occurrences from feature_words order by 1, 2, 3"
        ).all()
    assert [tuple(r) for r in back] == [(s, i, rank, *w) for (s, i), listed in words.items() for rank, w in enumerate(listed)]
    engine.dispose()


def test_feature_words_packed_sqlite(sqlite_url):
    check_feature_words_packed(sqlite_url)


@pytest.mark.postgres
def test_feature_words_packed_postgres(pg_schema):
    check_feature_words_packed(pg_schema)


def test_fresh_store_has_every_table_of_the_models(sqlite_url):
    from sae_core.store.db import Base

    engine = create_engine_for(sqlite_url)
    migrate(engine)
    assert set(Base.metadata.tables) <= set(sa.inspect(engine).get_table_names())
    engine.dispose()


def test_store_without_revision_is_refused(sqlite_url):
    engine = create_engine_for(sqlite_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("create table saes (id integer primary key)")
    with pytest.raises(StoreError, match="no schema revision"):
        migrate(engine)
    engine.dispose()


def test_sqlite_label_search_follows_inserts_updates_and_deletes(sqlite_url):
    engine = create_engine_for(sqlite_url)
    migrate(engine)
    search = "select f.idx from features_fts join features f on f.rowid = features_fts.rowid where features_fts match :q"
    with engine.begin() as conn:
        seed_rows(conn)
        assert conn.execute(sa.text(search), {"q": "french"}).scalars().all() == [0]
        conn.exec_driver_sql("update features set label = 'German rivers' where idx = 0")
        assert conn.execute(sa.text(search), {"q": "french"}).scalars().all() == []
        assert conn.execute(sa.text(search), {"q": "rivers"}).scalars().all() == [0]
        conn.exec_driver_sql("delete from features")
        assert conn.execute(sa.text(search), {"q": "rivers"}).scalars().all() == []
    engine.dispose()


def _driver_rows_match_sqlalchemys(url: str) -> None:
    engine = create_engine_for(url)
    migrate(engine)
    with engine.begin() as conn:
        seed_rows(conn)
    with Session(engine) as session:
        query = sa.select(FeatureRow.idx, FeatureRow.max_act, FeatureRow.label).where(
            FeatureRow.sae_id == 1, FeatureRow.idx.in_([0, 3])
        )
        assert driver_rows(session, query) == [tuple(r) for r in session.execute(query)]
        assert driver_rows(session, query) == [(0, 1.0, "French city names")]
        with pytest.raises(TypeError, match="integer parameters only"):
            driver_rows(session, query.where(FeatureRow.label == "x'); drop table features; --"))
    engine.dispose()


def test_driver_rows_are_sqlalchemys_rows_as_tuples_sqlite(sqlite_url):
    _driver_rows_match_sqlalchemys(sqlite_url)


@pytest.mark.postgres
def test_driver_rows_are_sqlalchemys_rows_as_tuples_postgres(pg_schema):
    _driver_rows_match_sqlalchemys(pg_schema)


@pytest.mark.postgres
def test_postgres_label_index_exists(pg_schema):
    engine = create_engine_for(pg_schema)
    migrate(engine)
    assert "ix_features_label_tsv" in {ix["name"] for ix in sa.inspect(engine).get_indexes("features")}
    engine.dispose()


def test_packed_arrays_round_trip():
    tokens = np.array([1, 50000, 7], dtype=np.int64)
    assert unpack_tokens(pack_tokens(tokens)).tolist() == tokens.tolist()
    values = np.array([0.0, 0.5, 0.0, 2.0, 1.0], dtype=np.float32)
    blob, max_act, max_pos = pack_acts(values)
    assert (max_act, max_pos) == (2.0, 3)
    assert len(blob) == 2 + 3 * 3  # header + three nonzero positions and levels
    back = unpack_acts(blob, max_act, len(values))
    assert back[3] == 2.0 and back[0] == back[2] == 0.0
    assert np.allclose(back, values, atol=max_act / 255 / 2)



def add_sae(conn, sae_id: int, name: str, layer: int, d_sae: int, model_id: int = 1) -> None:
    conn.exec_driver_sql(
        "insert into saes (id, name, model_id, layer, hook_name, architecture, d_in, d_sae, path, train_cfg, metrics, "
        "corpus, precompute_cfg, n_tokens, density_hist, status, created_at) values "
        f"({sae_id}, '{name}', {model_id}, {layer}, 'h', 'topk', 8, {d_sae}, 'p', '{{}}', '{{}}', '{{}}', '{{}}', 0, "
        "'{}', 'complete', CURRENT_TIMESTAMP)"
    )


def check_releases(url: str) -> None:
    engine = create_engine_for(url)
    migrate(engine)
    with engine.begin() as conn:
        seed_rows(conn)  # SAE 1 "sae", layer 0, width 4, no release yet
        add_sae(conn, 2, "wide", layer=0, d_sae=16)
        add_sae(conn, 3, "deep", layer=1, d_sae=4)
        for sae_id in (3, 2, 1):
            join_release(conn, sae_id, "rel")
    with Session(engine) as session:
        release = get_release(session, "rel")
        assert [s.name for s in release_saes(session, release.id)] == ["sae", "wide", "deep"]  # layer, then width
        assert get_release(session, "nope") is None
    with engine.begin() as conn:
        claim_release(conn, "rel", "m", ["sae", "wide", "deep"], force=False)  # the same SAEs: fine
        with pytest.raises(StoreError, match="'rel' already holds deep, wide; pass --force"):
            claim_release(conn, "rel", "m", ["sae"], force=False)
        with pytest.raises(StoreError, match="holds SAEs of m, not other"):
            claim_release(conn, "rel", "other", ["sae"], force=True)
        claim_release(conn, "rel", "m", ["sae"], force=True)  # the others leave, each to its own release
    with Session(engine) as session:
        assert [s.name for s in release_saes(session, get_release(session, "rel").id)] == ["sae"]
        assert [s.name for s in release_saes(session, get_release(session, "wide").id)] == ["wide"]
    with engine.begin() as conn:
        join_release(conn, 1, "sae")  # "rel" is left empty and goes
    with Session(engine) as session:
        assert get_release(session, "rel") is None
        assert sorted(r.name for r in list_releases(session)) == ["deep", "sae", "wide"]
    engine.dispose()


def test_releases_sqlite(sqlite_url):
    check_releases(sqlite_url)


@pytest.mark.postgres
def test_releases_postgres(pg_schema):
    check_releases(pg_schema)
