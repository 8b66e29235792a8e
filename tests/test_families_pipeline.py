"""Planted families on a tiny Llama, through the one-pass precompute of a release (and ``saescope families``), on SQLite and
PostgreSQL: a parent direction in a 16- and a 24-latent SAE, and two children in a 40-latent SAE
that each fire on half of the parent's tokens. The links (both directions, counts checked by
hand), the family graph and the map come out of the store."""

from __future__ import annotations

import math
from typing import NamedTuple
from unittest.mock import patch

import pytest
import sqlalchemy as sa
import torch
from sqlalchemy.orm import Session

import tests.test_precompute as precompute_tests
from app.families.graph import family_graph
from app.families.map import get_feature_map
from sae_core.cli import main
from sae_core.families.layout import LayoutsBeside
from sae_core.families.run import FamiliesConfig, FamiliesError, run_families
from sae_core.precompute.job import run_precompute
from sae_core.saes.sae import SAE, SAEConfig
from sae_core.store.db import SaeRow, create_engine_for
from sae_core.store.families import FeatureLinkRow, FeatureMapRow
from tests.test_precompute import LAYER, config, contexts_for, residuals

corpus = precompute_tests.corpus  # the same fixture: a folder of the tiny tokenizer's texts

RELEASE = "tiny-family"
WIDTHS = {"small": 16, "medium": 24, "large": 40}
PARENT = {"small": 3, "medium": 7}  # the parent direction's latent in each smaller SAE
CHILDREN = (11, 29)  # the children's latents in the large SAE
CHILD_COSINE = 1 / math.sqrt(1.25)  # decoders w ± v/2 with w ⟂ v, both unit


class Planted(NamedTuple):
    folders: dict[str, str]
    parent_tokens: int  # counted tokens where the parent fires
    child_tokens: tuple[int, int]


def gap_threshold(values: torch.Tensor, lo: float, hi: float) -> tuple[float, float]:
    """The midpoint and width of the widest gap between sorted values within quantiles [lo, hi]."""
    s = values.sort().values
    a, b = int(lo * len(s)), int(hi * len(s))
    gaps = s[a + 1 : b] - s[a : b - 1]
    i = int(gaps.argmax())
    return float((s[a + i] + s[a + i + 1]) / 2), float(gaps[i])


def topk_sae(d_in: int, width: int) -> SAE:
    """TopK (k=1) SAE whose latents never fire until planted (pre-activation -1000)."""
    sae = SAE(SAEConfig(d_in=d_in, d_sae=width, architecture="topk", k=1, model_name="tiny", layer=LAYER))
    sae.W_enc.data.zero_()
    sae.b_enc.data.fill_(-1000.0)
    sae.b_dec.data.zero_()
    return sae


@pytest.fixture(scope="module")
def planted(llama, tmp_path_factory, corpus) -> Planted:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAESCOPE_CACHE", str(tmp_path_factory.mktemp("family-cache")))
        contexts = contexts_for(llama, corpus)
        x = residuals(llama, contexts)[~contexts.special_mask]  # (N, d) counted tokens
    d = x.shape[1]
    gen = torch.Generator().manual_seed(3)
    w = torch.nn.functional.normalize(x.mean(0) - x.median(0).values + 0.1 * torch.randn(d, generator=gen), dim=0)
    v = torch.randn(d, generator=gen)
    v = torch.nn.functional.normalize(v - (v @ w) * w, dim=0)  # ⟂ w
    t, gap = gap_threshold(x @ w, 0.5, 0.85)  # the parent fires on x·w > t: 15-50% of tokens
    parent = x @ w > t
    m, _ = gap_threshold((x @ v)[parent], 0.4, 0.6)  # the children split the parent's tokens at x·v = m
    eps = gap / (4 * float((x @ v - m).abs().max()))  # small enough that no token crosses t
    rest = torch.randn(max(WIDTHS.values()), d, generator=gen)
    rest -= (rest @ w).unsqueeze(1) * w + (rest @ v).unsqueeze(1) * v  # fillers ⟂ both: cosine 0
    folders = {}
    for name, width in WIDTHS.items():
        sae = topk_sae(d, width)
        sae.W_dec.data = torch.nn.functional.normalize(rest[:width].clone(), dim=1)
        if name in PARENT:
            i = PARENT[name]
            sae.W_enc.data[:, i], sae.b_enc.data[i], sae.W_dec.data[i] = w, -t, w
        else:
            for sign, i in zip((1, -1), CHILDREN, strict=True):
                sae.W_enc.data[:, i] = w + sign * eps * v
                sae.b_enc.data[i] = -t - sign * eps * m
                sae.W_dec.data[i] = torch.nn.functional.normalize(w + sign * v / 2, dim=0)
        folders[name] = str(sae.save(tmp_path_factory.mktemp("family-sae") / name))
    above = (x @ v > m)[parent]
    return Planted(folders, int(parent.sum()), (int(above.sum()), int((~above).sum())))


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("pg_schema")


