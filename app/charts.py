"""Histogram geometry for the inline SVG charts: the template draws what these functions lay out."""

from __future__ import annotations

from typing import NamedTuple

from app.schemas import HistogramPublic


class Bar(NamedTuple):
    x: float  # left edge, px
    y: float  # top edge, px
    width: float
    height: float
    lo: float  # data range of the bin
    hi: float
    count: int


class Tick(NamedTuple):
    x: float  # px
    value: float  # data value at x


class Chart(NamedTuple):
    width: int
    height: int
    bars: list[Bar]
    ticks: list[Tick]


def histogram_chart(
    hist: HistogramPublic, *, width: int = 320, height: int = 80, n_ticks: int = 5
) -> Chart:
    """Bars scaled to the tallest bin; ticks at evenly spaced data values along the x axis."""
    edges, counts = hist.edges, hist.counts
    lo, hi = edges[0], edges[-1]
    span = (hi - lo) or 1.0
    tallest = max(counts) or 1

    def x_of(value: float) -> float:
        return round((value - lo) / span * width, 2)

    bars = []
    for left, right, count in zip(edges[:-1], edges[1:], counts, strict=True):
        bar_height = round(count / tallest * height, 2)
        bars.append(
            Bar(
                x_of(left),
                round(height - bar_height, 2),
                max(x_of(right) - x_of(left) - 0.5, 0.5),
                bar_height,
                left,
                right,
                count,
            )
        )
    ticks = [
        Tick(x_of(lo + span * i / (n_ticks - 1)), lo + span * i / (n_ticks - 1))
        for i in range(n_ticks)
    ]
    return Chart(width=width, height=height, bars=bars, ticks=ticks)
