"""Labels for every alive feature, made from the store alone, each scored on held-out tokens.

``label_sae`` runs three passes, each resumable (work is committed in chunks, and a feature that
already has a label of that source is skipped unless ``force``):
1. automatic: the rule that best predicts where the feature fires on its training evidence
   (``label_induction``), scored on held-out evidence (``label_evidence``, ``label_scoring``);
   when that rule is weak the label adds the tokens the feature promotes (its logit effects);
2. explainer (optional, ``sae_core.labels.explainer``): an LLM's explanation with its rule, scored the same way;
3. embeddings (when the ``embed`` extra is installed): vectors for semantic search.

Every label goes into the ``labels`` history; ``features.label*`` holds the current one: the latest
human label if any, else the machine label with the best held-out F1.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from tqdm.auto import tqdm

from sae_core.errors import SaescopeError
from sae_core.labels import embeddings
from sae_core.labels.evidence import (
    ContextLibrary,
    FeatureEvidence,
    HeldOut,
    Vocab,
    build_evidence,
    heldout_tokens,
    load_examples,
)
from sae_core.labels.explainer import ExplainerConfig, explain, render_example
from sae_core.labels.induction import fit_rule
from sae_core.labels.rules import LabelRule, parse_label
from sae_core.labels.scoring import LabelScore, score_rule
from sae_core.store.db import FeatureRow, LabelRow, SaeRow, utcnow
from sae_core.store.lookup import find_feature

AUTO_SOURCE = "auto"
METHOD = "rules-v1"  # recorded with every automatic label; bump when the algorithm changes
FEATURES_PER_CHUNK = 256  # features labelled per transaction: an interruption loses at most these
EXPLAINED_PER_CHUNK = 8  # explainer answers are slow; commit them often
WEAK_RULE_F1 = (
    0.3  # below this training F1 the rule explains little, so the label adds logit effects
)
EXPLAINER_EXAMPLES = (
    12  # examples shown to an explainer: enough variety, short enough for small models
)
MAX_LABEL_CHARS = 500  # a human label longer than a paragraph is a note, not a label
# A human label's source is "human:<author>", in the store's 64-character source column.
MAX_AUTHOR_CHARS = 64 - len("human:")


class LabelError(SaescopeError):
    """A labelling request that cannot be carried out."""


@dataclass(frozen=True)
class LabelOptions:
    seed: int = 0  # picks the held-out negatives; fixed so scores are reproducible
    force: bool = False  # relabel features that already have a label of the same source
    explainer: ExplainerConfig | None = None  # None: no LLM explanations
    embed: bool | None = None  # None: embed when the embedding model is installed
    progress: bool = True


class LabelSummary(NamedTuple):
    n_labelled: int  # automatic labels written in this run
    n_unscorable: int  # alive features without enough examples to hold some out
    mean_f1: float | None  # mean held-out F1 of this run's automatic labels
    n_explained: int
    n_embedded: int


def get_sae(session: Session, name: str) -> SaeRow:
    sae = session.scalar(sa.select(SaeRow).where(SaeRow.name == name))
    if sae is None:
        known = ", ".join(session.scalars(sa.select(SaeRow.name).order_by(SaeRow.name))) or "none"
        raise LabelError(
            f"no SAE named {name!r} in the store (known: {known}); run `saescope precompute` first"
        )
    return sae


# ---------------------------------------------------------------------------------------------
# Recording labels


def _is_human(source: str | None) -> bool:
    return bool(source) and source.startswith("human:")


def _should_replace(feature: FeatureRow, label: LabelRow) -> bool:
    if _is_human(label.source):
        return True
    if _is_human(feature.label_source):
        return False
    return (
        feature.label is None
        or feature.label_source == label.source
        or (label.f1 or 0.0) >= (feature.label_f1 or 0.0)
    )


def record_label(session: Session, feature: FeatureRow, label: LabelRow) -> None:
    """Add ``label`` to the history and make it the feature's current label if it ranks first."""
    session.add(label)
    if _should_replace(feature, label):
        feature.label, feature.label_source = label.label, label.source
        feature.label_precision, feature.label_recall, feature.label_f1 = (
            label.precision,
            label.recall,
            label.f1,
        )


