"""What an attribution graph is asked with, and its error: plain data, no torch, so the web side
and the command line read them without loading a model (``sae_core.live.graph`` computes)."""

from __future__ import annotations

from dataclasses import dataclass

from sae_core.errors import SaescopeError


class GraphError(SaescopeError):
    """An attribution graph that cannot be built as asked (model family, layers, target ...)."""


@dataclass(frozen=True)
class GraphLimits:
    # Feature nodes before pruning. Neuronpedia's graphs keep a few thousand; 1,000 keeps the
    # dense adjacency small (~5 MB) and a 32-token graph of SmolLM2-135M under a minute of CPU.
    # Features past it (least |activation × gradient| first) fold into error nodes.
    max_features: int = 1000
    # Target nodes per backward pass: 64 copies of a 64-token prompt through a stretch of blocks
    # fit in a few hundred MB and amortise the per-pass overhead.
    batch_size: int = 64


@dataclass(frozen=True)
class Pruning:
    node_share: float = 0.8  # circuit-tracer's and Neuronpedia's default node threshold
    edge_share: float = 0.98  # ... and edge threshold


DEFAULT_LIMITS = GraphLimits()
DEFAULT_PRUNING = Pruning()
