"""A Matryoshka dictionary precomputed as its nested SAEs, on a tiny Llama, on SQLite and
PostgreSQL: one SAE per prefix with the prefix's width, whose features are the encodings of
``load_sae(folder, prefix=m)``; a latent is the same feature in every prefix that holds it; the
prefixes are linked as a family exactly as separate widths are, and the pages say what they are."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import NamedTuple

import pytest
import sqlalchemy as sa
import torch
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

import tests.test_precompute as precompute_tests
from app.families.graph import family_graph
from app.families.panel import family_panel
from app.live.host import sae_sources
from app.main import create_app
from app.queries import get_sae
from app.settings import Settings
from sae_core.cli import main
from sae_core.precompute.job import run_precompute
from sae_core.precompute.run import PrecomputeResult, model_slug, resolve_release
from sae_core.saes.formats import load_sae, stored_prefix
from sae_core.saes.sae import SAE, SAEConfig
from sae_core.store.db import ExampleRow, FeatureRow, SaeRow, create_engine_for
from sae_core.store.families import FeatureLinkRow
from tests.conftest import postgres_schema
from tests.test_precompute import LAYER, config, contexts_for, residuals

corpus = precompute_tests.corpus  # the same fixture: a folder of the tiny tokenizer's texts

PREFIXES = [8, 24, 48]
WHOLE_METRICS = {"how": {"l0": "measured on the whole dictionary"}}


@pytest.fixture(scope="module")
def dictionary(llama, corpus, tmp_path_factory):
    """A Matryoshka dictionary saved as training saves one (JumpReLU, one global θ, its prefixes
    in cfg.json, a metrics.json of the whole): random directions, θ at the 85th percentile of the
    pre-activations, so each latent fires on about 15% of the tokens. Returns its folder and the
    counted tokens' residuals."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAESCOPE_CACHE", str(tmp_path_factory.mktemp("matryoshka-cache")))
        contexts = contexts_for(llama, corpus)
        x = residuals(llama, contexts)[~contexts.special_mask]  # (N, d) counted tokens
    d, width = x.shape[1], PREFIXES[-1]
    gen = torch.Generator().manual_seed(7)
    cfg = SAEConfig(d_in=d, d_sae=width, architecture="jumprelu", model_name="tiny", layer=LAYER, saescope={"matryoshka_prefixes": PREFIXES})
    sae = SAE(cfg)
    sae.W_enc.data = torch.randn(d, width, generator=gen) / d**0.5
    sae.W_dec.data = torch.randn(width, d, generator=gen)
    sae.b_dec.data = x.mean(0)
    with torch.no_grad():
        sae.threshold.data.fill_(float(sae.pre_acts(x).quantile(0.85)))
    folder = sae.save(tmp_path_factory.mktemp("matryoshka") / "dictionary")
    (folder / "metrics.json").write_text(json.dumps(WHOLE_METRICS))
    return folder, x


class Store(NamedTuple):
    url: str
    results: list[PrecomputeResult]


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request, dictionary, llama_dir, corpus, tmp_path_factory) -> Iterator[Store]:
    """A store holding the dictionary precomputed as its nested SAEs."""
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite:///{tmp_path_factory.mktemp('matryoshka-store') / 'store.db'}"
        else:
            url = stack.enter_context(postgres_schema(request.getfixturevalue("pg_url"), "matryoshka"))
        yield Store(url, precompute(dictionary[0], url, llama_dir, corpus))


def dictionary_name(llama_dir) -> str:
    return f"{model_slug(str(llama_dir))}-l{LAYER}-matryoshka-{PREFIXES[-1]}"


def precompute(folder, db_url, llama_dir, corpus, **overrides):
    return run_precompute(config(folder, db_url, corpus, model=str(llama_dir), top_k=8, **overrides))


def stored(session: Session) -> dict[int, SaeRow]:
    """Width -> the complete SAE of that width."""
    return {row.d_sae: row for row in session.scalars(sa.select(SaeRow).where(SaeRow.status == "complete"))}


def features(session: Session, sae_id: int) -> list[FeatureRow]:
    return list(session.scalars(sa.select(FeatureRow).where(FeatureRow.sae_id == sae_id).order_by(FeatureRow.idx)))


