"""Pydantic models of the live endpoints: what a request asks and what pages and ``/api/v1`` get.

Requests arrive as JSON (API) or as form fields (the page's htmx forms); one model serves both.
JSON is validated strictly, as the OpenAPI document types it (no "5" for 5, no 0 for false); a
form's fields are all text, so ``app.routes.live.form_of`` converts them (``strict=False``).
Field descriptions say how each number is computed; the page shows them as hints.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from app.params import StoreInt

# A prompt's characters, bounded before tokenising; the token limit is the setting
# max_prompt_tokens. 20,000 characters is far above any token limit a CPU server would set.
PromptText = Annotated[str, Field(min_length=1, max_length=20_000, description="The prompt.")]


def _blank_to_none(value):
    """HTML forms send empty fields as ''; they mean 'not given'."""
    return None if isinstance(value, str) and not value.strip() else value


OptionalInt = Annotated[StoreInt | None, BeforeValidator(_blank_to_none)]
OptionalText = Annotated[str | None, BeforeValidator(_blank_to_none)]


# ---------------------------------------------------------------------------------------------
# Requests


class PromptRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    text: PromptText
    # Five per token fit one table cell and cover a TopK SAE's strongest latents.
    per_token: StoreInt = Field(
        default=5, ge=1, le=50, description="Strongest features listed per token."
    )
    # Fifty fill a screen; the JSON can ask for more.
    top: StoreInt = Field(default=50, ge=1, le=1000, description="Features in the ranking.")


class FeatureTextRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    text: PromptText


class AttributionRequest(BaseModel):
    """The target: logit(token) at ``position`` (minus logit(contrast) when one is given)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    text: PromptText
    position: OptionalInt = Field(
        default=None,
        ge=0,
        description="Token position whose next-token prediction is the target (default: the last).",
    )
    token: OptionalText = Field(
        default=None,
        max_length=100,
        description="Target token as text, exactly one token, e.g. ' Paris'.",
    )
    token_id: OptionalInt = Field(
        default=None,
        ge=0,
        description="Target token id (instead of token). Default: the model's top prediction.",
    )
    contrast: OptionalText = Field(
        default=None,
        max_length=100,
        description="Second token as text: the target becomes logit(token) − logit(contrast).",
    )
    contrast_id: OptionalInt = Field(
        default=None, ge=0, description="Second token id (instead of contrast)."
    )
    # Thirty rows show the handful that matter and the tail that does not.
    top: StoreInt = Field(default=30, ge=1, le=1000, description="Rows in each ranking.")

    @model_validator(mode="after")
    def _one_spelling_each(self):
        for text_field, id_field in (("token", "token_id"), ("contrast", "contrast_id")):
            if getattr(self, text_field) is not None and getattr(self, id_field) is not None:
                raise ValueError(f"give {text_field} or {id_field}, not both")
        return self


class SteerFeaturePublic(BaseModel):
    model_config = ConfigDict(strict=True)

    index: StoreInt = Field(description="Feature to steer.")
    strength: float = Field(
        ge=-1e4,
        le=1e4,
        description="add: multiple of the decoder direction added; clamp: the value the feature is held at.",
    )


def _parse_features(value):
    """The page's form types features as "12:8, 40:-4"; JSON sends a list of objects."""
    if not isinstance(value, str):
        return value
    features = []
    for item in filter(None, (part.strip() for part in value.split(","))):
        index, sep, strength = item.partition(":")
        try:
            features.append({"index": int(index), "strength": float(strength)})
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"{item!r} is not index:strength, e.g. 12:8")
    return features


class SteerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    text: PromptText
    features: Annotated[list[SteerFeaturePublic], BeforeValidator(_parse_features)] = Field(
        min_length=1,
        max_length=32,
        description='Features with strengths; a form may type them as "12:8, 40:-4".',
    )
    mode: Literal["add", "clamp"] = Field(
        default="add",
        description="add: s · W_dec[i] added to the residual at layer L at every non-special position. "
        "clamp: f_i held at s there, decoded with the SAE error term kept.",
    )
    # Defaults match sae_core.live.steering.Generation: 32 tokens show a change of topic within a
    # second or two on a CPU; the server caps the count at its max_new_tokens setting.
    max_new_tokens: StoreInt = Field(
        default=32, ge=1, description="Tokens to generate (capped by the server)."
    )
    temperature: float = Field(default=0.7, ge=0, le=5, description="0 is greedy decoding.")
    seed: StoreInt = Field(default=0, description="Both continuations sample with this seed.")
    apply_chat_template: bool = Field(
        default=False,
        description="Wrap the prompt as a user turn of the model's chat template (instruct models).",
    )


