"""``/api/v1``: the same data as the pages, as JSON (schemas in ``app.schemas``)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query

from app import queries
from app.deps import SessionDep
from app.schemas import (
    ExamplesPublic,
    FeaturePreviewPublic,
    FeaturePublic,
    FeatureSearch,
    FeaturesPublic,
    ReleasePublic,
    ReleasesPublic,
    SaePublic,
    SaesPublic,
)
from app.search import search_features

router = APIRouter(prefix="/api/v1", tags=["api"])

NOT_FOUND = {404: {"description": "Unknown SAE, feature or release", "content": {"application/json": {}}}}
FeatureIndex = Annotated[int, Path(ge=0, description="Feature index within the SAE.")]
# Every stored example fits (precompute keeps tens per feature); a cap keeps one response small.
ExampleLimit = Annotated[int, Query(ge=1, le=200)]


@router.get("/saes", summary="The SAEs in the store, with their metrics")
def read_saes(session: SessionDep) -> SaesPublic:
    return queries.list_saes(session=session)


@router.get("/releases", summary="The releases (sets of SAEs precomputed together) in the store")
def read_releases(session: SessionDep) -> ReleasesPublic:
    return queries.list_releases(session=session)


@router.get("/releases/{release}", responses=NOT_FOUND, summary="One release: its SAEs by layer and width")
def read_release(release: str, session: SessionDep) -> ReleasePublic:
    return queries.get_release(session=session, release_name=release)


@router.get("/saes/{sae}", responses=NOT_FOUND, summary="One SAE, with its density histogram")
def read_sae(sae: str, session: SessionDep) -> SaePublic:
    return queries.get_sae(session=session, sae_name=sae)


@router.get("/saes/{sae}/features", responses=NOT_FOUND, summary="Search and filter features")
def read_features(
    sae: str, search: Annotated[FeatureSearch, Query()], session: SessionDep
) -> FeaturesPublic:
    return search_features(session=session, sae_name=sae, search=search)


@router.get(
    "/saes/{sae}/features/{index}", responses=NOT_FOUND, summary="Everything about one feature"
)
def read_feature(
    sae: str,
    index: FeatureIndex,
    session: SessionDep,
    top_limit: Annotated[
        int | None, Query(ge=0, description="At most this many top examples (default: all).")
    ] = None,
    interval_limit: Annotated[
        int | None,
        Query(ge=0, description="At most this many samples per interval bin (default: all)."),
    ] = None,
) -> FeaturePublic:
    return queries.get_feature(
        session=session,
        sae_name=sae,
        index=index,
        top_limit=top_limit,
        interval_limit=interval_limit,
    )


@router.get(
    "/saes/{sae}/features/{index}/examples",
    responses=NOT_FOUND,
    summary="A feature's examples, paginated",
)
def read_examples(
    sae: str,
    index: FeatureIndex,
    session: SessionDep,
    kind: Literal["top", "interval"] = "top",
    bin: Annotated[int | None, Query(ge=0, description="Only this interval bin.")] = None,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: ExampleLimit = 20,
) -> ExamplesPublic:
    return queries.list_examples(
        session=session, sae_name=sae, index=index, kind=kind, bin=bin, offset=offset, limit=limit
    )


@router.get(
    "/saes/{sae}/features/{index}/preview", responses=NOT_FOUND, summary="A feature in brief"
)
def read_preview(sae: str, index: FeatureIndex, session: SessionDep) -> FeaturePreviewPublic:
    return queries.get_feature_preview(session=session, sae_name=sae, index=index)
