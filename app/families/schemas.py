"""What the family page and the feature map return (``/api/v1`` and the pages alike)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from app.schemas import FeaturesPublic

Measure = Literal["cosine", "jaccard"]


class FamilyNodePublic(BaseModel):
    sae: str
    d_sae: int
    index: int
    label: str | None
    label_f1: float | None
    density: float
    focus: bool = Field(description="The feature the family is drawn around.")
    x: float = Field(description="Position in the drawing (SVG user units).")
    y: float
    r: float = Field(description="Radius: grows with the square root of density.")


class FamilyEdgePublic(BaseModel):
    source: int = Field(description="Node (position in nodes) in the smaller SAE.")
    target: int = Field(description="Node in the larger SAE (or the same width).")
    cosine: float
    jaccard: float
    weight: float = Field(description="The measure the page thresholds on, cosine or jaccard.")
    same_latent: bool = Field(
        default=False,
        description="Both ends are one latent of a Matryoshka dictionary, in two of its nested SAEs.",
    )


class SplitTokenPublic(BaseModel):
    text: str
    token_id: int
    child_share: float = Field(description="Share of the child's top-example activation on this token.")
    parent_share: float = Field(description="The same share among the parent's top examples.")


class SplitPublic(BaseModel):
    """What a child fires on that its strongest parent in the drawing does not."""

    child: int = Field(description="Node of the child.")
    parent: int = Field(description="Node of the parent.")
    tokens: list[SplitTokenPublic]


class FamilyGraphPublic(BaseModel):
    sae: str
    index: int
    release: str
    by: Measure
    threshold: float = Field(description="Links weaker than this (by `by`) are not drawn.")
    width: float
    height: float
    rows: list[tuple[str, int, float]] = Field(description="(SAE, width, y) of each row, smallest width on top.")
    nodes: list[FamilyNodePublic]
    edges: list[FamilyEdgePublic]
    splits: list[SplitPublic]


class MapSaePublic(BaseModel):
    name: str
    d_sae: int


class FeatureMapPublic(BaseModel):
    """Every feature of the SAEs of one hook of a release, placed by UMAP on decoder directions
    (cosine metric). Columnar: point i is (sae[i], index[i], x[i], y[i], ...)."""

    release: str
    layer: int
    layers: list[int] = Field(description="Layers of the release that have a map.")
    saes: list[MapSaePublic] = Field(description="SAEs on the map, by width.")
    sae: list[int] = Field(description="Per point: its SAE (position in saes).")
    index: list[int]
    x: list[float] = Field(description="In [0, 1].")
    y: list[float]
    density: list[float]
    label: list[str | None]


class SaeResultsPublic(BaseModel):
    sae: str
    layer: int
    d_sae: int
    results: FeaturesPublic = Field(description="This SAE's matches: its page of them and their count.")


class ReleaseResultsPublic(BaseModel):
    """A feature search run over every SAE of a release, by layer then width."""

    release: str
    saes: list[SaeResultsPublic]
