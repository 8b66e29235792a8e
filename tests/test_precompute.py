"""Precompute on a tiny Llama: a planted feature, brute-force equality of every streamed statistic,
resume after a kill on SQLite and PostgreSQL, skip when complete, atomic --force."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sae_core.inputs import distributed
from sae_core.inputs.activations import iter_activations
from sae_core.inputs.corpus import build_contexts
from sae_core.inputs.paths import cache_dir
from sae_core.precompute.checkpoint import Checkpoint, ResumeFiles, write_safetensors
from sae_core.precompute.config import PrecomputeConfig
from sae_core.precompute.job import run_precompute
from sae_core.precompute.results import coactivation_neighbours
from sae_core.precompute.stats import (
    FINE_BINS,
    CoActivation,
    SparseCounter,
    StreamingStats,
    TrianglePairs,
    add_fixed,
    pow2_ceil,
    sample_priority,
    to_fixed,
)
from sae_core.precompute.weights import SEGMENT, extremes, row_histograms
from sae_core.saes.sae import ARCHITECTURES, SAE, SAEConfig
from sae_core.store.db import (
    ContextRow,
    ExampleRow,
    FeatureRow,
    SaeRow,
    TokenFeatureRow,
    create_engine_for,
    pack_acts,
    pack_acts_rows,
    unpack_acts,
    unpack_levels,
    unpack_levels_rows,
)
from tests.tiny import TRAIN_TEXT

LAYER = 1
CTX_LEN = 16
D_SAE = 48
KEPT_WORDS = 8  # each feature's words kept: fewer than the tokens most features fire on
PLANTED = 5  # index of the latent that fires on one token only


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(TRAIN_TEXT):
        (folder / f"doc{i}.txt").write_text((text + "\n") * 4)
    return str(folder)


def contexts_for(llama, corpus):
    return build_contexts(corpus, llama.tokenizer, ctx_len=CTX_LEN, seed=0)


def residuals(llama, contexts):
    """(n_contexts, seq, d_model) residual after block LAYER."""
    return torch.cat([b.acts for b in iter_activations(llama, LAYER, contexts, progress=False)])


def logistic_direction(xs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Weights of a class-balanced logistic regression of labels y (n,) on xs (n, d)."""
    w = torch.zeros(xs.shape[1], dtype=xs.dtype, requires_grad=True)
    b = torch.zeros((), dtype=xs.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)
    balance = (1 - y).sum() / y.sum()

    def loss():
        opt.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(xs @ w + b, y, pos_weight=balance)
        value.backward()
        return value

    opt.step(loss)
    return w.detach()


def plant_direction(x: torch.Tensor, tokens: torch.Tensor, counted: torch.Tensor):
    """A (token id, direction, threshold, margin) such that x @ direction > threshold exactly at the
    counted positions of that token; the first separable token after the commonest ones."""
    ids, freq = torch.unique(tokens[counted], return_counts=True)
    xs, ts = x[counted].double(), tokens[counted]
    for token in ids[freq.argsort(descending=True)][3:]:
        y = (ts == token).double()
        w = logistic_direction(xs, y)
        s = xs @ w
        lo, hi = s[y == 0].max(), s[y == 1].min()
        if lo < hi:
            return int(token), w.float(), float((lo + hi) / 2), float(hi - lo)
    raise AssertionError("no token is linearly separable in the tiny model's residual")


@pytest.fixture(scope="module")
def planted(llama, corpus, tmp_path_factory):
    """A TopK SAE (k=4) whose latent PLANTED fires exactly on one token id; the rest random and weak."""
    cache = tmp_path_factory.mktemp("planted-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAESCOPE_CACHE", str(cache))
        contexts = contexts_for(llama, corpus)
        x = residuals(llama, contexts)
    counted = ~contexts.special_mask
    token, w, threshold, margin = plant_direction(x, contexts.tokens, counted)
    gen = torch.Generator().manual_seed(1)
    sae = SAE(SAEConfig(d_in=x.shape[-1], d_sae=D_SAE, architecture="topk", k=4, model_name="tiny", layer=LAYER))
    sae.W_enc.data = torch.randn(x.shape[-1], D_SAE, generator=gen) * 0.05
    sae.W_dec.data = torch.randn(D_SAE, x.shape[-1], generator=gen)
    scale = 20.0 / margin  # planted pre-activation >= 10 on its token, <= -10 elsewhere
    sae.W_enc.data[:, PLANTED] = w * scale
    sae.b_enc.data[PLANTED] = -threshold * scale
    folder = tmp_path_factory.mktemp("sae") / "planted"
    sae.save(folder)
    return folder, token


def config(sae_path, db_url, corpus, **overrides) -> PrecomputeConfig:
    base = {
        "sae_paths": [str(sae_path)],
        "db_url": db_url,
        "model": None,
        "corpus": corpus,
        "ctx_len": CTX_LEN,
        "tokens": None,
        "batch_size": 4,
        "checkpoint_every": 3,
        "top_k": 6,
        "per_bin": 3,
        "feature_words_size": KEPT_WORDS,
        "progress": False,
    }
    return PrecomputeConfig(**{**base, **overrides})


@pytest.fixture
def run_on(llama_dir, corpus, planted):
    def run(db_url, **overrides):
        [result] = run_precompute(config(planted[0], db_url, corpus, model=str(llama_dir), **overrides))
        return result

    return run


