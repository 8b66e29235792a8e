"""Attribution graphs as JSON in the format Neuronpedia's graph viewer and circuit-tracer read.

A document is ``{"metadata", "qParams", "nodes", "links"}``:

- ``metadata``: ``slug``, ``scan`` (which dictionaries: our release name), ``transcoder_list``
  (the SAEs, one per layer), ``prompt_tokens``, ``prompt``, ``node_threshold``, plus Neuronpedia's
  ``schema_version``, ``info``, ``generation_settings`` and ``pruning_settings``, and our own
  ``saescope`` block (target, scores, sizes before and after pruning);
- ``qParams``: the view: ``pinnedIds``, ``supernodes`` (groups, each ``[name, *node_ids]``),
  ``linkType``, ``clickedId``, ``sg_pos``;
- ``nodes``: ``node_id``, ``feature``, ``layer`` (a string: a block index, ``"E"`` for
  embeddings, one past the last block for the output), ``ctx_idx`` (position), ``feature_type``,
  ``token_prob``, ``is_target_logit``, ``run_idx``, ``reverse_ctx_idx``, ``jsNodeId``, ``clerp``
  (the label), ``influence``, ``activation``;
- ``links``: ``source``, ``target`` (node ids), ``weight``.

``feature_type`` uses the viewer's names, which it keys its drawing on: "cross layer
transcoder" for a dictionary feature (ours are residual-SAE features), "mlp reconstruction
error" for an error node (ours hold a residual SAE's error), "embedding" and "logit".
Unknown keys of an imported document are kept, so export → import → export is byte-identical
(``dumps`` is the one writer). ``GRAPH_SCHEMA`` is the JSON Schema of the format.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sae_core.live.graph_settings import GraphError, GraphLimits, Pruning

if TYPE_CHECKING:  # the page reads documents without torch; only export builds them from tensors
    from sae_core.live.graph import Graph
    from sae_core.live.graph_prune import PrunedGraph

SCHEMA_VERSION = 1
FEATURE = "cross layer transcoder"
ERROR = "mlp reconstruction error"
EMBEDDING = "embedding"
LOGIT = "logit"
GRAPH_SCHEMA = json.loads(
    resources.files("sae_core.live").joinpath("graph_schema.json").read_text()
)


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Metadata(_Open):
    slug: str
    scan: str
    transcoder_list: list[str] = Field(default_factory=list)
    prompt_tokens: list[str]
    prompt: str
    node_threshold: float | None = None
    schema_version: int | None = None
    info: dict | None = None
    generation_settings: dict | None = None
    pruning_settings: dict | None = None
    saescope: dict | None = None


class QParams(_Open):
    pinnedIds: list[str] = Field(default_factory=list)
    supernodes: list[list[str]] = Field(default_factory=list)
    linkType: str = "both"
    clickedId: str = ""
    sg_pos: str = ""


class Node(_Open):
    node_id: str
    feature: int | None = None
    layer: str
    ctx_idx: int
    feature_type: str
    token_prob: float = 0.0
    is_target_logit: bool = False
    run_idx: int = 0
    reverse_ctx_idx: int = 0
    jsNodeId: str
    clerp: str = ""
    influence: float | None = None
    activation: float | None = None


class Link(_Open):
    source: str
    target: str
    weight: float


class GraphDocument(_Open):
    metadata: Metadata
    qParams: QParams = Field(default_factory=QParams)
    nodes: list[Node]
    links: list[Link]

    def node(self, node_id: str) -> Node | None:
        return next((n for n in self.nodes if n.node_id == node_id), None)


def dumps(document: GraphDocument) -> str:
    """The one way a document becomes text (so a round trip is byte-identical)."""
    return json.dumps(document.model_dump(), indent=2, ensure_ascii=False) + "\n"


def loads(text: str | bytes) -> GraphDocument:
    """Read a graph JSON (ours, circuit-tracer's, a Neuronpedia download); a GraphError says in
    one line what is wrong with it."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise GraphError(f"not a graph JSON file: {err}") from None
    try:
        document = GraphDocument.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "the top level"
        raise GraphError(f"not a graph JSON file: {where}: {first['msg']}") from None
    ids = {n.node_id for n in document.nodes}
    if len(ids) != len(document.nodes):
        raise GraphError("not a graph JSON file: two nodes share a node_id")
    for link in document.links:
        if link.source not in ids or link.target not in ids:
            raise GraphError(
                f"the graph has a link to an unknown node ({link.source} -> {link.target})"
            )
    return document


def _round(value: float) -> float:
    """Six significant digits: plenty for drawing and reading, a third of the file size."""
    return float(f"{value:.6g}")


def _token(text: str) -> str:
    return text.replace("\n", "⏎").replace("\t", "→").replace("\r", "↵")


def graph_document(
    graph: Graph,
    pruned: PrunedGraph,
    *,
    slug: str,
    release: str,
    sae_names: list[str],
    prompt: str,
    n_model_layers: int,
    pruning: Pruning,
    limits: GraphLimits,
    labels: dict[tuple[int, int], str] | None = None,
    extra: dict | None = None,
) -> GraphDocument:
    """The pruned graph as a document. ``labels`` maps (layer, feature) to the store's label;
    ``extra`` joins ``metadata.saescope`` (timings, limits)."""
    labels = labels or {}
    influence = pruned.influence.tolist()
    nodes: dict[int, Node] = {}
    for i in pruned.nodes.nonzero()[:, 0].tolist():
        nodes[i] = _node(graph, i, influence[i], labels, n_model_layers)
    dst, src = pruned.edges.nonzero(as_tuple=True)
    weights = graph.adjacency[dst, src].tolist()
    links = [
        Link(source=nodes[s].node_id, target=nodes[d].node_id, weight=_round(w))
        for s, d, w in zip(src.tolist(), dst.tolist(), weights, strict=True)
    ]
    target = graph.target
    contrast = graph.contrast
    metadata = Metadata(
        slug=slug,
        scan=release,
        transcoder_list=sae_names,
        prompt_tokens=[_token(t.text) for t in graph.tokens],
        prompt=prompt,
        node_threshold=pruning.node_share,
        schema_version=SCHEMA_VERSION,
        info={
            "creator_name": "saescope",
            "generator": {"name": "saescope", "kind": "residual SAEs"},
        },
        generation_settings={
            "max_feature_nodes": limits.max_features,
            "batch_size": limits.batch_size,
        },
        pruning_settings={
            "node_threshold": pruning.node_share,
            "edge_threshold": pruning.edge_share,
        },
        saescope={
            "layers": graph.layers,
            "target": {
                "token_id": target.token_id,
                "text": target.text,
                "logit": _round(target.logit),
                "prob": _round(target.prob),
            },
            "contrast": None
            if contrast is None
            else {"token_id": contrast.token_id, "text": contrast.text},
            "metric": _round(graph.metric),
            "replacement_score": _round(pruned.replacement_score),
            "completeness": _round(pruned.completeness),
            "nodes_before": graph.n_nodes,
            "edges_before": int((graph.adjacency != 0).sum()),
            "nodes_after": len(nodes),
            "edges_after": len(links),
            "features_folded": graph.n_folded,
            **(extra or {}),
        },
    )
    return GraphDocument(
        metadata=metadata, qParams=QParams(), nodes=list(nodes.values()), links=links
    )


def _node(graph: Graph, i: int, influence: float, labels, n_model_layers: int) -> Node:
    if i < graph.n_features:
        slot, pos, feature = graph.features[i].tolist()
        layer = graph.layers[slot]
        return Node(
            node_id=f"{layer}_{feature}_{pos}",
            feature=feature,
            layer=str(layer),
            ctx_idx=pos,
            feature_type=FEATURE,
            jsNodeId=f"{layer}_{feature}-0",
            clerp=labels.get((layer, feature)) or "",
            influence=_round(influence),
            activation=_round(float(graph.activations[i])),
        )
    if i < graph.embedding_start:
        slot, pos = graph.errors[i - graph.error_start].tolist()
        layer = graph.layers[slot]
        return Node(
            node_id=f"err_{layer}_{pos}",
            feature=-1,
            layer=str(layer),
            ctx_idx=pos,
            feature_type=ERROR,
            jsNodeId=f"err_{layer}_{pos}-0",
            clerp=f"SAE error at layer {layer}",
            influence=_round(influence),
        )
    if i < graph.target_index:
        pos = i - graph.embedding_start
        token = graph.tokens[pos]
        return Node(
            node_id=f"E_{token.token_id}_{pos}",
            feature=pos,
            layer="E",
            ctx_idx=pos,
            feature_type=EMBEDDING,
            jsNodeId=f"E_{token.token_id}-{pos}",
            clerp=f"Embedding {_token(token.text)!r}",
            influence=_round(influence),
        )
    target, contrast = graph.target, graph.contrast
    clerp = f'Output "{_token(target.text)}" (p={target.prob:.3f})'
    if contrast is not None:
        clerp = f'Output "{_token(target.text)}" − "{_token(contrast.text)}"'
    return Node(
        node_id=f"{n_model_layers}_{target.token_id}_{graph.position}",
        feature=target.token_id,
        layer=str(n_model_layers),
        ctx_idx=graph.position,
        feature_type=LOGIT,
        token_prob=_round(target.prob),
        is_target_logit=True,
        jsNodeId=f"L_{target.token_id}-{graph.position}",
        clerp=clerp,
        activation=_round(graph.metric),
    )
