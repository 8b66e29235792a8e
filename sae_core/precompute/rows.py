"""Precompute's results as store rows (dicts for bulk inserts; a JSON column as its text,
``json.dumps`` of the value, as SQLAlchemy's JSON type writes it: see writer.insert_rows). Small
JSON: floats are rounded to the precision a page shows, and a histogram keeps only the bins up to
the feature's maximum."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from typing import NamedTuple

import torch

from sae_core.precompute.results import FeatureWords, Intervals, Neighbours, TokenFeatures
from sae_core.precompute.spill import PackedActs
from sae_core.precompute.stats import FINE_BINS, FeatureStats, TopContexts
from sae_core.precompute.weights import LogitEffects
from sae_core.precompute.writer import StoreRows
from sae_core.store.db import pack_tokens

DIGITS = 5  # significant digits kept in JSON: finer than any page or plot resolves
# features whose columns are Python lists at once: all 16,384 of a wide SAE's held ~120 MB while written
FEATURES_AT_ONCE = 2048


class RowInputs(NamedTuple):
    sae_id: int
    n_tokens: int
    bins: int
    features: FeatureStats
    top: TopContexts
    intervals: Intervals
    sample_context: torch.Tensor  # (F, bins, per_bin) by descending priority
    sample_value: torch.Tensor  # (F, bins, per_bin) the context's max activation
    sample_filled: torch.Tensor  # (F, bins, per_bin)
    packed: dict[int, PackedActs]  # key context * F + feature
    context_tokens: dict[int, torch.Tensor]  # context id -> (seq,) token ids
    logits: LogitEffects
    decoder: Neighbours
    coact: Neighbours
    token_features: TokenFeatures
    feature_words: FeatureWords


SHORT = f".{DIGITS}g"  # the format spec, built once: short() runs ~100 times per feature


def short(x: float) -> float:
    return float(format(x, SHORT))


@functools.lru_cache(maxsize=1024)
def fine_edges(scale: float, n_fine: int) -> tuple[float, ...]:
    """Edges of a feature's first ``n_fine`` fine bins over (0, scale]. Scales are powers of two,
    so a handful of (scale, n_fine) pairs cover every feature: cached, the ~50 edges of each are
    rounded once per pair, not once per feature (a third of a 16,384-wide SAE's ``short`` calls)."""
    width = scale / FINE_BINS
    return tuple(short(g * width) for g in range(n_fine + 1))


def store_rows(r: RowInputs) -> StoreRows:
    return StoreRows(
        features=feature_rows(r),
        examples=example_rows(r),
        contexts=(
            {"sae_id": r.sae_id, "id": c, "token_ids": pack_tokens(tokens.numpy())}
            for c, tokens in sorted(r.context_tokens.items())
        ),
        token_features=token_feature_rows(r.sae_id, r.token_features),
        feature_words=feature_word_rows(r.sae_id, r.feature_words),
    )


def pairs(ids: list, values: list) -> list[list]:
    return [[int(i), short(v)] for i, v in zip(ids, values, strict=True) if i >= 0]


def feature_rows(r: RowInputs) -> Iterator[dict]:
    total = r.features.sum  # (F,) float64, converted from fixed point once
    n_features = total.numel()
    for start in range(0, n_features, FEATURES_AT_ONCE):
        yield from feature_rows_in(r, total, start, min(start + FEATURES_AT_ONCE, n_features))


def feature_rows_in(r: RowInputs, total_sum: torch.Tensor, start: int, stop: int) -> Iterator[dict]:
    """``feature_rows`` of features [start, stop): only their columns become Python lists."""

    def cols(*tensors: torch.Tensor) -> list[list]:
        return [t[start:stop].tolist() for t in tensors]

    f, iv, lg = r.features, r.intervals, r.logits
    count, total, max_act, scale, hist = cols(f.count, total_sum, f.max, f.scale, f.hist)
    n_fine, iv_lo, iv_hi, iv_count, iv_share = cols(iv.n_fine, iv.lo, iv.hi, iv.count, iv.share)
    top_ids, top_values, bottom_ids, bottom_values = cols(lg.top_ids, lg.top_values, lg.bottom_ids, lg.bottom_values)
    lo, hi, logit_counts = cols(lg.hist_lo, lg.hist_hi, lg.hist_counts)
    dec_i, dec_s, co_i, co_s = cols(r.decoder.index, r.decoder.score, r.coact.index, r.coact.score)
    n_tokens = max(r.n_tokens, 1)
    for i in range(stop - start):
        yield {
            "sae_id": r.sae_id,
            "idx": start + i,
            "count": count[i],
            "density": count[i] / n_tokens,
            "max_act": max_act[i],
            "mean_act": total[i] / count[i] if count[i] else 0.0,
            "act_hist": json.dumps({"edges": fine_edges(scale[i], n_fine[i]), "counts": hist[i][: n_fine[i]]}),
            "intervals": json.dumps(
                [
                    {"bin": b, "lo": short(iv_lo[i][b]), "hi": short(iv_hi[i][b]), "share": short(iv_share[i][b]), "count": iv_count[i][b]}
                    for b in range(r.bins)
                ]
                if count[i]
                else []
            ),
            "logit_top": json.dumps(pairs(top_ids[i], top_values[i])),
            "logit_bottom": json.dumps(pairs(bottom_ids[i], bottom_values[i])),
            "logit_hist": json.dumps(
                {
                    "edges": [short(lo[i] + (hi[i] - lo[i]) * b / len(logit_counts[i])) for b in range(len(logit_counts[i]) + 1)],
                    "counts": logit_counts[i],
                }
            ),
            "neighbours_cos": json.dumps(pairs(dec_i[i], dec_s[i])),
            "neighbours_coact": json.dumps(pairs(co_i[i], co_s[i])),
        }


def example_rows(r: RowInputs) -> Iterator[dict]:
    n_features = r.features.count.numel()
    top_context, top_value = r.top.context.tolist(), r.top.value.tolist()
    for i in range(n_features):
        for rank, (c, v) in enumerate(zip(top_context[i], top_value[i], strict=True)):
            if c >= 0:
                yield example_row(r, i, "top", 0, rank, c, v)
    filled = r.sample_filled.nonzero().tolist()
    contexts, values = r.sample_context[r.sample_filled].tolist(), r.sample_value[r.sample_filled].tolist()
    for (i, b, rank), c, v in zip(filled, contexts, values, strict=True):
        yield example_row(r, i, "interval", b, rank, c, v)


def example_row(r: RowInputs, feature: int, kind: str, bin_: int, rank: int, context: int, value: float) -> dict:
    packed = r.packed[context * r.features.count.numel() + feature]
    return {
        "sae_id": r.sae_id,
        "feature_idx": feature,
        "kind": kind,
        "bin": bin_,
        "rank": rank,
        "context_id": context,
        "max_act": value,
        "max_pos": packed.max_pos,
        "acts": packed.blob,
    }


def token_feature_rows(sae_id: int, t: TokenFeatures) -> Iterator[dict]:
    columns = (t.token_id.tolist(), t.rank.tolist(), t.feature.tolist(), t.mean_act.tolist(), t.count.tolist())
    for token_id, rank, feature, mean_act, count in zip(*columns, strict=True):
        yield {"sae_id": sae_id, "token_id": token_id, "rank": rank, "feature_idx": feature, "mean_act": mean_act, "count": count}


def feature_word_rows(sae_id: int, w: FeatureWords) -> Iterator[dict]:
    """One row per feature, its words' lists packed, most firings first."""
    features, counts = torch.unique_consecutive(w.feature, return_counts=True)
    stops = torch.cumsum(counts, 0)
    for feature, start, stop in zip(features.tolist(), (stops - counts).tolist(), stops.tolist(), strict=True):
        yield {
            "sae_id": sae_id,
            "feature_idx": feature,
            "token_ids": pack_tokens(w.token_id[start:stop].numpy()),
            "counts": pack_tokens(w.count[start:stop].numpy()),
            "occurrences": pack_tokens(w.occurrences[start:stop].numpy()),
        }
