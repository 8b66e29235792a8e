"""A synthetic store written through sae_core.store.db's tables: the browser's tests and benchmark
read it like one that precompute wrote, with known features planted in it.

Planted, whatever the size:
- feature 0 is labelled ``<script>alert(1)</script> tags`` and its examples and logit effects
  contain the vocabulary token ``<script>alert(1)</script>``;
- features 1, 2 and 3 fire on the token " Paris" (ranked 3 > 1 > 2 by mean activation) and
  feature 1 is labelled "capital cities like Paris";
- every feature whose index is 4 mod 7 is dead (never fired, no examples);
- features 5 and 6 neighbour each other (decoder cosine and co-activation), and feature 0 is
  among feature 1's neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from sae_core.store.db import (
    ContextRow,
    ExampleRow,
    FeatureRow,
    SaeRow,
    SubjectModelRow,
    TokenFeatureRow,
    VocabRow,
    migrate,
    pack_acts,
    pack_tokens,
)

SCRIPT = "<script>alert(1)</script>"
WORDS = [
    SCRIPT,
    " Paris",
    "Paris",
    " Lyon",
    " the",
    " capital",
    "\n",
    "    ",
    "def",
    " return",
    '"',
    "&amp;",
]
LABELS = [
    "capital cities like Paris",
    "Python function definitions",
    "indentation inside loops",
    "closing quotes of strings",
    "the word 'return'",
    None,  # unlabelled features exist too
]


@dataclass(frozen=True)
class StoreSpec:
    sae_name: str = "tiny-l1-topk"
    model_name: str = "tiny-llama"
    n_features: int = 48
    vocab_size: int = 256
    n_contexts: int = 300
    ctx_len: int = 65  # BOS + 64 tokens, as precompute stores them
    n_top: int = 20
    n_bins: int = 5
    per_bin: int = 5
    n_neighbours: int = 8
    token_index_size: int = (
        0  # features indexed per vocabulary token besides the planted " Paris" ones
    )
    seed: int = 0


@dataclass(frozen=True)
class SyntheticStore:
    spec: StoreSpec
    script_feature: int = 0
    paris_features: tuple[int, ...] = (3, 1, 2)  # ranked by mean activation on " Paris"
    labelled_paris: int = 1
    neighbour_pair: tuple[int, int] = (5, 6)

    def dead(self, index: int) -> bool:
        return index % 7 == 4

    @property
    def dead_features(self) -> list[int]:
        return [i for i in range(self.spec.n_features) if self.dead(i)]


def _vocab(spec: StoreSpec) -> list[str]:
    return WORDS + [f" w{i}" for i in range(spec.vocab_size - len(WORDS))]


def _label(index: int, store: SyntheticStore) -> str | None:
    if index == store.script_feature:
        return f"{SCRIPT} tags"
    if index == store.labelled_paris:
        return LABELS[0]
    return LABELS[index % len(LABELS)]


def _acts_for(rng: np.random.Generator, ctx_len: int, peak: float, peak_pos: int) -> np.ndarray:
    """Sparse activations of one example: a peak and a few weaker tokens."""
    values = np.zeros(ctx_len, dtype=np.float32)
    others = rng.choice(np.arange(1, ctx_len), size=6, replace=False)
    values[others] = rng.uniform(0.05, 0.5, size=6) * peak
    values[peak_pos] = peak
    return values


def _example_rows(
    rng, spec: StoreSpec, sae_id: int, index: int, max_act: float, context_ids
) -> list[dict]:
    rows = []
    peaks = np.sort(rng.uniform(0.5, 1.0, spec.n_top))[::-1] * max_act
    peaks[0] = max_act
    picks = [("top", 0, rank, float(p)) for rank, p in enumerate(peaks)]
    edges = np.linspace(0, max_act, spec.n_bins + 1)
    for b in range(spec.n_bins):
        for rank in range(spec.per_bin):
            picks.append(("interval", b, rank, float(rng.uniform(edges[b], edges[b + 1]))))
    for kind, b, rank, peak in picks:
        blob, exact_max, max_pos = pack_acts(
            _acts_for(rng, spec.ctx_len, peak, int(rng.integers(1, spec.ctx_len)))
        )
        rows.append(
            dict(
                sae_id=sae_id,
                feature_idx=index,
                kind=kind,
                bin=b,
                rank=rank,
                acts=blob,
                context_id=int(context_ids[rng.integers(len(context_ids))]),
                max_act=exact_max,
                max_pos=max_pos,
            )
        )
    return rows


def _card_column(ev: float, spec: str, role: str) -> dict:
    """One report-card column as metrics.json holds it (other fields of Metrics left out)."""
    return {
        "corpus": {"spec": spec, "role": role, "note": ""},
        "n_tokens": 8192, "n_predictions": 8064, "n_kl_positions": 8192,
        "delta_ce": 0.12 if role == "held out" else 0.4, "kl_div": 0.2, "ce_loss_recovered": 0.93,
        "ce_loss_recovered_mean_ablation": 0.71, "explained_variance": ev, "explained_variance_without_massive": 0.5,
        "n_massive_tokens": 5, "l0": 8.0,
    }  # fmt: skip


def _histogram(rng, lo: float, hi: float, bins: int = 20) -> dict:
    return {
        "edges": np.linspace(lo, hi, bins + 1).round(4).tolist(),
        "counts": rng.integers(0, 500, bins).tolist(),
    }


def _feature_row(
    rng, spec: StoreSpec, store: SyntheticStore, sae_id: int, index: int, n_tokens: int
) -> dict:
    n, vocab = spec.n_features, spec.vocab_size
    dead = store.dead(index)
    count = 0 if dead else int(rng.integers(1, n_tokens // 10))
    max_act = 0.0 if dead else float(rng.uniform(1, 20))
    top_tokens = rng.choice(vocab, 10, replace=False).tolist()
    if index == store.script_feature:
        top_tokens[0] = 0  # the <script> token
    others = rng.choice(n - 1, spec.n_neighbours, replace=False)  # indices other than this one
    neighbours = [int(j) + int(j >= index) for j in others]
    a, b = store.neighbour_pair
    if index in (a, b):
        neighbours[0] = b if index == a else a
    if index == store.labelled_paris and store.script_feature not in neighbours:
        neighbours[-1] = store.script_feature
    label = _label(index, store)
    return dict(
        sae_id=sae_id,
        idx=index,
        count=count,
        density=count / n_tokens,
        max_act=max_act,
        mean_act=max_act / 3,
        act_hist={} if dead else _histogram(rng, 0, max_act),
        intervals=[]
        if dead
        else [
            {
                "bin": b,
                "lo": max_act * b / spec.n_bins,
                "hi": max_act * (b + 1) / spec.n_bins,
                "share": 1 / spec.n_bins,
                "count": count // spec.n_bins,
            }
            for b in range(spec.n_bins)
        ],
        logit_top=[[t, round(1.0 - 0.05 * r, 3)] for r, t in enumerate(top_tokens)],
        logit_bottom=[
            [int(t), round(-1.0 + 0.05 * r, 3)]
            for r, t in enumerate(rng.choice(vocab, 10, replace=False))
        ],
        logit_hist=_histogram(rng, -1, 1),
        neighbours_cos=[[j, round(0.9 - 0.05 * r, 3)] for r, j in enumerate(neighbours)],
        neighbours_coact=[
            [j, round(0.8 - 0.05 * r, 3)] for r, j in enumerate(reversed(neighbours))
        ],
        label=label,
        label_source="auto" if label else None,
        label_precision=0.8 if label else None,
        label_recall=0.6 if label else None,
        label_f1=round(0.3 + 0.6 * ((index * 37) % 100) / 100, 3) if label else None,
    )


def _token_index(
    rng, spec: StoreSpec, store: SyntheticStore, sae_id: int, paris: int
) -> list[dict]:
    """The planted " Paris" features, then ``token_index_size`` random ones for every other token."""
    rows = [
        dict(
            sae_id=sae_id,
            token_id=paris,
            rank=rank,
            feature_idx=f,
            mean_act=3.0 - rank,
            count=10 - rank,
        )
        for rank, f in enumerate(store.paris_features)
    ]
    for token in range(spec.vocab_size) if spec.token_index_size else ():
        if token == paris:
            continue
        features = rng.choice(spec.n_features, spec.token_index_size, replace=False)
        acts = np.sort(rng.uniform(0.1, 5.0, spec.token_index_size))[::-1]
        rows += [
            dict(
                sae_id=sae_id,
                token_id=token,
                rank=r,
                feature_idx=int(f),
                mean_act=float(a),
                count=int(a * 10),
            )
            for r, (f, a) in enumerate(zip(features, acts, strict=True))
        ]
    return rows


def _insert(conn, table, rows: list[dict], chunk: int = 5000) -> None:
    for start in range(0, len(rows), chunk):
        conn.execute(sa.insert(table), rows[start : start + chunk])


def _insert_model(conn, spec: StoreSpec, vocab: list[str]) -> int:
    model_id = conn.execute(
        sa.insert(SubjectModelRow)
        .values(
            name=spec.model_name,
            source="synthetic",
            architecture="llama",
            d_model=32,
            n_layers=4,
            vocab_size=len(vocab) + 1,
            bos_token_id=len(vocab),
        )
        .returning(SubjectModelRow.id)
    ).scalar_one()
    _insert(
        conn,
        VocabRow.__table__,
        [dict(model_id=model_id, token_id=i, text=t) for i, t in enumerate(vocab + ["<|bos|>"])],
    )
    return model_id


def build_synthetic_store(
    engine: Engine, spec: StoreSpec = StoreSpec(), *, model_id: int | None = None
) -> SyntheticStore:
    """Create the schema on ``engine`` and write one model and one SAE with ``spec``'s sizes
    (``model_id``: add the SAE to a model written before, with the same vocabulary)."""
    migrate(engine)
    store = SyntheticStore(spec=spec)
    rng = np.random.default_rng(spec.seed)
    n_tokens = spec.n_contexts * (spec.ctx_len - 1)
    vocab = _vocab(spec)
    with engine.begin() as conn:
        if model_id is None:
            model_id = _insert_model(conn, spec, vocab)
        densities = []  # filled below, for the SAE's density histogram
        sae_id = conn.execute(
            sa.insert(SaeRow)
            .values(
                name=spec.sae_name,
                model_id=model_id,
                layer=2,
                hook_name="model.layers.2",
                architecture="topk",
                d_in=32,
                d_sae=spec.n_features,
                k=8,
                l1_coeff=None,
                path="/synthetic",
                train_cfg={"tokens_trained": 1_000_000},
                metrics={
                    "held_out": _card_column(0.81, "synthetic", "held out"),
                    "other_corpus": _card_column(0.64, f"prose {SCRIPT}", "other corpus"),
                    "how": {"l0": f"mean active latents per held-out token {SCRIPT}"},
                },
                corpus={
                    "spec": "synthetic",
                    "ctx_len": spec.ctx_len - 1,
                    "seed": spec.seed,
                    "n_contexts": spec.n_contexts,
                },
                precompute_cfg={"top_k": spec.n_top, "bins": spec.n_bins},
                n_tokens=n_tokens,
                status="complete",
            )
            .returning(SaeRow.id)
        ).scalar_one()
        contexts = rng.integers(0, len(vocab), size=(spec.n_contexts, spec.ctx_len))
        contexts[:, 0] = len(vocab)  # BOS
        contexts[0, 5] = 0  # the <script> token, in the context feature 0's examples use
        _insert(
            conn,
            ContextRow.__table__,
            [dict(sae_id=sae_id, id=i, token_ids=pack_tokens(c)) for i, c in enumerate(contexts)],
        )
        features, examples = [], []
        for index in range(spec.n_features):
            row = _feature_row(rng, spec, store, sae_id, index, n_tokens)
            features.append(row)
            if row["count"]:
                densities.append(row["density"])
                context_ids = range(1) if index == store.script_feature else range(spec.n_contexts)
                examples += _example_rows(rng, spec, sae_id, index, row["max_act"], context_ids)
        _insert(conn, FeatureRow.__table__, features)
        _insert(conn, ExampleRow.__table__, examples)
        _insert(
            conn,
            TokenFeatureRow.__table__,
            _token_index(rng, spec, store, sae_id, vocab.index(" Paris")),
        )
        log_density = np.log10(densities)
        counts, edges = np.histogram(log_density, bins=20)
        conn.execute(
            sa.update(SaeRow)
            .where(SaeRow.id == sae_id)
            .values(density_hist={"edges": edges.round(4).tolist(), "counts": counts.tolist()})
        )
    return store


def add_release(engine: Engine, spec: StoreSpec, name: str, cells: list[tuple[int, int]]) -> list[str]:
    """File the synthetic SAE and one copy of its row per (layer, width) in ``cells`` (metrics
    only, no features) into the release ``name``; returns the SAE names by layer, then width."""
    from sae_core.store.releases import join_release

    names = []
    with engine.begin() as conn:
        original = conn.execute(sa.select(SaeRow.__table__).where(SaeRow.name == spec.sae_name)).mappings().one()
        join_release(conn, original["id"], name)
        for layer, width in cells:
            values = {key: value for key, value in original.items() if key not in ("id", "release_id")}
            values.update(
                name=f"{spec.sae_name}-l{layer}-w{width}",
                layer=layer,
                d_sae=width,
                metrics={  # the report card's held-out column is what the pages headline
                    **original["metrics"],
                    "held_out": {**original["metrics"]["held_out"], "explained_variance": 0.5 + layer / 10 + width / 1000},
                },
            )
            sae_id = conn.execute(sa.insert(SaeRow).values(**values).returning(SaeRow.id)).scalar_one()
            join_release(conn, sae_id, name)
            names.append(values["name"])
    return names