def set_human_label(
    session: Session, *, sae: SaeRow, idx: int, label: str, author: str
) -> LabelRow:
    """A researcher's label: current from now on, kept in the history with who and when. A label
    written in the rule language (e.g. ``" Paris" / " Lyon"``) is scored on the held-out contexts
    of the feature's automatic label; free text is not scored."""
    label, author = label.strip(), author.strip()
    if not label or len(label) > MAX_LABEL_CHARS:
        raise LabelError(f"a label must have 1 to {MAX_LABEL_CHARS} characters")
    if not author or len(author) > MAX_AUTHOR_CHARS:
        raise LabelError(f"say who is editing: an author of 1 to {MAX_AUTHOR_CHARS} characters")
    feature = find_feature(session, sae, idx)
    row = LabelRow(
        sae_id=sae.id,
        feature_idx=idx,
        label=label,
        source=f"human:{author}",
        author=author,
        created_at=utcnow(),
    )
    rule, auto = parse_label(label), _latest_auto_label(session, sae, idx)
    if rule is not None and auto is not None:
        held = HeldOut.from_json(auto.rule["heldout"])
        score = score_on_heldout(session, sae, idx, rule, held)
        row.precision, row.recall, row.f1 = score.precision, score.recall, score.f1
        row.rule = _rule_json(rule, held, score, method="human")
    record_label(session, feature, row)
    return row


def _latest_auto_label(session: Session, sae: SaeRow, idx: int) -> LabelRow | None:
    return session.scalar(
        sa.select(LabelRow)
        .where(
            LabelRow.sae_id == sae.id, LabelRow.feature_idx == idx, LabelRow.source == AUTO_SOURCE
        )
        .order_by(LabelRow.id.desc())
        .limit(1)
    )


def label_history(session: Session, *, sae: SaeRow, idx: int) -> list[LabelRow]:
    """Every label the feature was given, newest first."""
    find_feature(session, sae, idx)
    return list(
        session.scalars(
            sa.select(LabelRow)
            .where(LabelRow.sae_id == sae.id, LabelRow.feature_idx == idx)
            .order_by(LabelRow.id.desc())
        )
    )


def _rule_json(rule: LabelRule, held: HeldOut, score: LabelScore, *, method: str = METHOD) -> dict:
    return {
        "method": method,
        "rule": rule.to_json(),
        "heldout": held.to_json(),
        "n_firing": score.n_firing,
        "n_predicted": score.n_predicted,
    }


class _MachineLabel(NamedTuple):
    text: str
    source: str  # auto | llm:<model>
    author: str  # the program, or the explainer's URL
    rule: LabelRule


def _machine_label(
    sae: SaeRow, idx: int, made: _MachineLabel, score: LabelScore, evidence: FeatureEvidence
) -> LabelRow:
    return LabelRow(
        sae_id=sae.id,
        feature_idx=idx,
        label=made.text,
        source=made.source,
        author=made.author,
        created_at=utcnow(),
        precision=score.precision,
        recall=score.recall,
        f1=score.f1,
        rule=_rule_json(made.rule, evidence.heldout_contexts, score),
    )


def score_on_heldout(
    session: Session, sae: SaeRow, idx: int, rule: LabelRule, held: HeldOut
) -> LabelScore:
    """Score ``rule`` for feature ``idx`` on the given held-out contexts (read from the store)."""
    vocab = Vocab.load(session, sae)
    library = ContextLibrary.load(session, sae, vocab, held.positives + held.negatives)
    seq_len = {cid: len(tokens) for cid, tokens in library.token_ids.items()}
    positives = load_examples(session, sae.id, idx, idx + 1, seq_len, contexts=held.positives).get(
        idx, []
    )
    return score_rule(rule, heldout_tokens(library, positives, held), vocab)


def score_stored_label(session: Session, sae: SaeRow, label: LabelRow) -> LabelScore:
    """Recompute a scored label's score from its stored rule and held-out contexts."""
    if not label.rule:
        raise LabelError(
            f"label {label.id} has no rule to score (free-text human labels are not scored)"
        )
    rule, held = LabelRule.from_json(label.rule["rule"]), HeldOut.from_json(label.rule["heldout"])
    return score_on_heldout(session, sae, label.feature_idx, rule, held)


# ---------------------------------------------------------------------------------------------
# The passes