def dump(db_url: str, sae_id: int | None = None) -> dict[str, list]:
    """Every precomputed row (of one SAE, given ``sae_id``), without ids and timestamps: what
    "the same store" means."""
    engine = create_engine_for(db_url)
    where = "" if sae_id is None else f" where sae_id = {int(sae_id)}"
    queries = {
        "saes": "select name, status, layer, hook_name, architecture, d_sae, k, n_tokens, density_hist, corpus, precompute_cfg from saes order by name",
        "features": f"select idx, count, density, max_act, mean_act, act_hist, intervals, logit_top, logit_bottom, logit_hist, neighbours_cos, neighbours_coact from features{where} order by idx",
        "examples": f"select feature_idx, kind, bin, rank, context_id, max_act, max_pos, acts from examples{where} order by feature_idx, kind, bin, rank",
        "contexts": f"select id, token_ids from contexts{where} order by id",
        "token_features": f"select token_id, rank, feature_idx, mean_act, count from token_features{where} order by token_id, rank",
        "feature_words": f"select feature_idx, token_ids, counts, occurrences from feature_word_lists{where} order by feature_idx",
    }
    with engine.connect() as conn:
        out = {name: [tuple(r) for r in conn.exec_driver_sql(q)] for name, q in queries.items()}
    engine.dispose()
    out["feature_words"] = [  # a row per word, (feature, rank, token id, count, occurrences)
        (feature, rank, *word)
        for feature, *packed in out["feature_words"]
        for rank, word in enumerate(zip(*(np.frombuffer(blob, "<i4").tolist() for blob in packed), strict=True))
    ]
    return out


def features_by_idx(db_url):
    engine = create_engine_for(db_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(FeatureRow.__table__).order_by(FeatureRow.idx)).mappings().all()
        examples = conn.execute(sa.select(ExampleRow.__table__)).mappings().all()
        tokens = conn.execute(sa.select(TokenFeatureRow.__table__)).mappings().all()
        contexts = {r.id: np.frombuffer(r.token_ids, "<i4") for r in conn.execute(sa.select(ContextRow.__table__))}
        sae = conn.execute(sa.select(SaeRow.__table__)).mappings().one()
    engine.dispose()
    return rows, examples, tokens, contexts, sae


# ---------------------------------------------------------------------------------------------


def test_planted_feature_is_found_exactly(llama, corpus, planted, run_on, tmp_path):
    folder, token = planted
    db = f"sqlite:///{tmp_path / 's.db'}"
    result = run_on(db)
    features, examples, token_rows, context_tokens, sae_row = features_by_idx(db)
    contexts = contexts_for(llama, corpus)
    counted = ~contexts.special_mask
    on_token = (contexts.tokens == token) & counted  # (n_contexts, seq)

    assert sae_row["status"] == "complete" and sae_row["n_tokens"] == int(counted.sum()) == result.n_tokens
    feature = features[PLANTED]
    assert feature["count"] == int(on_token.sum())
    assert feature["density"] == pytest.approx(int(on_token.sum()) / int(counted.sum()))

    top = sorted((e for e in examples if e["feature_idx"] == PLANTED and e["kind"] == "top"), key=lambda e: e["rank"])
    with_token = set(torch.nonzero(on_token.any(1)).squeeze(1).tolist())
    assert len(top) == min(6, len(with_token))
    assert {e["context_id"] for e in top} <= with_token
    for example in top:
        acts = unpack_acts(example["acts"], example["max_act"], contexts.tokens.shape[1])
        fired = np.flatnonzero(acts > 0)
        assert set(fired) == set(torch.nonzero(on_token[example["context_id"]]).squeeze(1).tolist())
        assert context_tokens[example["context_id"]].tolist() == contexts.tokens[example["context_id"]].tolist()
        assert acts[example["max_pos"]] == pytest.approx(example["max_act"])
    assert [e["max_act"] for e in top] == sorted((e["max_act"] for e in top), reverse=True)

    best_for_token = min((r for r in token_rows if r["token_id"] == token), key=lambda r: r["rank"])
    assert best_for_token["feature_idx"] == PLANTED and best_for_token["count"] == feature["count"]
    assert {r["token_id"] for r in token_rows if r["feature_idx"] == PLANTED} == {token}


def brute_force(llama, corpus, sae_path):
    """Every statistic computed densely from scratch: (n_contexts, seq, F) activations."""
    from sae_core.saes.formats import load_sae

    contexts = contexts_for(llama, corpus)
    acts = load_sae(sae_path).encode(residuals(llama, contexts)).detach()
    acts[contexts.special_mask] = 0
    return contexts, acts


# Every architecture the loader accepts, and the forms our training saves: BatchTopK and
# Matryoshka as JumpReLU with one global threshold.
SAE_KINDS = {
    "topk": "topk",
    "standard": "standard",
    "jumprelu": "jumprelu",  # per-latent thresholds, some negative (Gemma Scope allows θ < 0)
    "batchtopk-export": "jumprelu",
}


def test_sae_kinds_cover_every_architecture():
    assert set(SAE_KINDS.values()) == set(ARCHITECTURES)


def random_sae(kind: str, d_in: int) -> SAE:
    torch.manual_seed(3)
    architecture = SAE_KINDS[kind]
    sae = SAE(SAEConfig(d_in=d_in, d_sae=D_SAE, architecture=architecture, k=6 if architecture == "topk" else None, layer=LAYER))
    sae.W_enc.data.normal_(std=8.0)  # the tiny model's residual norm is ~0.12: pre-activations of std ~1
    sae.W_dec.data.normal_()
    sae.b_enc.data.fill_(-0.3)
    if kind == "jumprelu":
        sae.threshold.data.uniform_(-0.5, 1.0)
    elif kind == "batchtopk-export":
        sae.threshold.data.fill_(0.4)
    return sae


