"""An attribution graph document laid out for the graph page's server-rendered SVG.

x is the token position (the tokens are written below), y the layer: embeddings at the bottom,
SAE layers upwards, the output on top. The nodes of one (position, layer) cell sit side by side,
most influential first, wrapping inside their column. A node's radius grows with its influence;
an edge's width with |weight| and its colour with its sign. The view's pinned nodes and groups
come from the URL (``pin=ID``, ``group=NAME:ID,ID``), so a view can be shared; the same
parameters on the JSON export put them into its ``qParams``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from urllib.parse import urlencode

from sae_core.live.graph_json import EMBEDDING, ERROR, FEATURE, LOGIT, GraphDocument

COLUMN = 84  # px per token position: five nodes side by side
NODE_GAP = 15  # px between node centres in a cell
LABEL_SPACE = 70  # px left of the plot for layer names
TOKEN_SPACE = 64  # px below the plot for the prompt's tokens
ROW_PAD = 22  # px between layers
POSITIVE = "#2b6cb0"
NEGATIVE = "#c53030"


@dataclass(frozen=True)
class NodeView:
    id: str
    kind: str  # "feature" | "error" | "embedding" | "logit"
    layer: str
    position: int
    feature: int | None
    label: str
    activation: float | None
    influence: float | None
    x: float
    y: float
    r: float
    pinned: bool
    group: str | None  # the group it belongs to, if any


@dataclass(frozen=True)
class EdgeView:
    source: str
    target: str
    weight: float
    x1: float
    y1: float
    x2: float
    y2: float
    width: float
    colour: str


@dataclass
class GraphView:
    slug: str
    release: str
    prompt: str
    tokens: list[tuple[float, str]]  # (x, text) of each prompt token
    rows: list[tuple[float, str]]  # (y, layer name)
    nodes: list[NodeView]
    edges: list[EdgeView]
    width: int
    height: int
    pinned: list[str]
    groups: list[tuple[str, list[str]]]
    scores: dict = field(default_factory=dict)  # metadata.saescope: target, scores, sizes

    def query(self, *, pinned: list[str] | None = None, groups=None) -> str:
        """The URL query string of this view (with ``pinned`` / ``groups`` replaced)."""
        pinned = self.pinned if pinned is None else pinned
        groups = self.groups if groups is None else groups
        params = [("pin", p) for p in pinned] + [
            ("group", f"{n}:{','.join(ids)}") for n, ids in groups
        ]
        return urlencode(params)


_KINDS = {FEATURE: "feature", ERROR: "error", EMBEDDING: "embedding", LOGIT: "logit"}


def parse_groups(values: list[str]) -> list[tuple[str, list[str]]]:
    """``NAME:ID,ID`` -> (name, ids); node ids never hold ':' so the last one splits."""
    groups = []
    for value in values:
        name, _, ids = value.rpartition(":")
        members = [i for i in ids.split(",") if i]
        if name.strip() and members:
            groups.append((name.strip(), members))
    return groups


def _layer_key(layer: str) -> tuple[int, int]:
    if layer == "E":
        return (0, 0)
    return (1, int(layer)) if layer.lstrip("-").isdigit() else (2, 0)


def layout(document: GraphDocument, slug: str, *, pinned: list[str], groups) -> GraphView:
    meta = document.metadata
    ids = {n.node_id for n in document.nodes}
    pinned = [p for p in pinned if p in ids]
    groups = [(name, [i for i in members if i in ids]) for name, members in groups]
    groups = [(name, members) for name, members in groups if members]
    group_of = {i: name for name, members in groups for i in members}
    n_positions = max([len(meta.prompt_tokens)] + [n.ctx_idx + 1 for n in document.nodes])
    cells: dict[tuple[str, int], list] = {}
    for node in document.nodes:
        cells.setdefault((node.layer, node.ctx_idx), []).append(node)
    per_row = max(1, (COLUMN - 8) // NODE_GAP)
    layers = sorted({n.layer for n in document.nodes}, key=_layer_key)
    heights = {
        layer: max(math.ceil(len(c) / per_row) for (ly, _), c in cells.items() if ly == layer)
        for layer in layers
    }
    outputs = {n.layer for n in document.nodes if n.feature_type == LOGIT}
    rows, y_of, y = [], {}, ROW_PAD
    for layer in reversed(layers):  # the output on top
        y_of[layer] = y
        name = "output" if layer in outputs else "embed" if layer == "E" else f"L{layer}"
        rows.append((y + (heights[layer] - 1) * NODE_GAP / 2, name))
        y += heights[layer] * NODE_GAP + ROW_PAD
    plot_height = y
    max_influence = max([n.influence or 0.0 for n in document.nodes] + [1e-12])
    nodes: dict[str, NodeView] = {}
    for (layer, pos), members in cells.items():
        members.sort(key=lambda n: -(n.influence or 0.0))
        for k, node in enumerate(members):
            row, col = divmod(k, per_row)
            in_row = min(per_row, len(members) - row * per_row)
            x = LABEL_SPACE + pos * COLUMN + COLUMN / 2 + (col - (in_row - 1) / 2) * NODE_GAP
            kind = _KINDS.get(node.feature_type, "feature")
            influence = node.influence if kind not in ("logit",) else max_influence
            nodes[node.node_id] = NodeView(
                id=node.node_id,
                kind=kind,
                layer=node.layer,
                position=node.ctx_idx,
                feature=node.feature if kind == "feature" else None,
                label=node.clerp,
                activation=node.activation,
                influence=node.influence,
                x=round(x, 1),
                y=round(y_of[layer] + row * NODE_GAP, 1),
                r=round(2.5 + 4.5 * math.sqrt(max(influence or 0.0, 0.0) / max_influence), 1),
                pinned=node.node_id in pinned,
                group=group_of.get(node.node_id),
            )
    max_weight = max([abs(link.weight) for link in document.links] + [1e-12])
    edges = [
        EdgeView(
            source=link.source,
            target=link.target,
            weight=link.weight,
            x1=nodes[link.source].x,
            y1=nodes[link.source].y,
            x2=nodes[link.target].x,
            y2=nodes[link.target].y,
            width=round(0.4 + 3.0 * abs(link.weight) / max_weight, 2),
            colour=POSITIVE if link.weight >= 0 else NEGATIVE,
        )
        for link in sorted(document.links, key=lambda link: abs(link.weight))  # strong on top
    ]
    tokens = [(LABEL_SPACE + p * COLUMN + COLUMN / 2, t) for p, t in enumerate(meta.prompt_tokens)]
    return GraphView(
        slug=slug,
        release=meta.scan,
        prompt=meta.prompt,
        tokens=tokens,
        rows=rows,
        nodes=list(nodes.values()),
        edges=edges,
        width=LABEL_SPACE + n_positions * COLUMN + 10,
        height=int(plot_height + TOKEN_SPACE),
        pinned=pinned,
        groups=groups,
        scores=meta.saescope or {},
    )


def with_view(document: GraphDocument, view: GraphView) -> GraphDocument:
    """The document with the view's pinned nodes and groups in its ``qParams`` (the export)."""
    params = document.qParams.model_copy(
        update={"pinnedIds": view.pinned, "supernodes": [[name, *ids] for name, ids in view.groups]}
    )
    return document.model_copy(update={"qParams": params})
