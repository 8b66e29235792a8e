"""The labels history in the store: recording a label, a researcher's edit, a feature's history,
and scoring a stored rule again. What the web app reads and writes; making labels is
``sae_core.labels.run``, whose rule search (numba) a web worker never loads."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import Session

from sae_core.errors import SaescopeError
from sae_core.labels.evidence import ContextLibrary, HeldOut, Vocab, heldout_tokens, load_examples
from sae_core.labels.rules import LabelRule, parse_label
from sae_core.labels.scoring import LabelScore, score_rule
from sae_core.store.db import FeatureRow, LabelRow, SaeRow, utcnow
from sae_core.store.lookup import find_feature

AUTO_SOURCE = "auto"  # the source of the automatic labels
MAX_LABEL_CHARS = 500  # a human label longer than a paragraph is a note, not a label
# A human label's source is "human:<author>", in the store's 64-character source column.
MAX_AUTHOR_CHARS = 64 - len("human:")


class LabelError(SaescopeError):
    """A labelling request that cannot be carried out."""


def get_sae(session: Session, name: str) -> SaeRow:
    sae = session.scalar(sa.select(SaeRow).where(SaeRow.name == name))
    if sae is None:
        known = ", ".join(session.scalars(sa.select(SaeRow.name).order_by(SaeRow.name))) or "none"
        raise LabelError(
            f"no SAE named {name!r} in the store (known: {known}); run `saescope precompute` first"
        )
    return sae


def _is_human(source: str | None) -> bool:
    return bool(source) and source.startswith("human:")


def replaces_current(
    current: tuple[str | None, str | None, float | None], source: str, f1: float | None
) -> bool:
    """Whether a new label (``source``, ``f1``) becomes current over the feature's current
    (label, source, f1): a human label always, a machine one unless a human's is current, when
    it renews its own source or scores at least as well."""
    label, current_source, current_f1 = current
    if _is_human(source):
        return True
    if _is_human(current_source):
        return False
    return label is None or current_source == source or (f1 or 0.0) >= (current_f1 or 0.0)


def record_label(session: Session, feature: FeatureRow, label: LabelRow) -> None:
    """Add ``label`` to the history and make it the feature's current label if it ranks first."""
    session.add(label)
    if replaces_current((feature.label, feature.label_source, feature.label_f1), label.source, label.f1):
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
        row.rule = rule_json(rule, held, score, method="human")
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


def rule_json(rule: LabelRule, held: HeldOut, score: LabelScore, *, method: str) -> dict:
    """A scored rule as the store keeps it: what it says, where it was scored and how it did;
    ``method`` names what made it (the automatic labeller's version, an explainer, "human")."""
    return {
        "method": method,
        "rule": rule.to_json(),
        "heldout": held.to_json(),
        "n_firing": score.n_firing,
        "n_predicted": score.n_predicted,
    }


def score_on_heldout(
    session: Session, sae: SaeRow, idx: int, rule: LabelRule, held: HeldOut
) -> LabelScore:
    """Score ``rule`` for feature ``idx`` on the given held-out contexts (read from the store)."""
    vocab = Vocab.load(session, sae)
    library = ContextLibrary.load(session, sae, vocab, held.positives + held.negatives)
    positives = load_examples(session, sae.id, idx, idx + 1, contexts=held.positives).get(idx, [])
    return score_rule(rule, heldout_tokens(library, positives, held), vocab)


def score_stored_label(session: Session, sae: SaeRow, label: LabelRow) -> LabelScore:
    """Recompute a scored label's score from its stored rule and held-out contexts."""
    if not label.rule:
        raise LabelError(
            f"label {label.id} has no rule to score (free-text human labels are not scored)"
        )
    rule, held = LabelRule.from_json(label.rule["rule"]), HeldOut.from_json(label.rule["heldout"])
    return score_on_heldout(session, sae, label.feature_idx, rule, held)
