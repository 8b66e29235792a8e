"""A store built in code with planted features whose true firing rule is known.

The corpus mixes English prose and small Python functions over a hand-made vocabulary. Every
feature's activations are computed on every context, then a miniature precompute keeps what the
real one keeps: top examples, interval samples per activation bin, and the contexts they use.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session

from sae_core.store.db import (
    ContextRow,
    ExampleRow,
    FeatureRow,
    FeatureWordRow,
    SaeRow,
    SubjectModelRow,
    VocabRow,
    create_engine_for,
    migrate,
    pack_acts,
    pack_tokens,
)

BOS = "<|bos|>"
PROSE = [
    " The",
    " city",
    " of",
    " Paris",
    " is",
    " large",
    " and",
    " old",
    ".",
    " people",
    " live",
    " there",
    " we",
    " like",
    " it",
]
NAMES = [" f", " g", " add", " run", " make"]
COMMENT = [" note", " fix", " this", " later", " slow"]
CODE = ["def", "(", "x", "):", "\n", "    ", "return", " x", " #", " +", " 1", "<b>", ",", ")"]
DOCSTRING = [' """', "Return", " the", " value", ".", '"""']
TEXTS = [BOS] + PROSE + NAMES + COMMENT + CODE + [t for t in DOCSTRING if t not in PROSE]
ID = {t: i for i, t in enumerate(TEXTS)}
SEQ = 24  # tokens per context after BOS
N_CONTEXTS = 160
TOP_K = 8  # top examples kept per feature
N_BINS = 3  # interval bins
PER_BIN = 4  # interval samples per bin

# Planted features, by index.
PARIS, AFTER_DEF, IN_COMMENT, RANDOM, BOLD, DEAD, IN_DOCSTRING, BEFORE_CLOSE = range(8)
D_SAE = 8


def _prose(rng: np.random.Generator) -> list[int]:
    words = [w for w in PROSE if w != " Paris"]
    out = [ID[w] for w in rng.choice(words, size=SEQ)]
    for pos in rng.choice(SEQ, size=rng.integers(0, 3), replace=False):
        out[pos] = ID[" Paris"]
    return out


def _code(rng: np.random.Generator) -> list[int]:
    out: list[str] = []
    while len(out) < SEQ:
        out += ["def", str(rng.choice(NAMES)), "(", "x", "):", "\n", "    "]
        if rng.random() < 0.4:
            out += DOCSTRING + ["\n", "    "]
        if rng.random() < 0.4:
            arguments = ["x", ",", " 1"] if rng.random() < 0.5 else ["x"]
            out += ["return", str(rng.choice(NAMES)), "("] + arguments + [")"]
        else:
            out += ["return", " x", " +", " 1"]
        if rng.random() < 0.6:
            out += [" #"] + list(rng.choice(COMMENT, size=rng.integers(1, 4)))
        if rng.random() < 0.2:
            out += ["<b>"]
        out += ["\n"]
    return [ID[t] for t in out[:SEQ]]


def make_corpus(seed: int = 0) -> np.ndarray:
    """(N_CONTEXTS, SEQ + 1) int token ids, BOS first; half prose, half code."""
    rng = np.random.default_rng(seed)
    rows = [_prose(rng) if i % 2 == 0 else _code(rng) for i in range(N_CONTEXTS)]
    return np.concatenate([np.full((N_CONTEXTS, 1), ID[BOS]), np.array(rows)], axis=1)


def planted_acts(tokens: np.ndarray, seed: int = 0) -> np.ndarray:
    """(D_SAE, n_contexts, seq) float32 activations of the planted features."""
    rng = np.random.default_rng(seed + 1)
    acts = np.zeros((D_SAE,) + tokens.shape, dtype=np.float32)
    strength = rng.uniform(1.0, 5.0, size=tokens.shape).astype(np.float32)
    acts[PARIS] = np.where(tokens == ID[" Paris"], strength, 0)
    after_def = np.zeros_like(tokens, dtype=bool)
    after_def[:, 1:] = tokens[:, :-1] == ID["def"]
    acts[AFTER_DEF] = np.where(after_def, strength, 0)
    acts[IN_COMMENT] = np.where(_in_comment(tokens), strength, 0)
    acts[RANDOM] = np.where(rng.random(tokens.shape) < 0.05, strength, 0)
    acts[RANDOM][:, 0] = 0
    acts[BOLD] = np.where(tokens == ID["<b>"], strength, 0)
    acts[IN_DOCSTRING] = np.where(_in_docstring(tokens), strength, 0)
    before_close = np.zeros_like(tokens, dtype=bool)
    before_close[:, :-1] = tokens[:, 1:] == ID[")"]
    acts[BEFORE_CLOSE] = np.where(before_close, strength, 0)
    return acts


def _in_comment(tokens: np.ndarray) -> np.ndarray:
    out = np.zeros(tokens.shape, dtype=bool)
    for r, row in enumerate(tokens):
        inside = False
        for c, t in enumerate(row):
            if t == ID[" #"]:
                inside = True
            elif t == ID["\n"]:
                inside = False
            out[r, c] = inside
    return out


def _in_docstring(tokens: np.ndarray) -> np.ndarray:
    """From the opening quotes to the closing ones, both included."""
    out = np.zeros(tokens.shape, dtype=bool)
    for r, row in enumerate(tokens):
        inside = False
        for c, t in enumerate(row):
            opens = t == ID[' """']
            out[r, c] = inside or opens
            inside = (inside or opens) and t != ID['"""']
    return out


