"""What live operations return: plain data (numbers, strings, lists, named tuples), with no
tensors, so a result pickles from the live model process to a web worker, and unpickling it
there imports no torch. ``sae_core.live.probe``, ``sae_core.live.attribution`` and ``sae_core.live.steering``
compute them and re-export their names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

# ---------------------------------------------------------------------------------------------
# Prompts and what fires (sae_core.live.probe)


class PromptToken(NamedTuple):
    position: int
    token_id: int
    text: str  # the token decoded alone, as the store's vocab renders it
    special: bool  # BOS / chat markers: shown, never ranked


class FeatureValue(NamedTuple):
    feature: int
    value: float


class RankedFeature(NamedTuple):
    feature: int
    max_value: float  # max over the prompt's non-special tokens
    max_position: int
    values: list[float]  # (seq,) activation at every token, 0 at special tokens


@dataclass
class PromptActivations:
    tokens: list[PromptToken]
    # per position, strongest first; empty at special tokens
    top_per_token: list[list[FeatureValue]]
    ranked: list[RankedFeature]  # features that fire anywhere, by max activation, strongest first


@dataclass
class SaeActivations:
    """One SAE's part of ``ReleaseActivations``: what ``PromptActivations`` says, for its layer."""

    sae: str
    layer: int
    top_per_token: list[list[FeatureValue]]
    ranked: list[RankedFeature]


@dataclass
class ReleaseActivations:
    tokens: list[PromptToken]
    saes: list[SaeActivations]  # in the order asked


@dataclass
class FeatureOnText:
    feature: int
    tokens: list[PromptToken]
    values: list[float]  # (seq,)
    max_value: float
    max_position: int


# ---------------------------------------------------------------------------------------------
# Attribution (sae_core.live.attribution)


class Prediction(NamedTuple):
    token_id: int
    text: str
    logit: float
    prob: float


class AttributionEntry(NamedTuple):
    feature: int
    position: int
    activation: float
    attribution: float  # a_i · (d_i · ∇_x metric) at this position
    dla: float  # direct logit attribution; 0 away from the target position (no direct path there)


class FeatureAttribution(NamedTuple):
    feature: int
    attribution: float  # summed over positions
    dla: float  # at the target position
    top_position: int  # where |attribution| is largest
    values: list[float]  # (seq,) attribution at each position


@dataclass
class Attribution:
    tokens: list[PromptToken]
    position: int  # where the target prediction is made
    token: Prediction  # the target token there
    contrast: Prediction | None
    metric: float  # logit(token) [- logit(contrast)]
    predictions: list[Prediction]  # the model's top next tokens at ``position``
    entries: list[AttributionEntry]  # top (feature, position) pairs by |attribution|
    features: list[FeatureAttribution]  # top features by |attribution summed over positions|
    total: float  # Σ attribution over all features and positions: first-order metric change
    #               when every feature is removed, negated
    error: float  # Σ_t err_t · ∇_x metric over non-special positions: what the SAE error carries


# ---------------------------------------------------------------------------------------------
# Steering (sae_core.live.steering)


class SteerFeature(NamedTuple):
    feature: int
    strength: float  # "add": multiple of W_dec[i] added; "clamp": the value f_i is held at


@dataclass(frozen=True)
class Generation:
    max_new_tokens: int = 32  # enough to see a continuation change topic; ~1 s on a CPU for 135M
    temperature: float = 0.7  # 0 is greedy; 0.7 keeps text varied yet on-topic for small models
    seed: int = 0  # the default and the steered continuation draw from the same seed


class Continuation(NamedTuple):
    token_ids: list[int]
    text: str


@dataclass
class Steering:
    prompt_text: str  # what the model saw, special tokens and chat template included
    mode: str
    features: list[SteerFeature]
    generation: Generation
    default: Continuation
    steered: Continuation