class _Labeller(NamedTuple):
    session: Session
    sae: SaeRow
    vocab: Vocab
    library: ContextLibrary
    seq_len: dict[int, int]  # context id -> stored length
    options: LabelOptions

    def evidence_by_feature(
        self, chunk: list[int]
    ) -> Iterator[tuple[FeatureRow, FeatureEvidence | None]]:
        examples = load_examples(self.session, self.sae.id, chunk[0], chunk[-1] + 1, self.seq_len)
        rows = self.session.scalars(
            sa.select(FeatureRow).where(FeatureRow.sae_id == self.sae.id, FeatureRow.idx.in_(chunk))
        )
        features = {f.idx: f for f in rows}
        for idx in chunk:
            evidence = build_evidence(
                self.library, idx, examples.get(idx, []), seed=self.options.seed
            )
            yield features[idx], evidence

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


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _auto_label_text(
    labeller: _Labeller, rule: LabelRule, train_f1: float, feature: FeatureRow
) -> str:
    text = rule.describe()
    if train_f1 < WEAK_RULE_F1 and feature.logit_top:
        promoted = LabelRule(tuple(labeller.token_text(int(t)) for t, _ in feature.logit_top[:3]))
        text += f"; promotes {promoted.describe()}"
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


def _auto_pass(labeller: _Labeller, todo: list[int]) -> _AutoPass:
    n_unscorable, f1s = 0, []
    bar = tqdm(
        total=len(todo),
        desc="labelling features",
        unit="feature",
        disable=not labeller.options.progress,
    )
    for chunk in _chunks(todo, FEATURES_PER_CHUNK):
        for feature, evidence in labeller.evidence_by_feature(chunk):
            if evidence is None:
                n_unscorable += 1
                continue
            fitted = fit_rule(evidence.train, labeller.vocab)
            score = score_rule(fitted.rule, evidence.heldout, labeller.vocab)
            text = _auto_label_text(labeller, fitted.rule, fitted.train_f1, feature)
            made = _MachineLabel(text, AUTO_SOURCE, f"saescope {METHOD}", fitted.rule)
            record_label(
                labeller.session,
                feature,
                _machine_label(labeller.sae, feature.idx, made, score, evidence),
            )
            f1s.append(score.f1)
        labeller.session.commit()
        bar.update(len(chunk))
    bar.close()
    return _AutoPass(f1s, n_unscorable)


def explainer_rule(vocab: Vocab, tokens: list[str], context: str | None) -> LabelRule:
    """The explainer's tokens as vocabulary texts (models often drop the leading space: try both)."""
    texts = [v for t in tokens for v in dict.fromkeys((t, " " + t.lstrip())) if v in vocab.index]
    return LabelRule(tuple(dict.fromkeys(texts)), (), context)


def _explain_pass(labeller: _Labeller, todo: list[int], config: ExplainerConfig) -> int:
    n_explained = 0
    bar = tqdm(
        total=len(todo),
        desc=f"explaining with {config.model}",
        unit="feature",
        disable=not labeller.options.progress,
    )
    for chunk in _chunks(todo, EXPLAINED_PER_CHUNK):
        for feature, evidence in labeller.evidence_by_feature(chunk):
            if evidence is None:
                continue
            examples = [
                render_example(
                    [labeller.token_text(int(t)) for t in labeller.library.token_ids[e.context_id]],
                    e.acts.tolist(),
                )
                for e in evidence.train_examples[:EXPLAINER_EXAMPLES]
            ]
            explanation = explain(config, examples)
            if explanation is None:
                continue
            rule = explainer_rule(labeller.vocab, explanation.tokens, explanation.context)
            score = score_rule(rule, evidence.heldout, labeller.vocab)
            made = _MachineLabel(explanation.text, config.source, config.url, rule)
            record_label(
                labeller.session,
                feature,
                _machine_label(labeller.sae, feature.idx, made, score, evidence),
            )
            n_explained += 1
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


def label_sae(engine: Engine, sae_name: str, options: LabelOptions | None = None) -> LabelSummary:
    """Label every alive feature of an SAE in the store (see the module docstring)."""
    options = options or LabelOptions()
    with Session(engine) as session:
        sae = get_sae(session, sae_name)
        if sae.status != "complete":
            raise LabelError(
                f"precompute of {sae_name!r} has not finished; run `saescope precompute` to the end first"
            )
        vocab = Vocab.load(session, sae)
        library = ContextLibrary.load(session, sae, vocab)
        seq_len = {cid: len(tokens) for cid, tokens in library.token_ids.items()}
        labeller = _Labeller(session, sae, vocab, library, seq_len, options)
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
