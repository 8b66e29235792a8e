"""Read functions: store rows -> the pydantic models that pages and ``/api/v1`` both return.

Each function takes keyword arguments only, starting with the session, and raises
``NotFoundError`` for what the URL names but the store lacks (``sae_core.store.lookup`` finds
SAEs and features). Search lives in ``app.search``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.families.panel import panel_links, panel_of
from app.previews import EXAMPLE_COLUMNS, WITH_CONTEXT, neighbour_previews
from app.schemas import (
    ExamplePublic,
    ExamplesPublic,
    FeaturePreviewPublic,
    FeaturePublic,
    FeatureSummaryPublic,
    HistogramPublic,
    IntervalPublic,
    LabelPublic,
    MatryoshkaPublic,
    MetricsPublic,
    NestedSaePublic,
    ReleasePublic,
    ReleasesPublic,
    SaePublic,
    SaesPublic,
    TokenValuePublic,
)
from app.store_cache import StoreCache, label_version, published
from app.vocab import Vocabulary, get_vocabulary
from sae_core.errors import NotFoundError
from sae_core.labels.report import label_report
from sae_core.store import releases
from sae_core.store.db import (
    ContextRow,
    ExampleRow,
    FeatureRow,
    ReleaseRow,
    SaeRow,
    SubjectModelRow,
    unpack_acts,
    unpack_tokens,
)
from sae_core.store.families import dictionary_width, same_dictionary
from sae_core.store.lookup import check_feature_index, find_feature, find_release, find_sae

# A "dense" feature fires on more than 10% of tokens, as in the SAE literature.
DENSE_THRESHOLD = 0.1
# Headline metrics read from the held-out column of the SAE's report card (metrics.json); the dead
# and dense fractions are measured here instead, on the precompute tokens the pages describe.
TRAINING_METRICS = ("delta_ce", "kl_div", "ce_loss_recovered", "explained_variance", "l0")
REPORT_CARD = ("held_out", "other_corpus")  # metrics.json's columns, in order
PREVIEW_EXAMPLES = 3  # examples in a neighbour preview: a glance, not the feature page


# ---------------------------------------------------------------------------------------------
# SAEs


def _histogram(value: dict | None) -> HistogramPublic | None:
    if not value or not value.get("counts"):
        return None
    return HistogramPublic(edges=value["edges"], counts=value["counts"])


def _optional_float(mapping: dict, key: str) -> float | None:
    value = mapping.get(key)
    return float(value) if isinstance(value, int | float) else None


def _feature_fractions(session: Session, sae: SaeRow) -> tuple[float, float] | None:
    """(dead fraction, dense fraction) of a complete SAE's features: two range counts on the
    (sae_id, density) index, since density is 0 exactly where a feature never fired. They never
    change once the SAE is published, so each SAE's are counted once."""
    if sae.status != "complete" or not sae.d_sae:
        return None

    def count(condition: sa.ColumnElement[bool]) -> int:
        return session.scalar(
            sa.select(sa.func.count())
            .select_from(FeatureRow)
            .where(FeatureRow.sae_id == sae.id, condition)
        )

    def fractions() -> tuple[float, float]:
        dead, dense = count(FeatureRow.density == 0), count(FeatureRow.density > DENSE_THRESHOLD)
        return dead / sae.d_sae, dense / sae.d_sae

    return _fractions.read(session, published(sae), None, fractions)


def _label_f1_histogram(session: Session, sae: SaeRow) -> HistogramPublic | None:
    """The held-out F1 of the SAE's current labels, binned: it reads every feature's score (~25 ms
    of CPU at 16k features), so it is kept until a label changes."""

    def histogram() -> HistogramPublic | None:
        report = label_report(session, sae)
        return _histogram(
            {"edges": report.edges, "counts": report.counts} if report.n_scored else None
        )

    return _f1_histograms.read(session, published(sae), label_version(session), histogram)


_fractions: StoreCache[tuple[float, float]] = StoreCache(size=256)
_f1_histograms: StoreCache[HistogramPublic | None] = StoreCache(size=256)


