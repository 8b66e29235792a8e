"""One graph request, end to end: a release in the store, a prompt and a target in; the graph
computed, pruned, labelled, saved and returned as its store row (or the saved one, when the same
request was answered before). The CLI (``saescope graph``), the Python API (``release_graph``)
and the live model process's graph jobs (``app.live.jobs``) all come through here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from sae_core.inputs.subject import Subject, load_subject
from sae_core.live.attribution import Target
from sae_core.live.graph import GraphSae, Progress, build_graph
from sae_core.live.graph_json import GraphDocument, dumps, graph_document, loads
from sae_core.live.graph_prune import prune
from sae_core.live.graph_settings import GraphError, GraphLimits, Pruning
from sae_core.live.probe import PromptTooLong, encode_prompt, single_token_id
from sae_core.saes.formats import load_sae, stored_prefix
from sae_core.store.db import (
    GraphRow,
    ReleaseRow,
    SaeRow,
    SubjectModelRow,
    create_engine_for,
    migrate,
)
from sae_core.store.graphs import feature_labels, find_graph, request_key, save_graph
from sae_core.store.releases import get_release, release_saes


@dataclass(frozen=True)
class GraphRequest:
    release: str
    prompt: str
    target: str | None = None  # one token's text (" Paris"); None: the model's top prediction
    contrast: str | None = None  # a second token: explain logit(target) - logit(contrast)
    pruning: Pruning = field(default_factory=Pruning)
    limits: GraphLimits = field(default_factory=GraphLimits)
    max_prompt_tokens: int = 64  # Neuronpedia's cap too; the time grows about linearly with it

    def key(self) -> str:
        return request_key(
            release=self.release,
            prompt=self.prompt,
            target=self.target,
            contrast=self.contrast,
            pruning=asdict(self.pruning),
            max_features=self.limits.max_features,
        )


@dataclass(frozen=True)
class ReleaseLayer:
    """The SAE a graph uses at one layer of a release."""

    layer: int
    sae_id: int
    name: str
    path: str
    prefix: int | None  # a Matryoshka dictionary's nested SAE: its width (load_sae's prefix)


def release_layers(session: Session, name: str) -> tuple[ReleaseRow, str, list[ReleaseLayer]]:
    """(release, subject model name, one SAE per layer: the widest) or a GraphError."""
    release = get_release(session, name)
    if release is None:
        known = ", ".join(session.scalars(sa.select(ReleaseRow.name).order_by(ReleaseRow.name)))
        raise GraphError(f"no release named {name!r} in the store (it has: {known or 'none'})")
    model = session.scalar(
        sa.select(SubjectModelRow.name).where(SubjectModelRow.id == release.model_id)
    )
    widest: dict[int, SaeRow] = {}
    for row in release_saes(session, release.id):
        if row.layer not in widest or row.d_sae > widest[row.layer].d_sae:
            widest[row.layer] = row
    if not widest:
        raise GraphError(f"release {name!r} has no complete SAE")
    layers = [ReleaseLayer(r.layer, r.id, r.name, r.path, stored_prefix(r.train_cfg or {}, r.d_sae)) for _, r in sorted(widest.items())]
    return release, model, layers


Loader = Callable[[str, list[ReleaseLayer]], tuple[Subject, list[GraphSae]]]


def load_from_disk(
    model: str, layers: list[ReleaseLayer], *, device: str = "cpu"
) -> tuple[Subject, list[GraphSae]]:
    subject = load_subject(model, device=device)
    saes = [
        GraphSae(layer.layer, load_sae(layer.path, d_in=subject.d_model, prefix=layer.prefix).to(device))
        for layer in layers
    ]
    return subject, saes


def run_request(
    sessions: sessionmaker,
    request: GraphRequest,
    *,
    load: Loader = load_from_disk,
    model_override: str | None = None,
    progress: Progress | None = None,
) -> GraphRow:
    """The saved graph for ``request``: reused when the store has it, else computed and saved."""
    key = request.key()
    with sessions() as session:
        if (row := find_graph(session, key)) is not None:
            n_tokens = len(loads(row.document).metadata.prompt_tokens)
            if n_tokens > request.max_prompt_tokens:  # the same cap, whether computed or reused
                raise PromptTooLong(n_tokens, request.max_prompt_tokens)
            return row
        release, model, layers = release_layers(session, request.release)
    subject, saes = load(model_override or model, layers)
    prompt = encode_prompt(subject, request.prompt, max_tokens=request.max_prompt_tokens)
    target = Target(
        token=None if request.target is None else single_token_id(subject, request.target),
        contrast=None if request.contrast is None else single_token_id(subject, request.contrast),
    )
    graph = build_graph(subject, saes, prompt, target, limits=request.limits, progress=progress)
    if progress:
        progress("pruning", 0, 1)
    pruned = prune(graph, request.pruning)
    kept = graph.features[pruned.nodes[: graph.n_features]]
    wanted = [(graph.layers[s], f) for s, _, f in kept.tolist()]
    with sessions() as session:
        labels = feature_labels(session, {layer.layer: layer.sae_id for layer in layers}, wanted)
        document = graph_document(
            graph,
            pruned,
            slug=key[:16],
            release=request.release,
            sae_names=[layer.name for layer in layers],
            prompt=request.prompt,
            n_model_layers=subject.n_layers,
            pruning=request.pruning,
            limits=request.limits,
            labels=labels,
        )
        return save_graph(
            session,
            release_id=release.id,
            key=key,
            prompt=request.prompt,
            source="computed",
            document=dumps(document),
        )


def import_document(sessions: sessionmaker, release: str, text: str | bytes) -> GraphRow:
    """Save a graph JSON (circuit-tracer's, a Neuronpedia download, an export) under ``release``,
    whose SAEs give its features their pages; a GraphError when it cannot be read."""
    document = loads(text)
    with sessions() as session:
        row, _, _ = release_layers(session, release)
        return save_graph(
            session,
            release_id=row.id,
            key=None,
            prompt=document.metadata.prompt,
            source="imported",
            document=dumps(document),
        )


def release_graph(
    db: str,
    release: str,
    prompt: str,
    target: str | None = None,
    *,
    model: str | None = None,
    **options,
) -> GraphDocument:
    """From Python: the graph document of ``prompt`` for ``release`` in the store at ``db``
    (computed, or reused when asked before); ``model`` overrides the store's subject model.
    ``options``: ``contrast``, ``pruning``, ``limits``, ``max_prompt_tokens`` as in
    ``GraphRequest``."""
    engine = create_engine_for(db)
    try:
        migrate(engine)
        sessions = sessionmaker(engine, expire_on_commit=False)
        request = GraphRequest(release, prompt, target, **options)
        row = run_request(sessions, request, model_override=model)
        return loads(row.document)
    finally:
        engine.dispose()
