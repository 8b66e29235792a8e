"""How well an SAE's current labels explain its features: the distribution of their held-out F1.

One function feeds both ``saescope label --report`` and the SAE page's small histogram. The
command line also splits the scores by how many held-out firing tokens each rests on
(``evidence_bands``): a sparse feature's held-out windows are what its top examples left over,
often a few weak activations on unrelated text, and there one token more or less decides whether
F1 is 0. On the demo's 4k SAE, 63% of the features scored on fewer than 5 firing tokens have
F1 = 0, against 5% of those scored on 10 to 19 and none on 20 or more.
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session

from sae_core.store.db import FeatureRow, LabelRow, SaeRow

F1_BINS = 10  # histogram bins over [0, 1]: 0.1 wide, coarse enough for a page's corner
# Lower edges of the bands of held-out firing tokens a score rests on (the last band is open)
EVIDENCE_EDGES = (0, 5, 10, 20)


class EvidenceBand(NamedTuple):
    """The scored features whose held-out set has ``lo`` to ``hi`` - 1 firing tokens."""

    lo: int
    hi: int | None  # None: no upper end
    n: int
    median_f1: float | None
    share_zero: float | None
    share_at_least_05: float | None

    def line(self, n_scored: int) -> str:
        span = f"{self.lo}+" if self.hi is None else f"{self.lo}-{self.hi - 1}"
        if not self.n:
            return f"  {span:>6} firing tokens: none"
        return (
            f"  {span:>6} firing tokens: {self.n:6,d} ({self.n / n_scored:.0%})   "
            f"median {self.median_f1:.2f}   F1 = 0: {self.share_zero:.0%}   "
            f"F1 >= 0.5: {self.share_at_least_05:.0%}"
        )


class LabelReport(NamedTuple):
    n_alive: int  # features that fired at least once
    n_scored: int  # of those, with a current label that has a held-out F1
    median_f1: float | None
    mean_f1: float | None
    share_zero: float | None  # of the scored features, F1 exactly 0
    share_below_02: float | None
    share_at_least_05: float | None
    share_at_least_08: float | None
    edges: list[float]  # (F1_BINS + 1,)
    counts: list[int]  # (F1_BINS,) scored features per F1 bin, the last bin closed at 1
    bands: list[EvidenceBand] | None = None  # by held-out firing tokens, when asked for

    def lines(self) -> list[str]:
        """The report as a person reads it on a terminal."""
        if not self.n_scored:
            return [
                f"{self.n_alive:,} alive features; none has a scored label yet (run `saescope label`)"
            ]
        share = lambda value: f"{value:.0%}"  # noqa: E731
        out = [
            f"{self.n_scored:,} of {self.n_alive:,} alive features have a scored label; "
            f"held-out F1 median {self.median_f1:.2f}, mean {self.mean_f1:.2f}",
            f"  F1 = 0: {share(self.share_zero)}   F1 < 0.2: {share(self.share_below_02)}   "
            f"F1 >= 0.5: {share(self.share_at_least_05)}   F1 >= 0.8: {share(self.share_at_least_08)}",
        ]
        peak = max(self.counts) or 1
        for lo, hi, count in zip(self.edges[:-1], self.edges[1:], self.counts, strict=True):
            out.append(f"  {lo:.1f}-{hi:.1f} {count:6,d} {'#' * round(40 * count / peak)}")
        if self.bands is not None:
            n_banded = sum(band.n for band in self.bands)
            out.append("by the held-out firing tokens each score rests on:")
            out.extend(band.line(n_banded) for band in self.bands)
        return out


def label_report(session: Session, sae: SaeRow, *, by_evidence: bool = False) -> LabelReport:
    """The F1 distribution of the current labels of ``sae``'s alive features; ``by_evidence``
    adds ``evidence_bands`` (it reads every current label's row, which the SAE page does not)."""
    f1, n_alive = _alive_f1(session, sae)
    # bin i holds [i/10, (i+1)/10), the last one 1.0 too; the 1e-9 keeps an F1 of exactly 0.3
    # (0.3 * 10 = 2.9999999999999996) in the bin that starts at 0.3
    bins = np.minimum((f1 * F1_BINS + 1e-9).astype(np.int64), F1_BINS - 1)
    counts = np.bincount(bins, minlength=F1_BINS)

    def share(mask: np.ndarray) -> float | None:
        return float(mask.mean()) if f1.size else None

    return LabelReport(
        n_alive=n_alive,
        n_scored=int(f1.size),
        median_f1=float(np.median(f1)) if f1.size else None,
        mean_f1=float(f1.mean()) if f1.size else None,
        share_zero=share(f1 == 0),
        share_below_02=share(f1 < 0.2),
        share_at_least_05=share(f1 >= 0.5),
        share_at_least_08=share(f1 >= 0.8),
        edges=[i / F1_BINS for i in range(F1_BINS + 1)],
        counts=[int(c) for c in counts],
        bands=evidence_bands(session, sae) if by_evidence else None,
    )


def evidence_bands(session: Session, sae: SaeRow) -> list[EvidenceBand]:
    """The F1 of the current labels of ``sae``'s alive features by how many held-out firing tokens
    each was scored on (``EVIDENCE_EDGES``), read from the label rows that scored them."""
    current = {
        idx: (label, source)
        for idx, label, source in session.execute(
            sa.select(FeatureRow.idx, FeatureRow.label, FeatureRow.label_source).where(
                FeatureRow.sae_id == sae.id,
                FeatureRow.density > 0,
                FeatureRow.label_f1.is_not(None),
            )
        )
    }
    scored: dict[int, tuple[float, int]] = {}  # feature -> (F1, held-out firing tokens)
    rows = session.execute(
        sa.select(LabelRow.feature_idx, LabelRow.label, LabelRow.source, LabelRow.f1, LabelRow.rule)
        .where(LabelRow.sae_id == sae.id, LabelRow.f1.is_not(None))
        .order_by(LabelRow.id)
    )
    for idx, label, source, f1, rule in rows:  # the latest row of the current label wins
        if current.get(idx) == (label, source) and rule and "n_firing" in rule:
            scored[idx] = (f1, int(rule["n_firing"]))
    f1 = np.array([score for score, _ in scored.values()], dtype=np.float64)
    firing = np.array([n for _, n in scored.values()], dtype=np.int64)
    bands = []
    for lo, hi in zip(EVIDENCE_EDGES, [*EVIDENCE_EDGES[1:], None], strict=True):
        band = f1[(firing >= lo) & (firing < (np.inf if hi is None else hi))]
        bands.append(
            EvidenceBand(
                lo,
                hi,
                int(band.size),
                float(np.median(band)) if band.size else None,
                float((band == 0).mean()) if band.size else None,
                float((band >= 0.5).mean()) if band.size else None,
            )
        )
    return bands


def _alive_f1(session: Session, sae: SaeRow) -> tuple[np.ndarray, int]:
    """The F1 of every scored alive feature (count > 0, i.e. density > 0), and how many are alive,
    read from indexes only: a feature row is wide (its examples' statistics as JSON), and the SAE
    page asks for this on every view, so the query must not read 16k of them. Every score is on
    the ``(sae_id, label_f1)`` index; the few dead features' scores (``density = 0`` on the
    ``(sae_id, density)`` index) are taken back out of that multiset."""

    def scores(condition: sa.ColumnElement[bool]) -> list[float]:
        rows = session.scalars(
            sa.select(FeatureRow.label_f1).where(FeatureRow.sae_id == sae.id, condition)
        )
        return [f1 for f1 in rows if f1 is not None]

    scored = Counter(scores(FeatureRow.label_f1.is_not(None)))  # a covering index scan
    scored.subtract(scores(FeatureRow.density == 0))  # two equalities: the density index, few rows
    n_alive = session.scalar(
        sa.select(sa.func.count())
        .select_from(FeatureRow)
        .where(FeatureRow.sae_id == sae.id, FeatureRow.density > 0)
    )
    return np.array(sorted(scored.elements()), dtype=np.float64), n_alive