class PlantedStore(NamedTuple):
    url: str
    sae_name: str
    tokens: np.ndarray  # (N_CONTEXTS, SEQ + 1)
    acts: np.ndarray  # (D_SAE, N_CONTEXTS, SEQ + 1)


def select_examples(
    m: np.ndarray,
    rng: np.random.Generator,
    *,
    top_k: int = TOP_K,
    n_bins: int = N_BINS,
    per_bin: int = PER_BIN,
) -> list[tuple[str, int, int, int]]:
    """(kind, bin, rank, context) for one feature from its per-context max ``m`` (n_contexts,):
    the top_k strongest contexts, then up to per_bin random ones from each of n_bins equal-width
    activation bins."""
    firing = np.flatnonzero(m > 0)
    top = firing[np.argsort(-m[firing], kind="stable")][:top_k]
    chosen = [("top", 0, rank, int(c)) for rank, c in enumerate(top)]
    if not firing.size:
        return chosen
    edges = np.linspace(0, m.max(), n_bins + 1)
    bins = np.clip(np.searchsorted(edges, m, side="left") - 1, 0, n_bins - 1)
    for b in range(n_bins):
        members = firing[bins[firing] == b]
        for rank, c in enumerate(rng.permutation(members)[:per_bin]):
            chosen.append(("interval", b, rank, int(c)))
    return chosen


def add_examples(
    session: Session,
    sae_id: int,
    feature_idx: int,
    acts: np.ndarray,
    rng: np.random.Generator,
    **budget: int,
) -> set[int]:
    """Write one feature's examples chosen by ``select_examples`` (``budget``: its top_k, n_bins,
    per_bin) from its activations ``acts`` (n_contexts, seq); return the context ids they use."""
    rows = []
    for kind, b, rank, c in select_examples(acts.max(axis=1), rng, **budget):
        blob, max_act, max_pos = pack_acts(acts[c])
        rows.append(
            {
                "sae_id": sae_id,
                "feature_idx": feature_idx,
                "kind": kind,
                "bin": b,
                "rank": rank,
                "context_id": c,
                "max_act": max_act,
                "max_pos": max_pos,
                "acts": blob,
            }
        )
    if rows:
        session.execute(sa.insert(ExampleRow), rows)
    return {row["context_id"] for row in rows}


