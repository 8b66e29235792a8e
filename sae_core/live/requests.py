"""What a live operation asks for: one frozen dataclass per operation, plain data like the results
(``sae_core.live.results``), so the web side builds one, the live model process receives it as is
(pickled over its socket, ``app.live.remote``) and runs it by its type (``app.live.host``).

Each names its SAE; its other fields are the operation's parameters, after the server's limits.
Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from sae_core.live.results import Generation, SteerFeature


@dataclass(frozen=True)
class ActivationsOp:
    """Which features fire on a prompt (``sae_core.live.probe.activations``)."""

    sae: str
    text: str
    per_token: int  # strongest features listed per token
    top: int  # features in the ranking


@dataclass(frozen=True)
class FeatureOnTextOp:
    """One feature's activation at every token of a text (``probe.feature_activations``)."""

    sae: str
    index: int
    text: str


@dataclass(frozen=True)
class AttributionOp:
    """Attribute logit(token) [- logit(contrast)] at ``position`` to features and positions
    (``sae_core.live.attribution``). Each token is given as text or as an id, not both; None
    means the default (the last position, the model's top prediction, no contrast)."""

    sae: str
    text: str
    position: int | None
    token: str | None
    token_id: int | None
    contrast: str | None
    contrast_id: int | None
    top: int  # rows in each ranking


@dataclass(frozen=True)
class SteerOp:
    """Continue the prompt with and without steering (``sae_core.live.steering``)."""

    sae: str
    text: str
    chat: bool  # wrap the prompt in the model's chat template
    features: tuple[SteerFeature, ...]
    mode: str  # "add" | "clamp"
    generation: Generation


@dataclass(frozen=True)
class ReleaseActivationsOp:
    """Which features of each of several SAEs fire on a prompt, from one forward pass to the
    deepest of their layers (``probe.release_activations``): the SAEs of one release, named by
    the web side, which reads the release from the store."""

    release: str  # for messages
    saes: tuple[str, ...]
    text: str
    per_token: int  # strongest features listed per token, in each SAE
    top: int  # features in each SAE's ranking


LiveOp = ActivationsOp | FeatureOnTextOp | AttributionOp | SteerOp | ReleaseActivationsOp


@dataclass(frozen=True)
class GraphSubmitOp:
    """Start an attribution graph of ``prompt`` over the release's SAEs, as a background job
    (``sae_core.live.graph``); answers the job's status. A target or contrast of None means the
    model's top prediction and no contrast."""

    release: str
    prompt: str
    target: str | None
    contrast: str | None
    node_share: float  # share of the target's influence the kept nodes carry
    edge_share: float  # share of edge influence the kept edges carry


@dataclass(frozen=True)
class GraphJobOp:
    """The status of a graph job of the release."""

    release: str
    job_id: str


@dataclass(frozen=True)
class GraphImportOp:
    """Save a graph document (circuit-tracer / Neuronpedia JSON) under the release."""

    release: str
    text: str


GraphOp = GraphSubmitOp | GraphJobOp | GraphImportOp
