"""An SAE's report card: its metrics on the held-out contexts of its training corpus and on a
second, different corpus, side by side, so that out-of-distribution loss is visible.

Training records its split in cfg.json (``saescope.held_out``): the corpus it cut (spec, seed,
window length, fingerprint) and the first held-out row. ``held_out_contexts`` rebuilds exactly
those rows, and refuses when the corpus has changed since, so a context that training read is
never evaluated (older saescope SAEs record the settings the split follows from). An SAE
without either (SAELens, sparsify, Gemma Scope) is evaluated on the last contexts of the corpus
given, and the card says that its training data is unknown.
"""

from __future__ import annotations

from typing import NamedTuple

from sae_core.inputs.corpus import (
    DEFAULT_CORPUS,
    DOCS_CORPUS,
    Contexts,
    build_contexts,
    context_rows,
    held_out_split,
)
from sae_core.saes.metrics import HELD_OUT, OTHER, Metrics, evaluate_many
from sae_core.saes.sae import SAE, SAEError


class TokenSet(NamedTuple):
    """One column of the report card: contexts, and what they are to the SAE."""

    contexts: Contexts
    role: str  # "held out", "last contexts" or "other corpus"
    note: str  # what a reader must know about them

    def corpus(self) -> dict:
        return {**self.contexts.describe(), "role": self.role, "note": self.note}


def ctx_len(contexts: Contexts) -> int:
    """Window length without the BOS that ``build_contexts`` puts first when the tokenizer has one."""
    return int(contexts.tokens.shape[1]) - int(bool(contexts.special_mask[:, 0].all()))


def other_corpus_for(training_spec: str) -> str:
    """The default second corpus: the stdlib's documentation prose, or its code for an SAE
    trained on that prose."""
    return DEFAULT_CORPUS if training_spec == DOCS_CORPUS else DOCS_CORPUS


def split_record(contexts: Contexts, first_held_out: int) -> dict:
    """What cfg.json records of the training split: rows ``first_held_out:`` were never read."""
    return {**contexts.describe(), "ctx_len": ctx_len(contexts), "first_held_out": first_held_out}


def held_out_contexts(sae: SAE, tokenizer, *, max_contexts: int, fallback: dict | None = None) -> TokenSet:
    """The held-out contexts training recorded (the first ``max_contexts`` of them); for an SAE
    without a record, the last ``max_contexts`` contexts (at most 20%) of the ``fallback`` corpus
    (``spec``, ``text_field``, ``ctx_len``, ``seed``)."""

    recorded = sae.cfg.saescope.get("held_out")
    training = sae.cfg.saescope.get("training")
    if not recorded and training:  # saescope format 1: the split follows from the recorded settings
        contexts = build_contexts(training["corpus"], tokenizer, text_field=training["text_field"],
                                  ctx_len=training["ctx_len"], seed=training["seed"])  # fmt: skip
        held_out = held_out_split(contexts, training["eval_contexts"]).held_out
        return TokenSet(context_rows(held_out, 0, min(len(held_out), max_contexts), "first"), "held out",
                        "the split training made, from the settings it recorded")  # fmt: skip
    if not recorded and fallback:
        contexts = build_contexts(fallback["spec"], tokenizer, text_field=fallback["text_field"],
                                  ctx_len=fallback["ctx_len"], seed=fallback["seed"])  # fmt: skip
        return TokenSet(held_out_split(contexts, max_contexts).held_out, "last contexts",
                        "no training split recorded: what the SAE was trained on is unknown")  # fmt: skip
    if not recorded:
        raise SAEError("the SAE records no training split and no corpus was given")
    contexts = build_contexts(recorded["spec"], tokenizer, text_field=recorded["text_field"],
                              ctx_len=recorded["ctx_len"], seed=recorded["seed"])  # fmt: skip
    if contexts.fingerprint != recorded["fingerprint"] or len(contexts) != recorded["n_contexts"]:
        raise SAEError(
            f"the training corpus {recorded['spec']!r} has changed since the SAE was trained "
            "(its fingerprint differs), so its held-out contexts cannot be found again"
        )
    first = recorded["first_held_out"]
    return TokenSet(context_rows(contexts, first, min(len(contexts), first + max_contexts), "heldout"), "held out",
                    f"contexts {first}+ of the training corpus's {len(contexts)}, which training never read")  # fmt: skip


def other_contexts(spec: str, tokenizer, *, like: Contexts, text_field: str, training_spec: str) -> TokenSet:
    """As many contexts of corpus ``spec`` as ``like`` holds, windows of the same length."""
    if spec == training_spec:
        raise SAEError(f"the second corpus {spec!r} is the one the held-out column reads; name a different one with --eval-corpus")
    contexts = build_contexts(spec, tokenizer, text_field=text_field, ctx_len=ctx_len(like), seed=like.seed,
                              max_contexts=len(like))  # fmt: skip
    overlap = {spec, training_spec} == {DEFAULT_CORPUS, DOCS_CORPUS}  # the default corpus ends with the docs
    note = f"{DEFAULT_CORPUS!r} contains the {DOCS_CORPUS!r} text too" if overlap else ""
    return TokenSet(contexts, "other corpus", note)


def report_card(subject, sae: SAE, layer: int, held_out: TokenSet, other: TokenSet, **kwargs) -> dict[str, Metrics]:
    """Every metric on both token sets: {"held_out": Metrics, "other_corpus": Metrics}."""
    [card] = report_cards(subject, [sae], [layer], held_out, other, **kwargs)
    return card


def report_cards(
    subject, saes: list[SAE], layers: list[int], held_out: TokenSet, other: TokenSet, **kwargs
) -> list[dict[str, Metrics]]:
    """``report_card`` for several SAEs, ``saes[i]`` on block ``layers[i]``, sharing the runs that
    do not depend on the SAE (``evaluate_many``)."""
    columns = {
        name: evaluate_many(subject, saes, layers, part.contexts.tokens, part.contexts.special_mask, corpus=part.corpus(), **kwargs)
        for name, part in ((HELD_OUT, held_out), (OTHER, other))
    }
    return [{name: measured[i] for name, measured in columns.items()} for i in range(len(saes))]