def add_contexts(session: Session, sae_id: int, tokens: np.ndarray, used: set[int]) -> None:
    """Write the contexts ``used`` of ``tokens`` (n_contexts, seq), as precompute keeps only those."""
    session.add_all(
        ContextRow(sae_id=sae_id, id=c, token_ids=pack_tokens(tokens[c])) for c in sorted(used)
    )


def add_bare_sae(
    session: Session,
    name: str,
    d_sae: int,
    *,
    vocab_size: int = 1,
    bos_token_id: int | None = None,
    **sae_fields,
) -> SaeRow:
    """A subject model row and an SAE row on it, with placeholder shapes and paths: for stores whose
    tests and benchmarks need features and labels but never load the model or the SAE."""
    model = SubjectModelRow(
        name=name,
        source="code",
        architecture="llama",
        d_model=8,
        n_layers=1,
        vocab_size=vocab_size,
        bos_token_id=bos_token_id,
    )
    session.add(model)
    session.flush()
    sae = SaeRow(
        name=name,
        model_id=model.id,
        layer=0,
        hook_name="h",
        architecture="topk",
        d_in=8,
        d_sae=d_sae,
        path="p",
        **sae_fields,
    )
    session.add(sae)
    session.flush()
    return sae


def write_planted_store(url: str, *, sae_name: str = "tiny-sae", seed: int = 0) -> PlantedStore:
    tokens = make_corpus(seed)
    acts = planted_acts(tokens, seed)
    engine = create_engine_for(url)
    migrate(engine)
    rng = np.random.default_rng(seed + 2)
    with Session(engine) as session:
        model = SubjectModelRow(
            name=f"planted-{sae_name}",
            source="code",
            architecture="llama",
            d_model=8,
            n_layers=2,
            vocab_size=len(TEXTS),
            bos_token_id=ID[BOS],
        )
        session.add(model)
        session.flush()
        session.add_all(
            VocabRow(model_id=model.id, token_id=i, text=t) for i, t in enumerate(TEXTS)
        )
        sae = SaeRow(
            name=sae_name,
            model_id=model.id,
            layer=1,
            hook_name="blocks.1.hook_resid_post",
            architecture="topk",
            d_in=8,
            d_sae=D_SAE,
            k=2,
            path="planted",
            status="complete",
            n_tokens=int(tokens.size - len(tokens)),
            precompute_cfg={"feature_words_size": 32},
        )
        session.add(sae)
        session.flush()
        used: set[int] = set()
        for f in range(D_SAE):
            a = acts[f]
            fired = a[a > 0]
            session.add(
                FeatureRow(
                    sae_id=sae.id,
                    idx=f,
                    count=int(fired.size),
                    density=fired.size / sae.n_tokens,
                    max_act=float(fired.max(initial=0)),
                    mean_act=float(fired.mean()) if fired.size else 0.0,
                    logit_top=[[ID[" city"], 0.5], [ID[" of"], 0.3]],
                )
            )
            used |= add_examples(session, sae.id, f, a, rng)
        add_contexts(session, sae.id, tokens, used)
        add_feature_words(session, sae.id, tokens, acts)
        session.commit()
    engine.dispose()
    return PlantedStore(url, sae_name, tokens, acts)


def add_feature_words(
    session: Session, sae_id: int, tokens: np.ndarray, acts: np.ndarray, per_feature: int = 32
) -> None:
    """Write the words precompute keeps: for each feature, the ``per_feature`` tokens of
    ``tokens`` (n_contexts, seq) it fires on most often (``acts``: (features, n_contexts, seq)),
    with how often, and how often each occurs."""
    rows = []
    for f in range(acts.shape[0]):
        fired, counts = np.unique(tokens[acts[f] > 0], return_counts=True)
        if not len(fired):
            continue
        ranked = np.argsort(-counts, kind="stable")[:per_feature]
        rows.append(
            FeatureWordRow(
                sae_id=sae_id,
                feature_idx=f,
                token_ids=pack_tokens(fired[ranked]),
                counts=pack_tokens(counts[ranked]),
                occurrences=pack_tokens([(tokens == token).sum() for token in fired[ranked]]),
            )
        )
    session.add_all(rows)