@pytest.mark.parametrize("kind", SAE_KINDS)
def test_streaming_statistics_equal_brute_force(llama, llama_dir, corpus, tmp_path, kind):
    random_sae(kind, llama.d_model).save(tmp_path / "sae")
    db = f"sqlite:///{tmp_path / 's.db'}"
    run_precompute(config(tmp_path / "sae", db, corpus, model=str(llama_dir), max_active=D_SAE, memory_budget_mb=1))
    features, examples, token_rows, _, sae_row = features_by_idx(db)
    contexts, acts = brute_force(llama, corpus, tmp_path / "sae")
    flat = acts.reshape(-1, D_SAE)  # (tokens, F)
    assert (flat > 0).float().mean() > 0.05, "the random SAE must fire for the comparison to test anything"
    context_max = acts.amax(dim=1)  # (n_contexts, F)

    for f in range(D_SAE):
        row, values = features[f], flat[:, f][flat[:, f] > 0]
        assert row["count"] == values.numel()
        if not values.numel():
            continue
        assert row["max_act"] == pytest.approx(float(values.max()), rel=1e-6)
        assert row["mean_act"] == pytest.approx(float(values.double().mean()), rel=1e-6)
        scale = pow2_ceil(values.max().reshape(1))
        fine = (torch.ceil(values / scale * FINE_BINS).long() - 1).clamp(0, FINE_BINS - 1)
        hist = torch.bincount(fine, minlength=FINE_BINS).tolist()
        assert row["act_hist"]["counts"] == hist[: len(row["act_hist"]["counts"])]
        assert sum(row["act_hist"]["counts"]) == values.numel()

        order = sorted(range(len(contexts)), key=lambda c: (-float(context_max[c, f]), c))
        expected_top = [c for c in order if context_max[c, f] > 0][:6]
        got_top = sorted((e for e in examples if e["feature_idx"] == f and e["kind"] == "top"), key=lambda e: e["rank"])
        # The top values in order, each from a context that really reaches it: two contexts within
        # rounding of each other (batched vs whole-corpus matmuls) may swap, nothing else may.
        assert [e["max_act"] for e in got_top] == pytest.approx([float(context_max[c, f]) for c in expected_top], rel=1e-5)
        assert [float(context_max[e["context_id"], f]) for e in got_top] == pytest.approx([e["max_act"] for e in got_top], rel=1e-5)
        assert len({e["context_id"] for e in got_top}) == len(got_top)

        check_intervals(row, f, context_max[:, f], values, examples)

    check_coactivation(features, flat)
    check_token_index(token_rows, flat, contexts)
    check_feature_words(dump(db)["feature_words"], flat, contexts)


def check_intervals(row, f, context_max, values, examples):
    """Interval edges, shares and samples against their definition: bins of the fine grid, per
    bin the contexts of highest sample_priority whose max falls in it."""
    intervals = row["intervals"]
    lo = torch.tensor([iv["lo"] for iv in intervals] + [intervals[-1]["hi"]])
    assert lo[0] == 0 and lo[-1] >= row["max_act"] * (1 - 1e-5)
    assert sum(iv["count"] for iv in intervals) == values.numel()
    for b, iv in enumerate(intervals):
        inside = (values > iv["lo"] * (1 + 1e-5)) & (values <= iv["hi"] * (1 + 1e-5))
        assert iv["count"] == int(inside.sum())
        candidates = torch.nonzero((context_max > iv["lo"] * (1 + 1e-5)) & (context_max <= iv["hi"] * (1 + 1e-5))).squeeze(1)
        priority = sample_priority(0, candidates, torch.full_like(candidates, f))
        expected = candidates[priority.argsort(descending=True)][:3].tolist()
        got = sorted((e for e in examples if e["feature_idx"] == f and e["kind"] == "interval" and e["bin"] == b), key=lambda e: e["rank"])
        assert [e["context_id"] for e in got] == expected


def check_coactivation(features, flat):
    active = (flat > 0).double()  # (tokens, F)
    both = active.T @ active
    occurrences = active.sum(0)
    jaccard = both / (occurrences[:, None] + occurrences[None, :] - both).clamp(min=1)
    jaccard.fill_diagonal_(0)
    for f, row in enumerate(features):
        got = row["neighbours_coact"]
        expected = sorted(jaccard[f][jaccard[f] > 0].tolist(), reverse=True)[:10]
        assert [s for _, s in got] == pytest.approx(expected, rel=1e-4)
        for other, score in got:
            assert float(jaccard[f, other]) == pytest.approx(score, rel=1e-4)


def check_token_index(token_rows, flat, contexts):
    counted = ~contexts.special_mask.reshape(-1)
    token_ids = contexts.tokens.reshape(-1)[counted]
    values = flat[counted]
    for token in torch.unique(token_ids).tolist():
        mean = values[token_ids == token].double().mean(0)  # (F,)
        expected = sorted(mean[mean > 0].tolist(), reverse=True)[:20]
        got = sorted((r for r in token_rows if r["token_id"] == token), key=lambda r: r["rank"])
        # float32 activations: batched and whole-corpus matmuls differ by ~1e-8, so a mean of
        # 0.007 cannot hold 1e-6 relative; the absolute bound is that rounding's.
        assert [r["mean_act"] for r in got] == pytest.approx(expected, rel=1e-6, abs=1e-6)


def check_feature_words(rows, flat, contexts):
    """Each feature's most frequent tokens (as many as precompute keeps), ties by token id, and
    their occurrences, against counting them."""
    assert rows
    counted = ~contexts.special_mask.reshape(-1)
    token_ids = contexts.tokens.reshape(-1)[counted]
    fired = flat[counted] > 0
    truncated = 0  # features firing on more tokens than are kept
    for f in range(D_SAE):
        tokens, counts = torch.unique(token_ids[fired[:, f]], return_counts=True)
        truncated += len(tokens) > KEPT_WORDS
        ranked = sorted(zip(counts.tolist(), tokens.tolist(), strict=True), key=lambda p: (-p[0], p[1]))[:KEPT_WORDS]
        expected = [(count, token, int((token_ids == token).sum())) for count, token in ranked]
        got = [(count, token, occurrences) for feature, _, token, count, occurrences in rows if feature == f]
        assert got == expected, f
    assert truncated, "no feature fires on more tokens than are kept: the cut is untested"