def _report_card(metrics: dict) -> list[MetricsPublic]:
    card = []
    for column in (metrics.get(name) for name in REPORT_CARD):
        if isinstance(column, dict):
            corpus = column.get("corpus") or {}
            card.append(MetricsPublic.model_validate(
                {**column, "corpus": str(corpus.get("spec")), "role": str(corpus.get("role")), "note": str(corpus.get("note") or "")}
            ))  # fmt: skip
    return card


def _sae_public(
    row: SaeRow,
    model_name: str,
    release: str | None,
    fractions: tuple[float, float] | None,
    label_f1_hist: HistogramPublic | None = None,
    nested: list[NestedSaePublic] | None = None,
) -> SaePublic:
    metrics = row.metrics or {}
    held_out = metrics.get("held_out") or {}
    tokens_trained = (row.train_cfg or {}).get("tokens_trained")  # written by `saescope train`
    return SaePublic(
        name=row.name,
        model=model_name,
        release=release,
        layer=row.layer,
        hook_name=row.hook_name,
        architecture=row.architecture,
        d_in=row.d_in,
        d_sae=row.d_sae,
        k=row.k,
        l1_coeff=row.l1_coeff,
        status=row.status,
        train_tokens=int(tokens_trained) if isinstance(tokens_trained, int | float) else None,
        n_tokens=row.n_tokens,
        **{name: _optional_float(held_out, name) for name in TRAINING_METRICS},
        dead_fraction=fractions[0] if fractions else None,
        dense_fraction=fractions[1] if fractions else None,
        metrics_how={
            k: v
            for k, v in (metrics.get("how") or {}).items()
            if isinstance(v, str)
        },
        report_card=_report_card(metrics),
        corpus=row.corpus or {},
        density_hist=_histogram(row.density_hist),
        label_f1_hist=label_f1_hist,
        matryoshka=_matryoshka(row, nested or []),
        created_at=row.created_at,
    )


def _matryoshka(row: SaeRow, nested: list[NestedSaePublic]) -> MatryoshkaPublic | None:
    width = dictionary_width(row)
    if width is None:
        return None
    return MatryoshkaPublic(dictionary_width=width, prefix=row.d_sae, saes=nested)


def _nested_saes(session: Session, row: SaeRow) -> list[NestedSaePublic]:
    """The complete SAEs of ``row``'s Matryoshka dictionary (its prefixes and itself), by width."""
    if dictionary_width(row) is None:
        return []
    others = session.scalars(
        sa.select(SaeRow)
        .where(SaeRow.path == row.path, SaeRow.layer == row.layer, SaeRow.status == "complete")
        .order_by(SaeRow.d_sae, SaeRow.name)
    )
    return [NestedSaePublic(name=other.name, d_sae=other.d_sae) for other in others if same_dictionary(row, other)]


def list_saes(*, session: Session) -> SaesPublic:
    rows = session.execute(
        sa.select(SaeRow, SubjectModelRow.name, ReleaseRow.name)
        .join(SubjectModelRow, SubjectModelRow.id == SaeRow.model_id)
        .outerjoin(ReleaseRow, ReleaseRow.id == SaeRow.release_id)
        .where(SaeRow.status == "complete")  # a precompute in progress writes a staging row
        .order_by(SaeRow.created_at, SaeRow.name)
    ).all()
    data = [
        _sae_public(sae, model, release, _feature_fractions(session, sae))
        for sae, model, release in rows
    ]
    return SaesPublic(data=data, count=len(data))


def get_sae(*, session: Session, sae_name: str) -> SaePublic:
    row = find_sae(session, sae_name)
    model_name = session.scalar(
        sa.select(SubjectModelRow.name).where(SubjectModelRow.id == row.model_id)
    )
    release = session.scalar(sa.select(ReleaseRow.name).where(ReleaseRow.id == row.release_id))
    fractions = _feature_fractions(session, row)
    f1_hist = _label_f1_histogram(session, row)
    return _sae_public(row, model_name or "", release, fractions, f1_hist, _nested_saes(session, row))


# ---------------------------------------------------------------------------------------------
# Releases


def _release_public(session: Session, release: ReleaseRow) -> ReleasePublic:
    model = session.scalar(
        sa.select(SubjectModelRow.name).where(SubjectModelRow.id == release.model_id)
    )
    saes = [
        _sae_public(row, model or "", release.name, _feature_fractions(session, row))
        for row in releases.release_saes(session, release.id)
    ]
    return ReleasePublic(
        name=release.name,
        model=model or "",
        layers=sorted({sae.layer for sae in saes}),
        widths=sorted({sae.d_sae for sae in saes}),
        saes=saes,
        created_at=release.created_at,
    )


