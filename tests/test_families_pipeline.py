"""Planted families on a tiny Llama, through precompute and ``saescope families``, on SQLite and
PostgreSQL: a parent direction in a 16- and a 24-latent SAE, and two children in a 40-latent SAE
that each fire on half of the parent's tokens. The links (both directions, counts checked by
hand), the family graph and the map come out of the store."""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import sqlalchemy as sa
import torch
from sqlalchemy.orm import Session

from app.families.graph import family_graph
from app.families.map import get_feature_map
from sae_core.families.run import FamiliesConfig, FamiliesError, run_families
from sae_core.precompute.run import run_precompute
from sae_core.saes.sae import SAE, SAEConfig
from sae_core.store.db import SaeRow, create_engine_for
from sae_core.store.families import FeatureLinkRow, FeatureMapRow
from sae_core.store.releases import claim_release, join_release
from tests.test_precompute import LAYER, config, contexts_for, corpus, residuals  # noqa: F401 (corpus: a fixture)

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


def precompute_release(db_url, planted, llama_dir, corpus) -> None:
    for name, folder in planted.folders.items():
        run_precompute(config(folder, db_url, corpus, model=str(llama_dir), name=f"tiny-{name}", top_k=8))
    engine = create_engine_for(db_url)
    with engine.begin() as conn:  # the three SAEs as one release, as a multi-SAE precompute files them
        claim_release(conn, RELEASE, str(llama_dir), [f"tiny-{n}" for n in WIDTHS], force=False)
        for name in WIDTHS:
            join_release(conn, conn.scalar(sa.select(SaeRow.id).where(SaeRow.name == f"tiny-{name}")), RELEASE)
    engine.dispose()


def links_of(session: Session, sae: str, index: int) -> dict[tuple[str, int], FeatureLinkRow]:
    ids = {row.id: row.name for row in session.scalars(sa.select(SaeRow))}
    sae_id = next(i for i, n in ids.items() if n == sae)
    rows = session.scalars(sa.select(FeatureLinkRow).where(FeatureLinkRow.sae_id == sae_id, FeatureLinkRow.feature_idx == index))
    return {(ids[r.other_sae_id], r.other_idx): r for r in rows}


def test_planted_family_links_graph_and_map(db_url, planted, llama_dir, corpus):
    assert 0 not in planted.child_tokens
    precompute_release(db_url, planted, llama_dir, corpus)
    (result,) = run_families(FamiliesConfig(db_url=db_url, release=RELEASE, progress=False))
    assert result.n_points == sum(WIDTHS.values())
    engine = create_engine_for(db_url)
    with Session(engine) as session:
        down = links_of(session, "tiny-small", PARENT["small"])
        for child, n_child in zip(CHILDREN, planted.child_tokens, strict=True):
            link = down[("tiny-large", child)]  # parent -> child ...
            assert link.cosine == pytest.approx(CHILD_COSINE, abs=1e-5)
            assert (link.n_both, link.n_self, link.n_other) == (n_child, planted.parent_tokens, n_child)
            up = links_of(session, "tiny-large", child)[("tiny-small", PARENT["small"])]  # ... and back
            assert (up.cosine, up.n_both, up.n_self, up.n_other) == pytest.approx(
                (link.cosine, n_child, n_child, planted.parent_tokens)
            )
        twin = down[("tiny-medium", PARENT["medium"])]
        assert twin.cosine == pytest.approx(1.0) and twin.n_both == twin.n_self == planted.parent_tokens
        # every other link of the parent is a filler at cosine 0 that never fires
        others = {k: r for k, r in down.items() if k not in {("tiny-large", c) for c in CHILDREN} | {("tiny-medium", 7)}}
        assert others and all(abs(r.cosine) < 1e-5 and r.n_both == 0 for r in others.values())

        graph = family_graph(session=session, sae_name="tiny-medium", index=PARENT["medium"], threshold=0.8)
        nodes = [(n.sae, n.index) for n in graph.nodes]
        assert nodes == [("tiny-small", 3), ("tiny-medium", 7), ("tiny-large", 11), ("tiny-large", 29)]
        assert [n.focus for n in graph.nodes] == [False, True, False, False]
        assert [r[0] for r in graph.rows] == ["tiny-small", "tiny-medium", "tiny-large"]  # smallest on top
        assert [n.y for n in graph.nodes] == sorted(n.y for n in graph.nodes)
        edges = {(e.source, e.target): e for e in graph.edges}
        assert set(edges) == {(0, 1), (0, 2), (0, 3), (1, 2), (1, 3)}  # children have two parents
        assert edges[1, 2].jaccard == pytest.approx(planted.child_tokens[0] / planted.parent_tokens)
        assert {s.child for s in graph.splits} == {1, 2, 3}
        # a higher threshold than the children's cosine leaves the parents alone
        high = family_graph(session=session, sae_name="tiny-medium", index=PARENT["medium"], threshold=0.95)
        assert [(n.sae, n.index) for n in high.nodes] == [("tiny-small", 3), ("tiny-medium", 7)]

        points = get_feature_map(session=session, release_name=RELEASE)
        assert [s.d_sae for s in points.saes] == sorted(WIDTHS.values())
        assert len(points.index) == sum(WIDTHS.values())
        assert all(0 <= v <= 1 for v in points.x + points.y)
        assert session.scalar(sa.select(sa.func.count()).select_from(FeatureMapRow)) == sum(WIDTHS.values())
    engine.dispose()


def test_families_refuses_a_release_without_two_saes_on_a_layer(tmp_path, planted, llama_dir, corpus):
    url = f"sqlite:///{tmp_path / 'one.db'}"
    run_precompute(config(planted.folders["small"], url, corpus, model=str(llama_dir), name="alone"))
    with pytest.raises(FamiliesError, match="no two SAEs on one layer"):
        run_families(FamiliesConfig(db_url=url, release="alone", progress=False))
    with pytest.raises(FamiliesError, match="no release named 'nope'"):
        run_families(FamiliesConfig(db_url=url, release="nope", progress=False))
