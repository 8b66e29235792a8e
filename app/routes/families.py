"""Feature families: the family page of a feature and the feature map of a release, each with
its ``/api/v1`` twin (the page renders the same model)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import HTMLResponse, Response
from markupsafe import Markup

from app.deps import SessionDep
from app.families.graph import family_graph
from app.families.map import get_feature_map, search_release
from app.families.schemas import FamilyGraphPublic, FeatureMapPublic, Measure, ReleaseResultsPublic
from app.rendering import render, url_segment
from app.schemas import FeatureSearch

router = APIRouter()
pages = APIRouter(include_in_schema=False, default_response_class=HTMLResponse)

NOT_FOUND = {404: {"description": "Unknown SAE, feature or release", "content": {"application/json": {}}}}
FeatureIndex = Annotated[int, Path(ge=0, description="Feature index within the SAE.")]
By = Annotated[Measure, Query(description="The link measure that weights and thresholds edges.")]
Threshold = Annotated[
    float | None, Query(ge=0, le=1, description="Weakest link drawn (default 0.4 for cosine, 0.1 for jaccard).")
]
Layer = Annotated[int | None, Query(ge=0, description="The hook's layer (default: the first with a map).")]


@router.get(
    "/api/v1/saes/{sae}/features/{index}/family",
    tags=["api"],
    responses=NOT_FOUND,
    summary="A feature's family across the widths of its release, as a graph",
)
def read_family(
    sae: str, index: FeatureIndex, session: SessionDep, by: By = "cosine", threshold: Threshold = None
) -> FamilyGraphPublic:
    return family_graph(session=session, sae_name=sae, index=index, by=by, threshold=threshold)


@router.get(
    "/api/v1/releases/{name}/map",
    tags=["api"],
    responses=NOT_FOUND | {304: {"description": "Not modified: the If-None-Match ETag is the map's"}},
    summary="Every feature of one hook of a release, placed in 2D by UMAP on decoder directions",
)
def read_map(request: Request, name: str, session: SessionDep, layer: Layer = None) -> FeatureMapPublic:
    built = get_feature_map(session=session, release_name=name, layer=layer)
    return built.json.response(request)  # serialised and gzipped once, when it was built


@router.get(
    "/api/v1/releases/{name}/features",
    tags=["api"],
    responses=NOT_FOUND,
    summary="Search the features of every SAE of a release (label words, token, filters)",
)
def read_release_features(name: str, search: Annotated[FeatureSearch, Query()], session: SessionDep) -> ReleaseResultsPublic:
    return search_release(session=session, release_name=name, search=search)


@pages.get("/saes/{sae}/features/{index}/family")
def family_page(
    request: Request, sae: str, index: FeatureIndex, session: SessionDep, by: By = "cosine", threshold: Threshold = None
) -> Response:
    graph = family_graph(session=session, sae_name=sae, index=index, by=by, threshold=threshold)
    twin = f"/api/v1/saes/{url_segment(sae)}/features/{index}/family?by={by}&threshold={graph.threshold}"
    return render(request, "family.html", {"graph": graph}, alternate=twin)


@pages.get("/releases/{name}/map")
def map_page(request: Request, name: str, session: SessionDep, layer: Layer = None) -> Response:
    built = get_feature_map(session=session, release_name=name, layer=layer)
    context = {"points": built.points, "points_json": script_json(built.json.text)}
    return render(request, "map.html", context, alternate=f"/api/v1/releases/{url_segment(name)}/map?layer={built.points.layer}")


def script_json(text: str) -> Markup:
    """JSON safe inside <script type="application/json">: '<', '>' and '&' as \\u escapes, so a
    label holding '</script>' cannot close the element."""
    return Markup(text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))