def precompute_release(db_url, folders, llama_dir, corpus, **overrides):
    folders = list(folders)
    return run_precompute(
        config(folders[0], db_url, corpus, model=str(llama_dir), sae_paths=list(folders), release=RELEASE, top_k=8, **overrides)
    )


def names_by_width(session: Session) -> dict[str, str]:
    """'small' / 'medium' / 'large' -> the SAE's name in the store."""
    width_of = {width: name for name, width in WIDTHS.items()}
    return {width_of[row.d_sae]: row.name for row in session.scalars(sa.select(SaeRow).where(SaeRow.status == "complete"))}


def links_of(session: Session, sae: str, index: int) -> dict[tuple[str, int], FeatureLinkRow]:
    ids = {row.id: row.name for row in session.scalars(sa.select(SaeRow))}
    sae_id = next(i for i, n in ids.items() if n == sae)
    rows = session.scalars(sa.select(FeatureLinkRow).where(FeatureLinkRow.sae_id == sae_id, FeatureLinkRow.feature_idx == index))
    return {(ids[r.other_sae_id], r.other_idx): r for r in rows}


def check_planted_links(session: Session, planted: Planted) -> dict[str, str]:
    name = names_by_width(session)
    down = links_of(session, name["small"], PARENT["small"])
    for child, n_child in zip(CHILDREN, planted.child_tokens, strict=True):
        link = down[(name["large"], child)]  # parent -> child ...
        assert link.cosine == pytest.approx(CHILD_COSINE, abs=1e-5)
        assert (link.n_both, link.n_self, link.n_other) == (n_child, planted.parent_tokens, n_child)
        up = links_of(session, name["large"], child)[(name["small"], PARENT["small"])]  # ... and back
        assert (up.cosine, up.n_both, up.n_self, up.n_other) == pytest.approx((link.cosine, n_child, n_child, planted.parent_tokens))
    twin = down[(name["medium"], PARENT["medium"])]
    assert twin.cosine == pytest.approx(1.0) and twin.n_both == twin.n_self == planted.parent_tokens
    family = {(name["large"], c) for c in CHILDREN} | {(name["medium"], PARENT["medium"])}
    others = [r for k, r in down.items() if k not in family]  # fillers: cosine 0, never fire
    assert others and all(abs(r.cosine) < 1e-5 and r.n_both == 0 for r in others)
    return name


def test_planted_family_in_the_one_pass(db_url, planted, llama_dir, corpus):
    """Links, graph and map straight out of one multi-SAE precompute (no second pass)."""
    assert 0 not in planted.child_tokens
    with patch("sae_core.precompute.run.run_families") as second_pass:
        precompute_release(db_url, planted.folders.values(), llama_dir, corpus)
    second_pass.assert_not_called()
    engine = create_engine_for(db_url)
    with Session(engine) as session:
        name = check_planted_links(session, planted)
        graph = family_graph(session=session, sae_name=name["medium"], index=PARENT["medium"], threshold=0.8)
        nodes = [(n.sae, n.index) for n in graph.nodes]
        assert nodes == [(name["small"], 3), (name["medium"], 7), (name["large"], 11), (name["large"], 29)]
        assert [n.focus for n in graph.nodes] == [False, True, False, False]
        assert [r[0] for r in graph.rows] == [name["small"], name["medium"], name["large"]]  # smallest on top
        assert [n.y for n in graph.nodes] == sorted(n.y for n in graph.nodes)
        edges = {(e.source, e.target): e for e in graph.edges}
        assert set(edges) == {(0, 1), (0, 2), (0, 3), (1, 2), (1, 3)}  # children have two parents
        assert edges[1, 2].jaccard == pytest.approx(planted.child_tokens[0] / planted.parent_tokens)
        assert {s.child for s in graph.splits} == {1, 2, 3}
        # a threshold above the children's cosine leaves the parents alone
        high = family_graph(session=session, sae_name=name["medium"], index=PARENT["medium"], threshold=0.95)
        assert [(n.sae, n.index) for n in high.nodes] == [(name["small"], 3), (name["medium"], 7)]

        points = get_feature_map(session=session, release_name=RELEASE).points
        assert [s.d_sae for s in points.saes] == sorted(WIDTHS.values())
        assert len(points.index) == sum(WIDTHS.values())
        assert all(0 <= v <= 1 for v in points.x + points.y)
        assert session.scalar(sa.select(sa.func.count()).select_from(FeatureMapRow)) == sum(WIDTHS.values())
    engine.dispose()


