"""How well an SAE's current labels explain its features: the distribution of their held-out F1.

One function feeds both ``saescope label --report`` and the SAE page's small histogram.
"""

from __future__ import annotations

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
    rows = session.execute(
        sa.select(FeatureRow.label_f1).where(FeatureRow.sae_id == sae.id, FeatureRow.count > 0)
    ).all()
    f1 = np.array([r.label_f1 for r in rows if r.label_f1 is not None], dtype=np.float64)
    # bin i holds [i/10, (i+1)/10), the last one 1.0 too; the 1e-9 keeps an F1 of exactly 0.3
    # (0.3 * 10 = 2.9999999999999996) in the bin that starts at 0.3
    bins = np.minimum((f1 * F1_BINS + 1e-9).astype(np.int64), F1_BINS - 1)
    counts = np.bincount(bins, minlength=F1_BINS)

    def share(mask: np.ndarray) -> float | None:
        return float(mask.mean()) if f1.size else None

    return LabelReport(
        n_alive=len(rows),
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