def list_releases(*, session: Session) -> ReleasesPublic:
    data = [_release_public(session, row) for row in releases.list_releases(session)]
    return ReleasesPublic(data=data, count=len(data))


def get_release(*, session: Session, release_name: str) -> ReleasePublic:
    row = find_release(session, release_name)
    if not releases.release_saes(session, row.id):  # its SAEs are all still being precomputed
        raise NotFoundError.release(release_name)
    return _release_public(session, row)


# ---------------------------------------------------------------------------------------------
# Examples

def _example_rows(
    session: Session, sae_id: int, index: int, kind: str | None = None, limit: int | None = None
) -> list[sa.Row]:
    """A feature's examples (``EXAMPLE_COLUMNS``): each kind by bin, then rank."""
    stmt = (
        sa.select(*EXAMPLE_COLUMNS)
        .join(ContextRow, WITH_CONTEXT)
        .where(ExampleRow.sae_id == sae_id, ExampleRow.feature_idx == index)
    )
    if kind is not None:
        stmt = stmt.where(ExampleRow.kind == kind)
    stmt = stmt.order_by(ExampleRow.kind, ExampleRow.bin, ExampleRow.rank).limit(limit)
    return list(session.execute(stmt))


def _example(row: sa.Row, vocab: Vocabulary) -> ExamplePublic:
    """A row of ``EXAMPLE_COLUMNS`` -> the example, its tokens' texts and activations decoded."""
    token_ids = unpack_tokens(row.token_ids).tolist()
    values = unpack_acts(row.acts, row.max_act, len(token_ids)).round(4)
    # Built from the store's own typed columns: skip re-validating thousands of tokens per page.
    return ExamplePublic.model_construct(
        context_id=row.context_id,
        kind=row.kind,
        bin=row.bin,
        rank=row.rank,
        max_act=row.max_act,
        max_pos=row.max_pos,
        tokens=vocab.texts_of(token_ids),
        token_ids=token_ids,
        values=values.tolist(),
    )


def _examples(session: Session, sae: SaeRow, rows: Sequence[sa.Row]) -> list[ExamplePublic]:
    vocab = get_vocabulary(session, sae.model_id)
    return [_example(r, vocab) for r in rows]


def list_examples(
    *,
    session: Session,
    sae_name: str,
    index: int,
    kind: Literal["top", "interval"] = "top",
    bin: int | None = None,
    offset: int = 0,
    limit: int = 20,
) -> ExamplesPublic:
    """One kind of a feature's examples (one interval bin when ``bin`` is given), paginated."""
    sae = find_sae(session, sae_name)
    _summary(session, sae, index)  # 404 for a feature the SAE lacks
    rows = [r for r in _example_rows(session, sae.id, index, kind) if bin is None or r.bin == bin]
    return ExamplesPublic(
        data=_examples(session, sae, rows[offset : offset + limit]), count=len(rows)
    )


# ---------------------------------------------------------------------------------------------
# Features


# The columns a feature list shows: everything but the per-feature JSON, which rows of a list
# would decode for nothing.
SUMMARY_COLUMNS = (
    FeatureRow.idx,
    FeatureRow.count,
    FeatureRow.density,
    FeatureRow.max_act,
    FeatureRow.mean_act,
    FeatureRow.label,
    FeatureRow.label_source,
    FeatureRow.label_f1,
)


def feature_summary(values: Mapping[str, Any]) -> FeatureSummaryPublic:
    """A row of ``SUMMARY_COLUMNS`` (plus ``token_act`` from a token search) -> its summary."""
    return FeatureSummaryPublic(
        index=values["idx"],
        count=values["count"],
        density=values["density"],
        max_act=values["max_act"],
        mean_act=values["mean_act"],
        label=values["label"],
        label_source=values["label_source"],
        label_f1=values["label_f1"],
        token_act=values.get("token_act"),
    )