def test_an_sae_already_complete_gets_its_links_from_a_pass_of_their_own(tmp_path, planted, llama_dir, corpus):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    small, medium, large = planted.folders.values()
    run_precompute(config(small, url, corpus, model=str(llama_dir), release=RELEASE, top_k=8))
    results = precompute_release(url, [small, medium, large], llama_dir, corpus)
    assert [r.skipped for r in results] == [True, False, False]
    engine = create_engine_for(url)
    with Session(engine) as session:
        check_planted_links(session, planted)
    engine.dispose()


def test_families_refuses_a_release_without_two_saes_on_a_layer(tmp_path, planted, llama_dir, corpus, capsys):
    url = f"sqlite:///{tmp_path / 'one.db'}"
    run_precompute(config(planted.folders["small"], url, corpus, model=str(llama_dir), name="alone"))
    engine = create_engine_for(url)
    with engine.connect() as conn:  # a release of one: no links, no map, and no error
        assert conn.scalar(sa.select(sa.func.count()).select_from(FeatureLinkRow)) == 0
    engine.dispose()
    with pytest.raises(FamiliesError, match="no two SAEs on one layer"):
        run_families(FamiliesConfig(db_url=url, release="alone", progress=False))
    with pytest.raises(FamiliesError, match="no release named 'nope'"):
        run_families(FamiliesConfig(db_url=url, release="nope", progress=False))
    capsys.readouterr()  # the precompute's progress
    assert main(["families", "--release", "alone", "--db", url]) == 2  # one line, exit 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "saescope: error: release 'alone' has no two SAEs on one layer; links need at least two"
    ]


def test_no_families_leaves_the_release_unlinked(tmp_path, planted, llama_dir, corpus):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    with patch("sae_core.precompute.run.run_families") as second_pass:
        precompute_release(url, [planted.folders["small"], planted.folders["medium"]], llama_dir, corpus, families=False)
    second_pass.assert_not_called()
    engine = create_engine_for(url)
    with engine.connect() as conn:
        for table in (FeatureLinkRow, FeatureMapRow):
            assert conn.scalar(sa.select(sa.func.count()).select_from(table)) == 0
    engine.dispose()


def test_a_large_map_made_beside_the_tail_is_the_map_made_in_process(tmp_path, planted, llama_dir, corpus, monkeypatch):
    """From BESIDE_FROM features on, the map is made in a spawned process while the SAEs'
    results are written: the same positions, to the bit, as made in the precompute's own."""

    def stored_map(url):
        engine = create_engine_for(url)
        with engine.connect() as conn:
            rows = conn.execute(sa.select(FeatureMapRow.sae_id, FeatureMapRow.feature_idx, FeatureMapRow.x, FeatureMapRow.y)).all()
        engine.dispose()
        return sorted(map(tuple, rows))

    submitted = []
    submit = LayoutsBeside.submit
    monkeypatch.setattr(LayoutsBeside, "submit", lambda self, *a, **kw: submitted.append(a) or submit(self, *a, **kw))
    here, beside = (f"sqlite:///{tmp_path / name}.db" for name in ("here", "beside"))
    precompute_release(here, planted.folders.values(), llama_dir, corpus)
    assert not submitted  # 80 features: made in process
    monkeypatch.setattr("sae_core.families.feed.BESIDE_FROM", sum(WIDTHS.values()))
    precompute_release(beside, planted.folders.values(), llama_dir, corpus)
    assert len(submitted) == 1
    assert stored_map(beside) == stored_map(here) and len(stored_map(here)) == sum(WIDTHS.values())