def test_weight_statistics_equal_brute_force(llama, planted, run_on, tmp_path):
    from sae_core.saes.formats import load_sae

    db = f"sqlite:///{tmp_path / 's.db'}"
    run_on(db)
    features = features_by_idx(db)[0]
    sae = load_sae(planted[0])
    logits = (sae.W_dec * llama.final_norm_scale()) @ llama.unembed.T  # (F, vocab)
    unit = torch.nn.functional.normalize(sae.W_dec, dim=1)
    cos = (unit @ unit.T).fill_diagonal_(-2)
    for f, row in enumerate(features):
        assert [i for i, _ in row["logit_top"]] == logits[f].topk(10).indices.tolist()
        assert [i for i, _ in row["logit_bottom"]] == logits[f].topk(10, largest=False).indices.tolist()
        assert sum(row["logit_hist"]["counts"]) == logits.shape[1]
        assert [i for i, _ in row["neighbours_cos"]] == cos[f].topk(10).indices.tolist()


def test_logit_histogram_bin_does_not_depend_on_the_row():
    """A value just under a bin edge stays in its bin in row 4,095 as in row 0 (adding the row's
    offset before truncating, in float32, rounded it up into the next bin)."""
    rows, bins = 4096, 32
    values = torch.tensor([0.0, 30.9999 / bins, 1.0]).repeat(rows, 1)  # each row: lo 0, hi 1, one value in bin 30
    counts = row_histograms(values, torch.zeros(rows), torch.ones(rows), bins)
    assert (counts[:, 30] == 1).all() and (counts[:, 31] == 1).all() and (counts[:, 0] == 1).all()


def test_logit_extremes_equal_topk_with_ties_and_a_tail():
    """``extremes`` gives topk's values and indices at both ends: over rows longer than a whole
    number of segments (the tail holds an extreme in one row), with the top tied across two
    segments, the bottom tied within one, a tie for the 10th place, and a row of one repeated value."""
    torch.manual_seed(0)
    values = torch.randn(7, 50 * SEGMENT + 37)
    values[1, -1] = 100.0  # the row's maximum in the tail
    values[2, [5, 3 * SEGMENT]] = 100.0  # a tie for the top, in two segments
    values[3, [7, 8]] = -100.0  # a tie for the bottom, in one segment
    values[4] = 0.25
    values[5, 5 * SEGMENT : 5 * SEGMENT + 9] = torch.arange(9) + 50.0  # nine clear maxima, then a
    values[5, [20, 5 * SEGMENT + 20]] = 40.0  # tie for the 10th, across segments ranked 2nd and 1st
    for largest in (True, False):
        expected = values.topk(10, dim=1, largest=largest)
        got = extremes(values, 10, largest=largest)
        assert torch.equal(got.values, expected.values) and torch.equal(got.indices, expected.indices)


def test_logit_histograms_count_each_row_by_its_own_bins():
    """Each row's counts are the bincount of its own values' bins (shift by its lo, scale to its
    [lo, hi], clamp, truncate), for rows of different ranges, one of them constant."""
    torch.manual_seed(0)
    rows, bins = 7, 32
    values = torch.randn(rows, 1000) * torch.arange(1, rows + 1).unsqueeze(1)
    values[3] = 0.5  # a constant row: every value in the first bin
    lo, hi = values.amin(dim=1), values.amax(dim=1)
    scale = bins / (hi - lo).clamp(min=1e-12)
    expected = torch.stack(
        [torch.bincount(((values[r] - lo[r]) * scale[r]).clamp(0, bins - 1).int(), minlength=bins) for r in range(rows)]
    )
    got = row_histograms(values.clone(), lo, hi, bins)
    assert torch.equal(got, expected)
    assert got[3, 0] == 1000


def packed_alone(values: np.ndarray) -> tuple[bytes, float, int]:
    """The store's blob of one row, written out as its format says: the count, the positions that
    fired, their levels (1-255 of the exact maximum); the maximum and its first position."""
    max_pos = int(values.argmax())
    max_act = float(values[max_pos])
    positions = np.flatnonzero(values > 0).astype("<u2")
    levels = np.clip(np.rint(values[positions] / max_act * 255), 1, 255).astype("u1")
    return np.asarray([positions.size], dtype="<u2").tobytes() + positions.tobytes() + levels.tobytes(), max_act, max_pos


def test_rows_packed_at_once_equal_pack_acts_byte_for_byte():
    """pack_acts_rows (every example of a spill record in one numpy pass) gives each row the blob,
    exact maximum and its first position that packing it alone gives: ties for the maximum, a
    single firing, every position firing, tiny and huge values."""
    rng = np.random.default_rng(0)
    dense = np.zeros((300, 64), dtype=np.float32)
    fired = rng.random(dense.shape) < 0.3
    dense[fired] = (rng.random(fired.sum()) * rng.choice([1e-6, 1.0, 3e4], fired.sum())).astype(np.float32)
    dense[np.arange(300), rng.integers(0, 64, 300)] = 0.75  # every row fires
    dense[:3] = 2.0  # every position at the maximum
    dense[3] = 0.0
    dense[3, 63] = 5.0  # one firing, at the last position
    assert pack_acts_rows(dense) == [packed_alone(row) for row in dense]
    assert [pack_acts(row) for row in dense] == pack_acts_rows(dense)


def test_blobs_unpacked_at_once_equal_unpack_levels():
    """unpack_levels_rows (many blobs in one numpy pass) reads each blob as unpack_levels does,
    an empty one (nothing fired) included."""
    rng = np.random.default_rng(1)
    dense = np.where(rng.random((50, 64)) < 0.3, rng.random((50, 64)), 0.0).astype(np.float32)
    dense[np.arange(50), rng.integers(0, 64, 50)] = 0.5
    blobs = [blob for blob, _, _ in pack_acts_rows(dense)] + [pack_acts(np.zeros(64))[0]]
    counts, positions, levels = unpack_levels_rows(blobs)
    alone = [unpack_levels(blob) for blob in blobs]
    assert counts.tolist() == [p.size for p, _ in alone]
    assert positions.tolist() == np.concatenate([p for p, _ in alone]).tolist()
    assert levels.tolist() == np.concatenate([lv for _, lv in alone]).tolist()


