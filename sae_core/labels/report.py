"""How well an SAE's current labels explain its features: the distribution of their held-out F1.

One function feeds both ``saescope label --report`` and the SAE page's small histogram.
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session

from sae_core.store.db import FeatureRow, SaeRow

F1_BINS = 10  # histogram bins over [0, 1]: 0.1 wide, coarse enough for a page's corner


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
        return out


def label_report(session: Session, sae: SaeRow) -> LabelReport:
    """The F1 distribution of the current labels of ``sae``'s alive features."""
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
    )


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