def _summary(session: Session, sae: SaeRow, index: int) -> FeatureSummaryPublic:
    values = (
        session.execute(
            sa.select(*SUMMARY_COLUMNS).where(
                FeatureRow.sae_id == sae.id, FeatureRow.idx == check_feature_index(sae, index)
            )
        )
        .mappings()
        .first()
    )
    if values is None:
        raise NotFoundError.feature(sae.name, index, sae.d_sae)
    return feature_summary(values)


def _label(row: FeatureRow) -> LabelPublic | None:
    if not row.label:
        return None
    return LabelPublic(
        text=row.label,
        source=row.label_source,
        precision=row.label_precision,
        recall=row.label_recall,
        f1=row.label_f1,
    )


def _logit_tokens(pairs: list, vocab: Vocabulary) -> list[TokenValuePublic]:
    return [TokenValuePublic(token_id=t, text=vocab.text(t), value=v) for t, v in pairs]


def _intervals(
    row: FeatureRow, samples: list[ExamplePublic], counts: dict[int, int]
) -> list[IntervalPublic]:
    by_bin: dict[int, list[ExamplePublic]] = {}
    for example in samples:
        by_bin.setdefault(example.bin, []).append(example)
    return [
        IntervalPublic(
            bin=b["bin"],
            lo=b["lo"],
            hi=b["hi"],
            share=b["share"],
            count=b["count"],
            n_examples=counts.get(b["bin"], 0),
            examples=by_bin.get(b["bin"], []),
        )
        for b in sorted(row.intervals or [], key=lambda b: b["lo"], reverse=True)
    ]


def get_feature(
    *,
    session: Session,
    sae_name: str,
    index: int,
    top_limit: int | None = None,
    interval_limit: int | None = None,
) -> FeaturePublic:
    """Everything a feature page shows. ``top_limit`` / ``interval_limit`` (per bin) cap the
    examples returned (None: all of them); pages fetch the rest as fragments."""
    sae = find_sae(session, sae_name)
    row = find_feature(session, sae, index)
    vocab = get_vocabulary(session, sae.model_id)
    example_rows = _example_rows(session, sae.id, index)
    top_rows = [r for r in example_rows if r.kind == "top"]
    interval_rows = [r for r in example_rows if r.kind == "interval"]
    bin_counts: dict[int, int] = {}
    shown_intervals = []
    for r in interval_rows:
        bin_counts[r.bin] = bin_counts.get(r.bin, 0) + 1
        if interval_limit is None or bin_counts[r.bin] <= interval_limit:
            shown_intervals.append(r)
    shown = top_rows[:top_limit] + shown_intervals
    examples = _examples(session, sae, shown)
    links = panel_links(session, sae, index)
    cos, coact, *family_previews = neighbour_previews(
        session, [(sae, row.neighbours_cos or []), (sae, row.neighbours_coact or []), *links.previews_wanted()]
    )
    return FeaturePublic(
        sae=sae.name,
        index=index,
        d_sae=sae.d_sae,
        count=row.count,
        n_tokens=sae.n_tokens,
        density=row.density,
        max_act=row.max_act,
        mean_act=row.mean_act,
        label=_label(row),
        act_hist=_histogram(row.act_hist),
        logit_top=_logit_tokens(row.logit_top or [], vocab),
        logit_bottom=_logit_tokens(row.logit_bottom or [], vocab),
        logit_hist=_histogram(row.logit_hist),
        neighbours_cos=cos,
        neighbours_coact=coact,
        top_examples=[e for e in examples if e.kind == "top"],
        n_top_examples=len(top_rows),
        intervals=_intervals(row, [e for e in examples if e.kind == "interval"], bin_counts),
        prev_index=index - 1 if index > 0 else None,
        next_index=index + 1 if index + 1 < sae.d_sae else None,
        family=panel_of(sae, index, links, family_previews),
    )


def get_feature_summary(*, session: Session, sae_name: str, index: int) -> FeatureSummaryPublic:
    sae = find_sae(session, sae_name)
    return _summary(session, sae, index)


def get_feature_preview(*, session: Session, sae_name: str, index: int) -> FeaturePreviewPublic:
    sae = find_sae(session, sae_name)
    summary = _summary(session, sae, index)
    rows = _example_rows(session, sae.id, index, "top", limit=PREVIEW_EXAMPLES)
    return FeaturePreviewPublic(
        sae=sae.name, feature=summary, examples=_examples(session, sae, rows)
    )