def test_sparse_counts_do_not_depend_on_when_they_coalesce(monkeypatch):
    """Token pairs coalesced after every batch, or only when read, give the same keys, counts
    and fixed-point sums (repeated keys across batches, values that do not add exactly in float)."""
    torch.manual_seed(0)
    batches = [(torch.randint(0, 50, (200,)), torch.rand(200) * 10) for _ in range(6)]
    late, early = SparseCounter(with_sums=True), SparseCounter(with_sums=True)
    monkeypatch.setattr(early, "MIN_PENDING", 1)
    for keys, weights in batches:
        late.add(keys, weights)
        early.add(keys, weights)
        assert not early._pending  # coalesced already
    late.coalesce()
    assert torch.equal(late.keys, early.keys) and torch.equal(late.counts, early.counts)
    assert torch.equal(late.fixed_sums, early.fixed_sums)
    every_key = torch.cat([keys for keys, _ in batches])
    keys, inverse = torch.unique(every_key, return_inverse=True)
    sums = add_fixed(torch.zeros(keys.numel(), 2, dtype=torch.int64), inverse, to_fixed(torch.cat([w for _, w in batches])))
    assert torch.equal(early.keys, keys) and torch.equal(early.counts, torch.bincount(inverse))
    assert torch.equal(early.fixed_sums, sums)


def test_dense_and_sparse_co_activation_counts_agree():
    """The dense triangle of pair counts (an SAE that fits the budget) counts as the sorted sparse
    counter does, and either one's checkpoint restores into either (a run resumed with another
    budget)."""
    gen = torch.Generator().manual_seed(0)
    n_features, max_active = 40, 8
    dense, sparse = CoActivation(n_features, max_active, 1 << 20), CoActivation(n_features, max_active, 0)
    assert isinstance(dense.pairs, TrianglePairs) and isinstance(sparse.pairs, SparseCounter)
    for _ in range(3):
        per_token = torch.randint(0, 12, (300,), generator=gen)  # some tokens above max_active
        token = torch.repeat_interleave(torch.arange(300), per_token)
        feature = torch.cat([torch.randperm(n_features, generator=gen)[:m] for m in per_token.tolist()])
        value = torch.rand(token.numel(), generator=gen) + 0.1
        for counter in (dense, sparse):
            counter.update(token, feature, value, 300)
    sparse.pairs.coalesce()
    assert torch.equal(dense.pairs.keys, sparse.pairs.keys) and torch.equal(dense.pairs.counts, sparse.pairs.counts)
    assert sparse.pairs.keys.numel() > 100
    assert dense.state_dict("c")["c.pairs.table"] is dense.pairs.table  # saved from its own memory
    for saved in (dense.state_dict("c"), sparse.state_dict("c")):
        into_dense, into_sparse = CoActivation(n_features, max_active, 1 << 20), CoActivation(n_features, max_active, 0)
        into_dense.load_state_dict(saved, "c")
        into_sparse.load_state_dict(saved, "c")
        into_sparse.pairs.coalesce()
        assert torch.equal(into_dense.pairs.table, dense.pairs.table)
        assert torch.equal(into_sparse.pairs.keys, sparse.pairs.keys) and torch.equal(into_sparse.pairs.counts, sparse.pairs.counts)
        assert torch.equal(into_dense.occurrences, dense.occurrences) and torch.equal(into_sparse.occurrences, dense.occurrences)


@pytest.mark.parametrize("budget", [1 << 20, 0], ids=["dense", "sparse"])
def test_co_activation_neighbours_rank_by_jaccard_with_ties_in_a_fixed_order(budget):
    """Top Jaccard neighbours from the pair counts, a few rows at a time (a small budget: many
    chunks), equal to ranking each feature's row whole: Jaccard descending, ties to the features
    after it first (i + 1, ..., F - 1, then 0, ..., i - 1), features never co-active left out."""
    gen = torch.Generator().manual_seed(1)
    n_features, n = 30, 12
    coact = CoActivation(n_features, 4, budget)
    per_token = torch.randint(0, 5, (60,), generator=gen)  # few tokens, small counts: many ties
    token = torch.repeat_interleave(torch.arange(60), per_token)
    feature = torch.cat([torch.randperm(n_features, generator=gen)[:m] for m in per_token.tolist()])
    coact.update(token, feature, torch.rand(token.numel(), generator=gen) + 0.1, 60)
    stats = StreamingStats(n_features, 10, top_k=2, per_bin=1, max_active=4, seed=0, memory_budget=budget)
    stats.coact = coact
    got = coactivation_neighbours(stats, n, memory_budget=8 * 4 * 128 * n_features)  # chunks of 8 rows (rows_per_chunk, 128 B a pair)
    both = torch.zeros(n_features, n_features, dtype=torch.int64)
    first, second = coact.pairs.keys // n_features, coact.pairs.keys % n_features
    both[first, second] = both[second, first] = coact.pairs.counts
    union = coact.occurrences[:, None] + coact.occurrences[None, :] - both
    for i in range(n_features):
        order = [j % n_features for j in range(i + 1, i + n_features) if both[i, j % n_features] > 0]
        ranked = sorted(order, key=lambda j: -float(both[i, j] / union[i, j]))[:n]  # sorted is stable
        assert got.index[i].tolist() == ranked + [-1] * (n - len(ranked))
        assert got.score[i, : len(ranked)].tolist() == [float(both[i, j] / union[i, j]) for j in ranked]
    assert (got.index >= 0).sum() > 100 and (got.index == -1).any()


class Killed(Exception):
    pass


def kill_after_batches(monkeypatch, n: int) -> None:
    """Make the n+1-th batch of the first pass die, as a SIGKILL would, after n batches."""
    calls = {"n": 0}
    original = StreamingStats.update

    def update(self, batch):
        calls["n"] += 1
        if calls["n"] > n:
            raise Killed
        original(self, batch)

    monkeypatch.setattr(StreamingStats, "update", update)


