"""Labels for every alive feature, made from the store alone, each scored on held-out tokens.

``label_sae`` runs three passes, each resumable (work is committed in chunks, and a feature that
already has a label of that source is skipped unless ``force``):
1. automatic: the rule that best predicts where the feature fires on its training evidence
   (``induction``, a chunk of features at once), with the words it fires on elsewhere in the
   corpus that the rule does not explain (``corpus_words``), scored on held-out evidence
   (``evidence``, ``scoring``);
   when that rule is weak the label adds the tokens the feature promotes (its logit effects);
2. explainer (optional, ``sae_core.labels.explainer``): an LLM's explanation with its rule, scored the same way;
3. embeddings (when the ``embed`` extra is installed): vectors for semantic search.

Every label goes into the ``labels`` history; ``features.label*`` holds the current one: the latest
human label if any, else the machine label with the best held-out F1.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from sae_core.labels import embeddings
from sae_core.labels.corpus_words import corpus_firings, corpus_terms, with_corpus_words
from sae_core.labels.evidence import (
    ContextLibrary,
    FeatureEvidence,
    HeldOut,
    Vocab,
    gather_evidence,
    load_examples,
)
from sae_core.labels.explainer import (
    ExplainerConfig,
    detection_score,
    explain,
    render_example,
)
from sae_core.labels.history import (
    AUTO_SOURCE,
    LabelError,
    get_sae,
    replaces_current,
    rule_json,
)
from sae_core.labels.induction import compile_search, fit_rules
from sae_core.labels.rules import LabelRule, token_list
from sae_core.labels.scoring import LabelScore, score_rule
from sae_core.store.db import FeatureRow, LabelRow, SaeRow, create_engine_for, utcnow

METHOD = "rules-v6"  # recorded with every automatic label; bump when the algorithm changes
FEATURES_PER_CHUNK = 256  # features labelled per transaction: an interruption loses at most these
EXPLAINED_PER_CHUNK = 8  # explainer answers are slow; commit them often
WEAK_RULE = (
    0.3  # below this search objective the rule explains little: the label adds logit effects
)
DENSE_DENSITY = 0.1  # a feature firing on more tokens than this is dense (as the SAE page counts)
EXPLAINER_EXAMPLES = (
    12  # examples shown to an explainer: enough variety, short enough for small models
)
PROMOTED = 10  # top logit effects tried as "before" keys: what the feature predicts comes next


@dataclass(frozen=True)
class LabelOptions:
    seed: int = 0  # picks the held-out negatives; fixed so scores are reproducible
    force: bool = False  # relabel features that already have a label of the same source
    explainer: ExplainerConfig | None = None  # None: no LLM explanations
    embed: bool | None = None  # None: embed when the embedding model is installed
    progress: bool = True
    workers: int | None = None  # processes fitting rules; None: one per CPU core this may use


class LabelSummary(NamedTuple):
    n_labelled: int  # automatic labels written in this run
    n_unscorable: int  # alive features without enough examples to hold some out
    mean_f1: float | None  # mean held-out F1 of this run's automatic labels
    n_explained: int
    n_embedded: int


class _MachineLabel(NamedTuple):
    text: str
    source: str  # auto | llm:<model>
    author: str  # the program, or the explainer's URL
    rule: LabelRule


# ---------------------------------------------------------------------------------------------
# The passes


class _Current(NamedTuple):
    """What the auto pass needs of a feature row."""

    idx: int
    label: str | None
    label_source: str | None
    label_f1: float | None
    density: float
    logit_top: list


class _Labeller(NamedTuple):
    session: Session
    sae: SaeRow
    vocab: Vocab
    library: ContextLibrary
    options: LabelOptions

    def evidence_by_feature(self, chunk: list[int]) -> Iterator[tuple[int, FeatureEvidence | None]]:
        examples = load_examples(self.session, self.sae.id, chunk[0], chunk[-1] + 1)
        yield from zip(
            chunk,
            gather_evidence(self.library, examples, chunk, seed=self.options.seed),
            strict=True,
        )

    def labelled(self, source: str) -> set[int]:
        if self.options.force:
            return set()
        return set(
            self.session.scalars(
                sa.select(LabelRow.feature_idx)
                .where(LabelRow.sae_id == self.sae.id, LabelRow.source == source)
                .distinct()
            )
        )

    def token_text(self, token_id: int) -> str:
        return self.vocab.texts[self.vocab.text_id[token_id]]

    def current(self, chunk: list[int]) -> dict[int, _Current]:
        rows = self.session.execute(
            sa.select(
                FeatureRow.idx,
                FeatureRow.label,
                FeatureRow.label_source,
                FeatureRow.label_f1,
                FeatureRow.density,
                FeatureRow.logit_top,
            ).where(FeatureRow.sae_id == self.sae.id, FeatureRow.idx.in_(chunk))
        )
        return {row.idx: _Current(*row) for row in rows}

    def current_labels(
        self, chunk: list[int]
    ) -> dict[int, tuple[str | None, str | None, float | None]]:
        """The (label, source, F1) each feature of ``chunk`` has now, as a write ranks against
        (read when writing, without ``current``'s logit effects)."""
        rows = self.session.execute(
            sa.select(
                FeatureRow.idx, FeatureRow.label, FeatureRow.label_source, FeatureRow.label_f1
            ).where(FeatureRow.sae_id == self.sae.id, FeatureRow.idx.in_(chunk))
        )
        return {idx: (label, source, f1) for idx, label, source, f1 in rows}


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def auto_label_text(rule: LabelRule, strength: float, density: float, promoted: list[str]) -> str:
    """The label of a fitted rule: its phrase. A dense feature says so first, and so does one whose
    best rule is weak (``strength``, the search's objective, below ``WEAK_RULE``), which then
    also names the tokens it promotes (its top logit effects) instead of passing the rule off
    as an explanation."""
    text = rule.describe()
    share = f"{100 * density:.2g}%"  # two significant digits: a sparse feature is not "0.0%"
    if density >= DENSE_DENSITY:
        return f"dense: fires on {share} of tokens; {text}"
    if strength < WEAK_RULE:
        text = f"unclear: fires on {share} of tokens; {text}"
        if promoted:
            text += f"; promotes {token_list(tuple(promoted[:3]))}"
    return text


def _alive_features(session: Session, sae: SaeRow) -> list[int]:
    return list(
        session.scalars(
            sa.select(FeatureRow.idx)
            .where(FeatureRow.sae_id == sae.id, FeatureRow.count > 0)
            .order_by(FeatureRow.idx)
        )
    )


class _AutoPass(NamedTuple):
    f1s: list[float]  # held-out F1 of each label written
    n_unscorable: int


def _label_row(
    sae: SaeRow, idx: int, made: _MachineLabel, score: LabelScore, held: HeldOut, **extra
) -> dict:
    return {
        "sae_id": sae.id,
        "feature_idx": idx,
        "label": made.text,
        "source": made.source,
        "author": made.author,
        "created_at": utcnow(),
        "precision": score.precision,
        "recall": score.recall,
        "f1": score.f1,
        "rule": rule_json(made.rule, held, score, method=METHOD) | extra,
    }


def _write_labels(
    session: Session,
    current: dict[int, tuple[str | None, str | None, float | None]],
    rows: list[dict],
) -> None:
    """Insert label rows in one statement and make each current where it ranks first over the
    feature's ``current`` (label, source, F1)."""
    if not rows:
        return
    session.execute(sa.insert(LabelRow), rows)
    updates = [
        {
            "sae_id": row["sae_id"],
            "idx": row["feature_idx"],
            "label": row["label"],
            "label_source": row["source"],
            "label_precision": row["precision"],
            "label_recall": row["recall"],
            "label_f1": row["f1"],
        }
        for row in rows
        if replaces_current(current[row["feature_idx"]], row["source"], row["f1"])
    ]
    if updates:
        session.execute(sa.update(FeatureRow), updates)


class _ChunkLabels(NamedTuple):
    rows: list[dict]  # label rows, ready to insert
    n_unscorable: int


def _label_chunk(labeller: _Labeller, chunk: list[int]) -> _ChunkLabels:
    """Fit (all at once), score and word the automatic labels of a chunk of features (reads,
    never writes)."""
    current = labeller.current(chunk)
    scorable = [(i, e) for i, e in labeller.evidence_by_feature(chunk) if e is not None]
    promoted = {
        idx: [labeller.token_text(int(t)) for t, _ in (current[idx].logit_top or [])[:PROMOTED]]
        for idx, _ in scorable
    }
    fitted = fit_rules(
        [evidence.train for _, evidence in scorable],
        labeller.vocab,
        [tuple(promoted[idx]) for idx, _ in scorable],
    )
    firings = corpus_firings(
        labeller.session, labeller.sae, labeller.vocab, [idx for idx, _ in scorable]
    )
    words = corpus_terms(
        [firings.get(idx) for idx, _ in scorable],
        [evidence.heldout for _, evidence in scorable],
        labeller.vocab,
    )
    rows = []
    for (idx, evidence), fit, term in zip(scorable, fitted, words, strict=True):
        rule = with_corpus_words(fit.rule, term, evidence.train, labeller.vocab)
        score = score_rule(rule, evidence.heldout, labeller.vocab)
        density = current[idx].density or 0.0
        text = auto_label_text(rule, fit.objective, density, promoted[idx])
        made = _MachineLabel(text, AUTO_SOURCE, f"saescope {METHOD}", rule)
        rows.append(_label_row(labeller.sae, idx, made, score, evidence.heldout_contexts))
    return _ChunkLabels(rows, len(chunk) - len(scorable))


# A forked worker's labeller: set in the parent just before the pool forks, then given its own
# database connection in each worker (connections must not cross a fork).
_FORKED: tuple[_Labeller, str] | None = None


def _start_worker() -> None:
    global _FORKED
    labeller, url = _FORKED
    _FORKED = (labeller._replace(session=Session(create_engine_for(url))), url)


def _worker_chunk(chunk: list[int]) -> _ChunkLabels:
    return _label_chunk(_FORKED[0], chunk)


def _n_workers(options: LabelOptions, n_chunks: int | None = None) -> int:
    """Processes to fork for ``n_chunks`` tasks (None: as many as there are cores); 1 where
    ``fork`` is unavailable."""
    if options.workers is not None:
        wanted = options.workers
    else:
        wanted = (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count() or 1
        )
    forkable = "fork" in multiprocessing.get_all_start_methods()
    if n_chunks is not None:
        wanted = min(wanted, n_chunks)
    return max(1, wanted) if forkable else 1


@contextmanager
def _chunk_results(
    labeller: _Labeller, chunks: list[list[int]]
) -> Iterator[Iterator[_ChunkLabels]]:
    """Each chunk's labels in order: computed here, or by forked workers that share the decoded
    contexts copy-on-write."""
    global _FORKED
    n_workers = _n_workers(labeller.options, len(chunks))
    if n_workers == 1:
        yield (_label_chunk(labeller, chunk) for chunk in chunks)
        return
    _FORKED = (labeller, labeller.session.get_bind().url.render_as_string(hide_password=False))
    compile_search()  # before the fork (label_sae has, while the windows were lexed): else each worker loads it
    try:
        with multiprocessing.get_context("fork").Pool(n_workers, initializer=_start_worker) as pool:
            yield pool.imap(_worker_chunk, chunks)
    finally:
        _FORKED = None


def _auto_pass(labeller: _Labeller, todo: list[int]) -> _AutoPass:
    n_unscorable, f1s = 0, []
    bar = tqdm(
        total=len(todo),
        desc="labelling features",
        unit="feature",
        disable=not labeller.options.progress,
    )
    chunks = list(_chunks(todo, FEATURES_PER_CHUNK))
    with _chunk_results(labeller, chunks) as results:
        for chunk, result in zip(chunks, results, strict=True):
            _write_labels(labeller.session, labeller.current_labels(chunk), result.rows)
            labeller.session.commit()
            f1s += [row["f1"] for row in result.rows]
            n_unscorable += result.n_unscorable
            bar.update(len(chunk))
    bar.close()
    return _AutoPass(f1s, n_unscorable)


def _explain_pass(labeller: _Labeller, todo: list[int], config: ExplainerConfig) -> int:
    n_explained = 0
    bar = tqdm(
        total=len(todo),
        desc=f"explaining with {config.model}",
        unit="feature",
        disable=not labeller.options.progress,
    )
    for chunk in _chunks(todo, EXPLAINED_PER_CHUNK):
        rows = []
        for idx, evidence in labeller.evidence_by_feature(chunk):
            if evidence is None:
                continue
            library = labeller.library
            windows = [
                (library.texts(e.context_id), e)
                for e in evidence.train_examples[:EXPLAINER_EXAMPLES]
            ]
            examples = [render_example(texts, e.acts(len(texts)).tolist()) for texts, e in windows]
            explanation = explain(config, examples)
            if explanation is None:
                continue
            rule = explanation.rule(labeller.vocab)
            score = score_rule(rule, evidence.heldout, labeller.vocab)
            held = evidence.heldout_contexts
            detection = detection_score(
                config,
                explanation.text,
                [library.texts(c) for c in held.positives + held.negatives],
                [True] * len(held.positives) + [False] * len(held.negatives),
            )
            made = _MachineLabel(explanation.text, config.source, config.url, rule)
            rows.append(_label_row(labeller.sae, idx, made, score, held, detection=detection))
            n_explained += 1
        _write_labels(labeller.session, labeller.current_labels(chunk), rows)
        labeller.session.commit()
        bar.update(len(chunk))
    bar.close()
    return n_explained


def _embed_pass(session: Session, sae: SaeRow, embed: bool | None, progress: bool) -> int:
    if embed is False or (embed is None and not embeddings.embedder_available()):
        return 0
    return embeddings.sync_embeddings(
        session, sae.id, embeddings.load_embedder(), progress=progress
    )


def embed_labels(engine: Engine, sae_name: str, *, progress: bool = True) -> int:
    """Write the semantic-search vectors an SAE's current labels lack (labelling nothing); how
    many were written. What ``saescope serve`` runs in the background after a precompute."""
    with Session(engine) as session:
        sae = get_sae(session, sae_name)
        return embeddings.sync_embeddings(session, sae.id, embeddings.load_embedder(), progress=progress)


def label_sae(engine: Engine, sae_name: str, options: LabelOptions | None = None) -> LabelSummary:
    """Label every alive feature of an SAE in the store (see the module docstring)."""
    options = options or LabelOptions()
    # The search's matrix products are small ((32, ~1,300) by (~1,300, 35)): OpenBLAS's second
    # thread only spins waiting for a core. On the demo 4k SAE with a busy machine, a chunk's
    # context counts took 13.7 CPU-ms with two threads, 0.33 with one; forked workers inherit it.
    with threadpool_limits(limits=1, user_api="blas"), Session(engine) as session:
        sae = get_sae(session, sae_name)
        if sae.status != "complete":
            raise LabelError(
                f"precompute of {sae_name!r} has not finished; run `saescope precompute` to the end first"
            )
        vocab = Vocab.load(session, sae)
        # numba's start (~0.5 s) while forked workers lex the windows
        library = ContextLibrary.load(
            session, sae, vocab, workers=_n_workers(options), meanwhile=compile_search
        )
        labeller = _Labeller(session, sae, vocab, library, options)
        alive = _alive_features(session, sae)
        done = labeller.labelled(AUTO_SOURCE)
        auto = _auto_pass(labeller, [i for i in alive if i not in done])
        n_explained = 0
        if options.explainer is not None:
            explained = labeller.labelled(options.explainer.source)
            n_explained = _explain_pass(
                labeller, [i for i in alive if i not in explained], options.explainer
            )
        n_embedded = _embed_pass(session, sae, options.embed, options.progress)
        mean_f1 = float(np.mean(auto.f1s)) if auto.f1s else None
        return LabelSummary(len(auto.f1s), auto.n_unscorable, mean_f1, n_explained, n_embedded)
