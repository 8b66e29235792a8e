"""Pruning an attribution graph by influence through the whole graph, and its two scores.

Influence follows Anthropic's circuit-tracing methods paper: normalise every node's incoming
edges to shares, ``Â[t, s] = |A[t, s]| / Σ_s' |A[t, s']|``, and a node's influence on the target
is the sum over every path to it of the product of the shares, ``w (Â + Â² + …)`` with ``w`` one
at the target. The graph is acyclic (edges run from one SAE layer to the next), so the series
ends after as many terms as the graph has layers.

- Nodes: the most influential features and error nodes that together carry ``node_share`` of the
  total influence stay, with every embedding and the target.
- Edges: among the nodes kept, an edge's score is its share times the influence of the node it
  feeds (plus one for the target); the highest-scoring edges carrying ``edge_share`` stay. Then
  features and error nodes left without a kept edge out, and features without one in, go.
- Replacement score: of the influence that reaches the target from the graph's sources, the
  share that starts at the embeddings rather than at error nodes (1.0: the SAEs explain
  everything).
- Completeness: the influence-weighted share of every receiving node's input that comes from
  non-error nodes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from sae_core.live.graph import Graph
from sae_core.live.graph_settings import DEFAULT_PRUNING, Pruning


class PrunedGraph(NamedTuple):
    nodes: torch.Tensor  # (n_nodes,) bool: kept
    edges: torch.Tensor  # (n_nodes, n_nodes) bool, [to, from]: kept
    influence: torch.Tensor  # (n_nodes,) each node's influence on the target in the whole graph
    by_influence: torch.Tensor  # (n_nodes,) bool: the nodes the influence threshold kept
    replacement_score: float
    completeness: float


def normalised(adjacency: torch.Tensor) -> torch.Tensor:
    """|A| with each row (a node's inputs) scaled to sum to one; rows of sources stay zero."""
    weights = adjacency.abs().double()
    return weights / weights.sum(dim=1, keepdim=True).clamp(min=1e-30)


def influence(shares: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """``start (S + S² + …)`` for an acyclic share matrix S (n, n)."""
    total = torch.zeros_like(start)
    current = start
    for _ in range(len(start)):
        current = current @ shares
        if not current.any():
            return total
        total += current
    raise ValueError("the graph has a cycle")  # pragma: no cover: edges only go forward


def share_threshold(scores: torch.Tensor, share: float) -> float:
    """The smallest score among the top scores that together make ``share`` of the total."""
    ordered = scores.flatten().sort(descending=True).values
    total = ordered.sum()
    if total <= 0:
        return float("inf")
    cumulative = ordered.cumsum(0) / total
    index = min(
        int(torch.searchsorted(cumulative, torch.tensor(share, dtype=cumulative.dtype))),
        len(ordered) - 1,
    )
    return float(ordered[index])


def prune(graph: Graph, pruning: Pruning = DEFAULT_PRUNING) -> PrunedGraph:
    n = graph.n_nodes
    target = graph.target_index
    sources = torch.zeros(n, dtype=torch.bool)  # embeddings and the target are always kept
    sources[graph.embedding_start :] = True
    start = torch.zeros(n, dtype=torch.float64)
    start[target] = 1.0
    shares = normalised(graph.adjacency)
    node_influence = influence(shares, start)

    prunable = ~sources
    threshold = share_threshold(node_influence[prunable], pruning.node_share)
    by_influence = sources | (prunable & (node_influence >= threshold))

    kept_adjacency = graph.adjacency * by_influence[:, None] * by_influence[None, :]
    kept_shares = normalised(kept_adjacency)
    scores = kept_shares * (influence(kept_shares, start) + start)[:, None]
    edges = scores >= share_threshold(scores[scores > 0], pruning.edge_share)
    edges &= scores > 0

    nodes = by_influence.clone()
    features = torch.zeros(n, dtype=torch.bool)
    features[: graph.n_features] = True
    while True:
        edges &= nodes[:, None] & nodes[None, :]
        alive = sources | (edges.any(dim=0) & (~features | edges.any(dim=1)))
        if torch.equal(alive & nodes, nodes):
            break
        nodes &= alive
    replacement, completeness = scores_of(graph, shares, node_influence, start)
    return PrunedGraph(nodes, edges, node_influence, by_influence, replacement, completeness)


def scores_of(
    graph: Graph, shares: torch.Tensor, node_influence: torch.Tensor, start: torch.Tensor
) -> tuple[float, float]:
    """(replacement score, completeness) of the unpruned graph."""
    errors = slice(graph.error_start, graph.embedding_start)
    embeddings = slice(graph.embedding_start, graph.target_index)
    from_errors = float(node_influence[errors].sum())
    from_embeddings = float(node_influence[embeddings].sum())
    replacement = from_embeddings / max(from_errors + from_embeddings, 1e-30)
    receivers = torch.zeros(graph.n_nodes, dtype=torch.bool)
    receivers[: graph.n_features] = True
    receivers[graph.target_index] = True
    weight = (node_influence + start)[receivers]
    clean = 1.0 - shares[receivers][:, errors].sum(dim=1)
    completeness = float((clean * weight).sum() / weight.sum().clamp(min=1e-30))
    return replacement, completeness