def kill_during_write(monkeypatch) -> None:
    import sae_core.precompute.writer as precompute_store

    original = precompute_store.insert_rows

    def insert_rows(conn, table, rows):
        if table.__tablename__ == "examples":
            raise Killed
        original(conn, table, rows)

    monkeypatch.setattr(precompute_store, "insert_rows", insert_rows)


def resume_equals_uninterrupted(run_on, url_a, url_b, monkeypatch):
    run_on(url_a)
    with monkeypatch.context() as mp:
        kill_after_batches(mp, 7)  # past the checkpoint at 6 batches
        with pytest.raises(Killed):
            run_on(url_b)
    assert dump(url_b)["saes"][0][1] == "running"
    with monkeypatch.context() as mp:
        kill_during_write(mp)
        with pytest.raises(Killed):
            run_on(url_b)
    assert dump(url_b)["features"] == []
    result = run_on(url_b)
    assert result.resumed_from_batch > 0
    assert dump(url_b) == dump(url_a)


def test_resume_after_kill_equals_uninterrupted_sqlite(run_on, tmp_path, monkeypatch):
    resume_equals_uninterrupted(run_on, f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}", monkeypatch)


@pytest.mark.postgres
def test_resume_after_kill_equals_uninterrupted_postgres(run_on, make_pg_schema, monkeypatch):
    resume_equals_uninterrupted(run_on, make_pg_schema("pc"), make_pg_schema("pc"), monkeypatch)


def test_complete_sae_is_skipped_and_force_replaces_it(run_on, tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 's.db'}"
    first = run_on(db)
    before = dump(db)
    assert run_on(db).skipped
    assert "already complete" in capsys.readouterr().err
    replaced = run_on(db, force=True, top_k=2)
    after = dump(db)
    assert not replaced.skipped and after != before
    assert [row[0] for row in after["saes"]] == [first.name]
    assert max(row[3] for row in after["examples"] if row[1] == "top") == 1
    run_on(db, name="second")  # another SAE side by side
    assert [row[0] for row in dump(db)["saes"]] == sorted([first.name, "second"])


def batches_checkpointed() -> int:
    """The most batches a checkpoint in this test's cache holds (0 before the first)."""
    done = 0
    for path in (cache_dir() / "precompute").glob("*.ckpt"):
        try:
            with safe_open(path, framework="pt") as fh:
                done = max(done, int(fh.metadata()["batches_done"]))
        except FileNotFoundError:  # the run finished and removed it
            pass
    return done


def test_checkpoint_files_are_safetensors_written_without_a_copy(tmp_path):
    """Our streaming writer against safetensors' own reader, and against its writer's file."""
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "hist": torch.randint(0, 1 << 40, (5, 7), generator=gen),
        "max": torch.randn(5, generator=gen),
        "keys": torch.randint(0, 99, (3,), generator=gen, dtype=torch.int32),
        "fired": torch.rand(6, generator=gen) > 0.5,
        "bytes": torch.randint(0, 255, (9,), generator=gen, dtype=torch.uint8),
        "n_tokens": torch.tensor(12345),
        "empty": torch.zeros(0, 4),
    }
    meta = {"batches_done": "3", "spill_bytes": "4096"}
    write_safetensors(tmp_path / "a.ckpt", tensors, meta)
    assert [p.name for p in tmp_path.iterdir()] == ["a.ckpt"]  # the temporary file was renamed
    save_file(tensors, tmp_path / "b.ckpt", metadata=meta)
    for path in (tmp_path / "a.ckpt", tmp_path / "b.ckpt"):
        loaded = load_file(path)
        assert loaded.keys() == tensors.keys()
        for name, tensor in tensors.items():
            assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
        with safe_open(path, framework="pt") as fh:
            assert fh.metadata() == meta


def test_a_damaged_checkpoint_file_is_not_resumed_from(tmp_path):
    files = ResumeFiles(tmp_path / "a.spill", tmp_path / "a.ckpt")
    files.spill.write_bytes(b"x" * 64)
    files.save(Checkpoint(2, 64, {"count": torch.arange(5)}))
    assert files.load().batches_done == 2
    files.checkpoint.write_bytes(files.checkpoint.read_bytes()[:20])  # cut short on disk
    assert files.load() is None


def leftover_files() -> list[str]:
    """Spills and checkpoints still in this test's cache: none once every SAE is published."""
    return sorted(path.name for path in (cache_dir() / "precompute").glob("*"))