def top_examples(session: Session, sae_id: int, index: int) -> list[tuple]:
    rows = session.execute(
        sa.select(ExampleRow.rank, ExampleRow.context_id, ExampleRow.max_pos, ExampleRow.max_act)
        .where(ExampleRow.sae_id == sae_id, ExampleRow.feature_idx == index, ExampleRow.kind == "top")
        .order_by(ExampleRow.rank)
    )
    return [tuple(row) for row in rows]


def links(session: Session, a: SaeRow, b: SaeRow) -> dict[tuple[int, int], FeatureLinkRow]:
    rows = session.scalars(sa.select(FeatureLinkRow).where(FeatureLinkRow.sae_id == a.id, FeatureLinkRow.other_sae_id == b.id))
    return {(row.feature_idx, row.other_idx): row for row in rows}


def test_a_dictionary_is_stored_as_one_sae_per_prefix(store, dictionary, llama_dir):
    folder, x = dictionary
    name = dictionary_name(llama_dir)
    db_url, results = store
    assert [(r.name, r.n_features) for r in results] == [(f"{name}-p8", 8), (f"{name}-p24", 24), (name, 48)]
    engine = create_engine_for(db_url)
    with Session(engine) as session:
        saes = stored(session)
        assert sorted(saes) == PREFIXES
        assert {row.release_id for row in saes.values()} == {saes[48].release_id}  # one release, named after the dictionary
        assert get_sae(session=session, sae_name=name).release == name
        for m, row in saes.items():
            # each prefix's features are what load_sae(folder, prefix=m) encodes, loaded again from its row
            nested = load_sae(row.path, prefix=stored_prefix(row.train_cfg, row.d_sae))
            assert nested.d_sae == m and torch.equal(nested.W_dec, load_sae(folder, prefix=m).W_dec)
            with torch.no_grad():
                f = nested.encode(x)  # (N, m)
            got = features(session, row.id)
            assert [r.count for r in got] == (f > 0).sum(0).tolist()
            assert 0 < min(r.count for r in got)
            torch.testing.assert_close(torch.tensor([r.max_act for r in got]), f.max(0).values, rtol=1e-5, atol=1e-6)
        # the full dictionary keeps its metrics; a prefix has none of its own (they measure the whole)
        assert saes[48].metrics == WHOLE_METRICS
        assert saes[8].metrics == {} and saes[24].metrics == {}
        # latent i is the same feature in every prefix that holds it: the same activations, examples
        for m in PREFIXES[:-1]:
            for small, large in zip(features(session, saes[m].id), features(session, saes[48].id), strict=False):
                assert (small.count, small.max_act, small.mean_act, small.act_hist) == (large.count, large.max_act, large.mean_act, large.act_hist)
                assert top_examples(session, saes[m].id, small.idx) == top_examples(session, saes[48].id, large.idx)
    engine.dispose()