# ---------------------------------------------------------------------------------------------
# Responses


class PromptTokenPublic(BaseModel):
    position: int
    token_id: int
    text: str
    special: bool = Field(description="BOS or another special token: shown, never ranked.")


class PromptTokenValuePublic(BaseModel):
    """One token with one number (the heatmap partial reads text and value)."""

    text: str
    value: float


class FeatureValuePublic(BaseModel):
    index: int
    value: float
    label: str | None


class RankedFeaturePublic(BaseModel):
    index: int
    label: str | None
    max_value: float = Field(description="Largest activation over the prompt's non-special tokens.")
    max_position: int
    values: list[float] = Field(description="Activation at every token (0 at special tokens).")


class PromptActivationsPublic(BaseModel):
    sae: str
    tokens: list[PromptTokenPublic]
    top_per_token: list[list[FeatureValuePublic]] = Field(
        description="Per token, its strongest features, strongest first (empty at special tokens)."
    )
    ranked: list[RankedFeaturePublic] = Field(
        description="Features that fire, by max activation over the prompt."
    )


class SaeActivationsPublic(BaseModel):
    """What fires in one SAE of a release, on the release's shared prompt tokens."""

    sae: str
    layer: int = Field(description="The residual stream after this block is what the SAE reads.")
    d_sae: int
    top_per_token: list[list[FeatureValuePublic]] = Field(
        description="Per token, this SAE's strongest features, strongest first "
        "(empty at special tokens)."
    )
    ranked: list[RankedFeaturePublic] = Field(
        description="This SAE's features that fire, by max activation over the prompt."
    )


class ReleaseActivationsPublic(BaseModel):
    release: str
    tokens: list[PromptTokenPublic]
    saes: list[SaeActivationsPublic] = Field(
        description="Every SAE of the release, by layer, then width, then name; all from one "
        "forward pass to the deepest layer."
    )


class FeatureOnTextPublic(BaseModel):
    sae: str
    index: int
    label: str | None
    tokens: list[PromptTokenValuePublic] = Field(
        description="The prompt's tokens with the feature's activation."
    )
    max_value: float
    max_position: int
    corpus_max: float | None = Field(
        description="The feature's max activation over the precompute corpus."
    )


class PredictionPublic(BaseModel):
    token_id: int
    text: str
    logit: float
    prob: float = Field(description="Softmax probability at the target position.")


class AttributionEntryPublic(BaseModel):
    index: int
    label: str | None
    position: int
    activation: float
    attribution: float = Field(
        description="a_i · (d_i · ∇_x metric) at this position, SAE error term kept."
    )
    dla: float = Field(
        description="Direct logit attribution (only at the target position; 0 elsewhere)."
    )


class FeatureAttributionPublic(BaseModel):
    index: int
    label: str | None
    attribution: float = Field(description="Activation × gradient summed over positions.")
    dla: float = Field(
        description="Direct logit attribution at the target position: a_i · (c(W_dec[i]) ⊙ γ) · u / σ, "
        "the final norm linearised with its scale σ frozen."
    )
    top_position: int = Field(description="Position where |attribution| is largest.")
    values: list[float] = Field(description="Attribution at every position.")


class AttributionPublic(BaseModel):
    sae: str
    tokens: list[PromptTokenPublic]
    position: int = Field(description="Position whose next-token prediction is explained.")
    target: PredictionPublic
    contrast: PredictionPublic | None
    metric: float = Field(description="logit(target) [− logit(contrast)] at the position.")
    predictions: list[PredictionPublic] = Field(
        description="The model's top next tokens at the position."
    )
    entries: list[AttributionEntryPublic] = Field(
        description="(feature, position) pairs by |attribution|."
    )
    features: list[FeatureAttributionPublic] = Field(
        description="Features by |attribution summed over positions|."
    )
    total: float = Field(
        description="Σ attribution over every feature and position: minus the first-order change of the "
        "metric if every feature were removed."
    )
    error: float = Field(
        description="Σ over non-special positions of (x − x̂) · ∇_x metric: what the SAE error carries."
    )


class ContinuationPublic(BaseModel):
    token_ids: list[int]
    text: str


class SteeringPublic(BaseModel):
    sae: str
    prompt_text: str = Field(
        description="The prompt as the model saw it (special tokens, chat template)."
    )
    mode: Literal["add", "clamp"]
    features: list[SteerFeaturePublic]
    max_new_tokens: int = Field(description="Tokens generated at most, after the server's cap.")
    temperature: float
    seed: int
    default: ContinuationPublic
    steered: ContinuationPublic