@pytest.mark.slow
def test_sigkill_then_the_same_command_resumes(llama_dir, corpus, planted, run_on, tmp_path):
    """The real thing: `saescope precompute` SIGKILLed mid-run, then run again."""
    db = f"sqlite:///{tmp_path / 'killed.db'}"
    command = [
        sys.executable, "-m", "sae_core", "precompute", "--sae", str(planted[0]), "--db", db,
        "--model", str(llama_dir), "--corpus", corpus, "--ctx-len", str(CTX_LEN), "--tokens", "0",
        "--batch-size", "1", "--checkpoint-every", "1", "--top-k", "6", "--per-bin", "3",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same float rounding as this process's single thread
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 120
    while batches_checkpointed() < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "precompute finished before it could be killed"
    assert dump(db)["saes"][0][1] == "running"
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert finished.returncode == 0, finished.stderr
    assert "resuming" in finished.stderr
    assert leftover_files() == []
    reference = f"sqlite:///{tmp_path / 'reference.db'}"  # uninterrupted, in a fresh process too
    untouched = subprocess.run([*command[:command.index("--db") + 1], reference, *command[command.index("--db") + 2:]],
                               capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert untouched.returncode == 0, untouched.stderr
    assert dump(db) == dump(reference)


def test_user_errors_are_one_line(tmp_path, capsys):
    from sae_core.cli import main

    sae = SAE(SAEConfig(d_in=8, d_sae=16, architecture="topk", k=2, layer=0))  # names no model
    sae.save(tmp_path / "anonymous")
    db = f"sqlite:///{tmp_path / 's.db'}"
    assert main(["precompute", "--sae", str(tmp_path / "anonymous"), "--db", db]) == 2
    assert capsys.readouterr().err.strip() == f"saescope: error: {tmp_path / 'anonymous'} does not name its model; pass --model"
    assert main(["precompute", "--sae", str(tmp_path / "anonymous"), "--model", "m", "--name", "a b", "--db", db]) == 2
    assert "--name 'a b' must be" in capsys.readouterr().err
    assert main(["precompute", "--sae", str(tmp_path / "anonymous"), "--top-k", "0", "--db", db]) == 2
    assert capsys.readouterr().err.strip() == "saescope: error: --top-k must be at least 1, not 0"
    assert not (tmp_path / "s.db").exists()


# ---------------------------------------------------------------------------------------------
# Several SAEs in one pass (a release)


@pytest.fixture(scope="module")
def release_folder(llama, planted, tmp_path_factory):
    """A folder of three SAE folders on layers 0, 1 (the planted one) and 2, of three widths."""
    import shutil

    folder = tmp_path_factory.mktemp("release")
    shutil.copytree(planted[0], folder / "b-planted")
    for name, layer, width in (("a-first", 0, 32), ("c-last", 2, 64)):
        gen = torch.Generator().manual_seed(layer)
        sae = SAE(SAEConfig(d_in=llama.d_model, d_sae=width, architecture="topk", k=3, model_name="tiny", layer=layer))
        sae.W_enc.data = torch.randn(llama.d_model, width, generator=gen) * 0.3
        sae.W_dec.data = torch.randn(width, llama.d_model, generator=gen)
        sae.save(folder / name)
    return folder


def dump_sae(db_url: str, name: str) -> dict[str, list]:
    """``dump`` of one SAE of a store holding several, JSON parsed (SQLite returns it as text,
    PostgreSQL parsed), so stores on either compare."""
    engine = create_engine_for(db_url)
    with engine.connect() as conn:
        sae_id = conn.execute(sa.select(SaeRow.id).where(SaeRow.name == name)).scalar_one()
    engine.dispose()
    tables = dump(db_url, sae_id)
    tables["saes"] = [row for row in tables["saes"] if row[0] == name]

    def parsed(value):
        return json.loads(value) if isinstance(value, str) and value[:1] in "[{" else value

    return {table: [tuple(parsed(v) for v in row) for row in rows] for table, rows in tables.items()}


def release_of(db_url: str) -> dict[str, str]:
    engine = create_engine_for(db_url)
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "select saes.name, releases.name from saes left join releases on releases.id = saes.release_id"
        ).all()
    engine.dispose()
    return dict(rows)


@pytest.fixture(scope="module")
def alone_store(llama_dir, corpus, release_folder, tmp_path_factory):
    """The three SAEs precomputed one by one, each alone."""
    db = f"sqlite:///{tmp_path_factory.mktemp('alone') / 's.db'}"
    for folder in sorted(release_folder.iterdir()):
        run_precompute(config(folder, db, corpus, model=str(llama_dir)))
    return db


@pytest.fixture
def names(llama_dir) -> list[str]:
    from sae_core.precompute.run import model_slug

    return [f"{model_slug(str(llama_dir))}-{suffix}" for suffix in ("l0-topk-32", "l1-topk-48", "l2-topk-64")]


def run_release(llama_dir, corpus, release_folder, db, **overrides):
    return run_precompute(config(release_folder, db, corpus, model=str(llama_dir), **overrides))


def test_one_pass_over_a_release_equals_each_sae_alone(
    llama_dir, corpus, release_folder, alone_store, names, tmp_path, monkeypatch
):
    from sae_core.inputs.subject import Subject

    forwards = []
    original = Subject.forward_to_layers
    monkeypatch.setattr(Subject, "forward_to_layers", lambda self, ids, layers, *a: forwards.append(sorted(layers)) or original(self, ids, layers, *a))
    db = f"sqlite:///{tmp_path / 'together.db'}"
    results = run_release(llama_dir, corpus, release_folder, db, release="tiny-release")
    n_batches = -(-len(contexts_for_dir(llama_dir, corpus)) // 4)
    assert forwards == [[0, 1, 2]] * n_batches  # one forward per batch, to the deepest layer
    assert [r.name for r in results] == names and not any(r.skipped for r in results)
    for name in names:
        assert dump_sae(db, name) == dump_sae(alone_store, name)
    assert release_of(db) == dict.fromkeys(names, "tiny-release")
    assert set(release_of(alone_store).items()) == {(name, name) for name in names}  # releases of one

    forwards.clear()  # again: every SAE is complete, nothing is run
    assert all(r.skipped for r in run_release(llama_dir, corpus, release_folder, db, release="tiny-release"))
    assert forwards == []


def test_a_release_read_from_activation_caches_equals_a_forward_rounded_like_them(
    llama_dir, corpus, release_folder, names, tmp_path, monkeypatch
):
    """--reuse-activations: layers 0 and 2 come from caches of the corpus (as training leaves
    them), layer 1 has none and is computed; the store is the one a forward whose layers 0 and 2
    are rounded to fp16 gives."""
    from sae_core.inputs.activations import ActivationCache
    from sae_core.inputs.subject import Subject, load_subject

    subject = load_subject(str(llama_dir))
    contexts = contexts_for(subject, corpus)
    folders = {layer: ActivationCache.default_folder(subject, layer, contexts) for layer in (0, 2)}
    # batches of precompute's size, so that the fp32 sums (which the batch shape can change in the
    # last bit) round to the same fp16 values
    ActivationCache.build_layers(subject, folders, contexts, batch_size=4, progress=False)
    forwards = []
    original = Subject.forward_to_layers

    def rounded(self, ids, layers, *args):
        forwards.append(sorted(layers))
        return {layer: acts.half().float() if layer != 1 else acts for layer, acts in original(self, ids, layers, *args).items()}

    monkeypatch.setattr(Subject, "forward_to_layers", rounded)
    reused = f"sqlite:///{tmp_path / 'reused.db'}"
    run_release(llama_dir, corpus, release_folder, reused, reuse_activations=True)
    assert forwards == [[1]] * -(-len(contexts) // 4)  # the model runs for the layer without a cache only
    computed = f"sqlite:///{tmp_path / 'computed.db'}"
    run_release(llama_dir, corpus, release_folder, computed)

    def without_source(tables: dict) -> dict:
        [sae] = tables["saes"]
        cfg = sae[-1]
        return {**tables, "saes": [(*sae[:-1], {key: value for key, value in cfg.items() if key != "activations"})]}

    for name in names:
        assert without_source(dump_sae(reused, name)) == without_source(dump_sae(computed, name))
        assert dump_sae(reused, name)["saes"][0][-1].get("activations") == (None if "-l1-" in name else "fp16 cache")


def contexts_for_dir(llama_dir, corpus):
    from sae_core.inputs.subject import load_subject

    return contexts_for(load_subject(str(llama_dir)), corpus)


def kill_during_nth_write(monkeypatch, n: int) -> None:
    """Die while writing the examples of the n-th SAE published."""
    import sae_core.precompute.writer as precompute_store

    original, seen = precompute_store.insert_rows, {"examples": 0}

    def insert_rows(conn, table, rows):
        if table.__tablename__ == "examples":
            seen["examples"] += 1
            if seen["examples"] == n:
                raise Killed
        original(conn, table, rows)

    monkeypatch.setattr(precompute_store, "insert_rows", insert_rows)


def checkpoint_of(db_url: str, name: str) -> Path:
    """The checkpoint file of the single-process run writing SAE ``name`` into ``db_url``."""
    engine = create_engine_for(db_url)
    with engine.connect() as conn:
        sae_id, identity = conn.execute(sa.select(SaeRow.id, SaeRow.precompute_cfg).where(SaeRow.name == f"{name}~staging")).one()
    engine.dispose()
    return ResumeFiles.of(db_url, sae_id, identity, distributed.World(0, 1, 0)).checkpoint


def release_resumes_after_kills(llama_dir, corpus, release_folder, alone_store, names, db, monkeypatch):
    with monkeypatch.context() as mp:
        kill_after_batches(mp, 3 * 7 + 1)  # mid-batch 8, past the checkpoints at 6 batches
        with pytest.raises(Killed):
            run_release(llama_dir, corpus, release_folder, db)
    checkpoint_of(db, names[1]).unlink()  # one SAE lost its checkpoint: it starts over, the others resume
    with monkeypatch.context() as mp:
        kill_during_nth_write(mp, 2)  # the first SAE is published, the second dies writing
        with pytest.raises(Killed):
            run_release(llama_dir, corpus, release_folder, db)
    statuses = dict(row[:2] for row in dump(db)["saes"])
    assert statuses == {names[0]: "complete", f"{names[1]}~staging": "running", f"{names[2]}~staging": "running"}
    results = run_release(llama_dir, corpus, release_folder, db)
    assert [r.skipped for r in results] == [True, False, False] and results[2].resumed_from_batch > 0
    for name in names:
        assert dump_sae(db, name) == dump_sae(alone_store, name)
    assert leftover_files() == []
    assert set(release_of(db).values()) == {names[0].replace("l0-topk-32", "l0-1-2-w32-48-64")}


def test_release_resumes_after_kills_sqlite(llama_dir, corpus, release_folder, alone_store, names, tmp_path, monkeypatch):
    db = f"sqlite:///{tmp_path / 'r.db'}"
    release_resumes_after_kills(llama_dir, corpus, release_folder, alone_store, names, db, monkeypatch)


@pytest.mark.postgres
def test_release_resumes_after_kills_postgres(llama_dir, corpus, release_folder, alone_store, names, make_pg_schema, monkeypatch):
    db = make_pg_schema("rel")
    release_resumes_after_kills(llama_dir, corpus, release_folder, alone_store, names, db, monkeypatch)


def test_release_errors_are_one_line_naming_the_sae(llama_dir, corpus, release_folder, names, tmp_path, capsys):
    from sae_core.cli import main

    db = f"sqlite:///{tmp_path / 's.db'}"
    base = ["precompute", "--db", db, "--corpus", corpus, "--ctx-len", str(CTX_LEN), "--tokens", "0", "--no-label"]
    other = SAE(SAEConfig(d_in=32, d_sae=8, architecture="topk", k=2, model_name="gpt2", layer=0))
    other.save(tmp_path / "gpt2-sae")
    assert main([*base, "--sae", str(release_folder / "a-first"), "--sae", str(tmp_path / "gpt2-sae")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"saescope: error: {tmp_path / 'gpt2-sae'} is an SAE of gpt2, not tiny like {release_folder / 'a-first'}; "
        "precompute the SAEs of one model per call"
    )
    deep = SAE(SAEConfig(d_in=32, d_sae=8, architecture="topk", k=2, model_name="tiny", layer=9))
    deep.save(tmp_path / "deep")
    model = ["--model", str(llama_dir)]
    assert main([*base, *model, "--sae", str(release_folder), "--sae", str(tmp_path / "deep")]) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]  # after the model's loading bar
    assert last_line == f"saescope: error: {tmp_path / 'deep'} reads layer 9, but {llama_dir} has layers 0..3"
    assert main([*base, *model, "--sae", str(release_folder), "--name", "x"]) == 2
    assert "--name applies to one SAE, and 3 are given" in capsys.readouterr().err
    assert not (tmp_path / "s.db").exists()  # refused before any work

    one = [*base, *model, "--sae", str(release_folder / "a-first"), "--release", "mine"]
    assert main(one) == 0
    two = [*base, *model, "--sae", str(release_folder / "c-last"), "--release", "mine"]
    assert main(two) == 2
    assert capsys.readouterr().err.strip().endswith(
        f"release 'mine' already holds {names[0]}; pass --force to take the name, or choose another --release"
    )
    assert main([*two, "--force"]) == 0
    assert release_of(db) == {names[0]: names[0], names[2]: "mine"}