def brute_cosine(W_a: torch.Tensor, W_b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(W_a.unsqueeze(1), W_b.unsqueeze(0), dim=2).double()


def test_prefixes_are_linked_both_ways_as_separate_widths_are(store, dictionary):
    folder, x = dictionary
    db_url = store.url
    W_dec = load_sae(folder).W_dec.detach()
    with torch.no_grad():
        fires = load_sae(folder).encode(x) > 0  # (N, 48)
    engine = create_engine_for(db_url)
    with Session(engine) as session:
        saes = stored(session)
        for a, b in [(8, 24), (24, 8), (8, 48), (48, 8), (24, 48), (48, 24)]:
            got = links(session, saes[a], saes[b])
            cos = brute_cosine(W_dec[:a], W_dec[:b])
            for i in range(a):
                assert set(cos[i].topk(5).indices.tolist()) <= {j for s, j in got if s == i}  # top 5 by cosine
            for (i, j), link in got.items():
                assert link.cosine == pytest.approx(float(cos[i, j]), abs=1e-5)
                both = int((fires[:, i] & fires[:, j]).sum())
                assert (link.n_both, link.n_self, link.n_other) == (both, int(fires[:, i].sum()), int(fires[:, j].sum()))
            for i in range(min(a, b)):  # a latent and its own copy in the other prefix
                same = got[i, i]
                assert same.cosine == pytest.approx(1.0, abs=1e-6) and same.n_both == same.n_self == same.n_other > 0
    engine.dispose()


def test_pages_say_prefix_and_same_latent(store, llama_dir):
    name = dictionary_name(llama_dir)
    db_url = store.url
    engine = create_engine_for(db_url)
    with Session(engine) as session:
        saes = stored(session)
        small = get_sae(session=session, sae_name=f"{name}-p8")
        assert (small.matryoshka.prefix, small.matryoshka.dictionary_width) == (8, 48)
        assert [(s.name, s.d_sae) for s in small.matryoshka.saes] == [(f"{name}-p8", 8), (f"{name}-p24", 24), (name, 48)]
        whole = get_sae(session=session, sae_name=name)
        assert (whole.matryoshka.prefix, whole.matryoshka.dictionary_width) == (48, 48)
        panel = family_panel(session=session, sae=saes[8], index=3)
        same = {(link.d_sae, link.feature.index) for link in panel.children if link.same_latent}
        assert same == {(24, 3), (48, 3)}  # its copies; every other link is another latent
        assert all(not link.same_latent for link in panel.children if link.feature.index != 3)
        graph = family_graph(session=session, sae_name=f"{name}-p8", index=3, threshold=0.99)
        assert [(n.d_sae, n.index) for n in graph.nodes] == [(8, 3), (24, 3), (48, 3)]
        assert {(e.source, e.target) for e in graph.edges if e.same_latent} == {(0, 1), (0, 2), (1, 2)}
        assert graph.splits == []  # a latent is not a child of its own copy
        # the live model loads each stored prefix as the nested SAE it was precomputed as
        prefixes = {source[0]: source[3] for source in sae_sources(session)}
        assert prefixes == {f"{name}-p8": 8, f"{name}-p24": 24, name: None}
    engine.dispose()
    with TestClient(create_app(Settings(db_url=db_url, live=False))) as client:
        page = client.get(f"/saes/{name}-p24").text
        assert "Prefix 24 of a Matryoshka dictionary of 48 latents" in page
        assert f'<a href="/saes/{name}-p8">8</a> · <strong>24</strong> · <a href="/saes/{name}">48</a>' in page
        assert "A Matryoshka dictionary" in client.get(f"/saes/{name}").text
        assert "matryoshka, first 24 of 48</a>" in client.get("/").text  # its cell in the release grid
        assert client.get(f"/api/v1/saes/{name}-p24").json()["matryoshka"]["dictionary_width"] == 48
        assert ">same latent</td>" in client.get(f"/saes/{name}-p8/features/3").text
        assert 'class="edge same-latent"' in client.get(f"/saes/{name}-p8/features/3/family?threshold=0.99").text


def test_a_name_names_the_dictionary_and_its_prefixes_after_it(dictionary, corpus):
    release = resolve_release(config(dictionary[0], "sqlite://", corpus, name="mine"))
    assert [(inputs.name, inputs.sae.d_sae) for inputs in release.saes] == [("mine-p8", 8), ("mine-p24", 24), ("mine", 48)]
    assert release.name == "mine"
    assert all(inputs.dictionary.d_sae == 48 for inputs in release.saes)  # encoded once, for all three
    whole = resolve_release(config(dictionary[0], "sqlite://", corpus, name="mine", nested=False))
    assert [(inputs.name, inputs.dictionary) for inputs in whole.saes] == [("mine", None)]


def test_no_nested_stores_the_full_dictionary_only_and_nested_adds_the_prefixes(tmp_path, dictionary, llama_dir, corpus, capsys):
    folder, _ = dictionary
    url = f"sqlite:///{tmp_path / 'store.db'}"
    name = dictionary_name(llama_dir)
    with pytest.raises(SystemExit):
        main(["precompute", "--help"])
    assert "--no-nested" in capsys.readouterr().out
    [alone] = precompute(folder, url, llama_dir, corpus, nested=False)
    assert (alone.name, alone.n_features) == (name, 48)
    # the same folder again with its prefixes: the dictionary is kept as it is, the prefixes are
    # added, and their links come from a pass of their own (loading each prefix from its row)
    results = precompute(folder, url, llama_dir, corpus)
    assert [(r.name, r.skipped) for r in results] == [(f"{name}-p8", False), (f"{name}-p24", False), (name, True)]
    engine = create_engine_for(url)
    with Session(engine) as session:
        saes = stored(session)
        assert links(session, saes[8], saes[48])[3, 3].cosine == pytest.approx(1.0, abs=1e-6)
        assert links(session, saes[48], saes[24])
    engine.dispose()
