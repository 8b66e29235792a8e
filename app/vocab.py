"""The subject model's vocabulary, read from the store once per engine and kept in memory.

Every page renders token text (examples, logit effects) and token search looks texts up, so a
query per request would dominate; the vocabulary never changes once precompute wrote it.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sae_core.inputs.token_bytes import joined_texts
from sae_core.store.db import VocabRow


@dataclass(frozen=True)
class Vocabulary:
    texts: dict[int, str]  # token id -> display text
    # display text -> token ids (several ids may decode alike); tuples, which the cycle collector
    # stops tracking, so a 49k vocabulary adds nothing to the pauses of its full passes
    ids_by_text: dict[str, tuple[int, ...]]
    raw: dict[int, bytes] = field(default_factory=dict)  # bytes of tokens that are part of a character

    @classmethod
    def from_texts(cls, texts: dict[int, str], raw: dict[int, bytes] | None = None) -> Vocabulary:
        ids_by_text: dict[str, list[int]] = {}
        for token_id, text in texts.items():
            ids_by_text.setdefault(text, []).append(token_id)
        frozen = {text: tuple(ids) for text, ids in ids_by_text.items()}
        return cls(texts=texts, ids_by_text=frozen, raw=raw or {})

    def text(self, token_id: int) -> str:
        return self.texts.get(token_id, f"<{token_id}>")

    def texts_of(self, token_ids: list[int]) -> list[str]:
        """Each token's share of the run's text (``joined_texts``: a character split across
        tokens is whole on its first token); pages render thousands of tokens, so the common
        run, with no split character, costs no call per token."""
        if self.raw and any(map(self.raw.__contains__, token_ids)):
            return joined_texts(
                [self.raw.get(t) or self.text(t).encode("utf-8") for t in token_ids]
            )
        try:
            return list(map(self.texts.__getitem__, token_ids))
        except KeyError:  # an id outside the stored vocabulary: rare, so the slow path is fine
            return [self.text(t) for t in token_ids]

    def find(self, token: str) -> list[int]:
        """Ids of ``token`` as written and of its variants with and without one leading space
        (BPE vocabularies spell a word inside a sentence with its space: " Paris")."""
        word = token.strip()
        variants = dict.fromkeys([token, word, " " + word])
        return sorted({i for v in variants if v for i in self.ids_by_text.get(v, ())})


_cache: weakref.WeakKeyDictionary[Engine, dict[int, Vocabulary]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def get_vocabulary(session: Session, model_id: int) -> Vocabulary:
    engine = session.get_bind()
    with _lock:
        cached = _cache.get(engine, {}).get(model_id)
    if cached is not None:
        return cached
    rows = session.execute(
        sa.select(VocabRow.token_id, VocabRow.text, VocabRow.raw).where(
            VocabRow.model_id == model_id
        )
    ).all()
    vocabulary = Vocabulary.from_texts(
        {token_id: text for token_id, text, _ in rows},
        {token_id: raw for token_id, _, raw in rows if raw is not None},
    )
    if vocabulary.texts:  # an empty vocabulary may still be being written: read it again next time
        with _lock:
            _cache.setdefault(engine, {})[model_id] = vocabulary
    return vocabulary
