"""Pydantic models of what the browser and the API return, named by role.

``*Public`` models are read by pages and returned by ``/api/v1`` alike; their field names are the
API's stable names. ``FeatureSearch`` is the one input model: the search query parameters.
Field descriptions say how each number was measured; pages show them as hints.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from app.params import StoreInt


class HistogramPublic(BaseModel):
    edges: list[float] = Field(description="Bin edges, one more than counts.")
    counts: list[int] = Field(description="Number of values in each bin.")


class MetricsPublic(BaseModel):
    """One column of an SAE's report card: every metric on one token set."""

    corpus: str = Field(description="Corpus spec the tokens come from.")
    role: str = Field(
        description="'held out' (contexts of the training corpus training never read), 'last contexts' "
        "(no training split recorded) or 'other corpus'."
    )
    note: str = Field(description="What to know about these tokens, e.g. an overlap with the training corpus.")
    n_tokens: int = Field(description="Non-special tokens: EV and L0 are measured over these.")
    n_predictions: int = Field(description="Next-token predictions: the CE numbers are measured over these.")
    delta_ce: float = Field(description="CE with the SAE spliced in minus clean CE, nats per prediction.")
    kl_div: float = Field(
        description="Mean KL(p_clean ‖ p_SAE) per non-special position, the last one included (SAELens' definition)."
    )
    ce_loss_recovered: float = Field(description="(CE_zero − CE_SAE) / (CE_zero − CE_clean), zero ablation.")
    ce_loss_recovered_mean_ablation: float = Field(
        description="(CE_mean − CE_SAE) / (CE_mean − CE_clean), mean ablation: a harder bar than zeroing."
    )
    explained_variance: float = Field(description="1 − Σ‖x − x̂‖² / Σ‖x − mean(x)‖² over all tokens.")
    explained_variance_without_massive: float = Field(
        description="The same without the massive-activation tokens (norm over 10× the median)."
    )
    n_massive_tokens: int = Field(description="Massive-activation tokens left out of the second EV.")
    l0: float = Field(description="Mean number of active latents per token.")


class NestedSaePublic(BaseModel):
    name: str = Field(description="URL id of the SAE.")
    d_sae: int = Field(description="Its latents: the dictionary's first d_sae.")


class MatryoshkaPublic(BaseModel):
    """Where an SAE sits in a Matryoshka dictionary: one dictionary trained so that its first m
    latents, for each of its prefixes m, reconstruct on their own. Precompute stores each prefix
    as an SAE of its own, so latent i is the same latent (the same weights and activations) in
    every SAE of the dictionary that holds it."""

    dictionary_width: int = Field(description="Latents of the whole dictionary.")
    prefix: int = Field(
        description="This SAE's latents: the dictionary's first `prefix` (the dictionary itself when it equals dictionary_width)."
    )
    saes: list[NestedSaePublic] = Field(
        default_factory=list,
        description="The dictionary's SAEs in the store (its prefixes and itself), by width; on the SAE's own page, empty in lists.",
    )


class SaePublic(BaseModel):
    name: str = Field(description="URL id of the SAE.")
    model: str = Field(description="Subject model the SAE reads.")
    layer: int = Field(description="Residual stream after this block (0-based).")
    hook_name: str = Field(description="Hook point in the subject model.")
    architecture: str = Field(
        description="SAE architecture (standard ReLU + L1, topk, batchtopk, jumprelu)."
    )
    release: str | None = Field(
        description="Release (the set of SAEs precomputed together) the SAE belongs to; see /api/v1/releases."
    )
    d_in: int = Field(description="Width of the residual stream the SAE reads.")
    d_sae: int = Field(description="Number of latents (features) in the SAE.")
    k: int | None = Field(description="Active latents per token of a TopK SAE.")
    l1_coeff: float | None = Field(description="Sparsity coefficient λ of an L1-penalised SAE.")
    status: str = Field(description="'complete' once precompute has finished, else 'running'.")
    train_tokens: int | None = Field(description="Tokens the SAE was trained on.")
    n_tokens: int = Field(
        description="Non-special corpus tokens the features were precomputed over; densities "
        "and the dead fraction are measured on them."
    )
    delta_ce: float | None = Field(
        description="Next-token cross-entropy with the SAE spliced in minus without it (nats), on held-out tokens."
    )
    kl_div: float | None = Field(
        description="Mean KL(p_clean ‖ p_SAE) per position with the SAE spliced in, on held-out tokens."
    )
    explained_variance: float | None = Field(
        description="1 − Σ‖x − x̂‖² / Σ‖x − mean(x)‖², both sums over every held-out token; flattered by "
        "a few massive-activation tokens (see report_card)."
    )
    l0: float | None = Field(description="Mean number of active latents per evaluation token.")
    ce_loss_recovered: float | None = Field(
        description="(CE zero-ablation − CE with the SAE spliced in) / (CE zero-ablation − CE clean); "
        "1 is a perfect reconstruction, 0 no better than zeroing the layer."
    )
    dead_fraction: float | None = Field(
        description="Share of features that never fired on the precompute tokens."
    )
    dense_fraction: float | None = Field(
        description="Share of features that fired on more than 10% of the precompute tokens."
    )
    metrics_how: dict[str, str] = Field(
        description="How each metric was measured, in metrics.json's own words."
    )
    report_card: list[MetricsPublic] = Field(
        description="The metrics on the held-out tokens of the training corpus and on a second corpus, side by side."
    )
    corpus: dict = Field(
        description="Corpus the features were precomputed on (spec, ctx_len, seed, contexts)."
    )
    density_hist: HistogramPublic | None = Field(
        description="Histogram of log10(density) over the features that fired."
    )
    label_f1_hist: HistogramPublic | None = Field(
        default=None,
        description="Histogram of the held-out F1 of the alive features' current labels "
        "(each label's rule scored as a classifier of where the feature fires); "
        "on the SAE's own page, absent from lists.",
    )
    matryoshka: MatryoshkaPublic | None = Field(
        default=None,
        description="Set when the SAE is a Matryoshka dictionary or one of its nested prefixes; its reconstruction "
        "metrics are then measured for the whole dictionary only (on the dictionary's own SAE).",
    )
    created_at: datetime


class SaesPublic(BaseModel):
    data: list[SaePublic]
    count: int


class ReleasePublic(BaseModel):
    """A set of SAEs on one model, precomputed together: a grid of layers by widths."""

    name: str = Field(description="URL id of the release.")
    model: str = Field(description="Subject model every SAE of the release reads.")
    layers: list[int] = Field(description="Layers its SAEs read, ascending: the rows of its grid.")
    widths: list[int] = Field(description="Widths (d_sae) of its SAEs, ascending: the columns of its grid.")
    saes: list[SaePublic] = Field(description="Its complete SAEs, by layer, then width.")
    created_at: datetime


class ReleasesPublic(BaseModel):
    data: list[ReleasePublic]
    count: int


class LabelPublic(BaseModel):
    text: str
    source: str | None = Field(description="auto | llm:<model> | human:<who>")
    precision: float | None = Field(
        description="Of the held-out tokens the label's rule predicts, the share where the feature fires."
    )
    recall: float | None = Field(
        description="Of the held-out tokens where the feature fires, the share the label's rule predicts."
    )
    f1: float | None = Field(
        description="Harmonic mean of precision and recall: the label's score."
    )


class TokensPublic(BaseModel):
    """A run of tokens with one activation each, as parallel lists (compact in JSON)."""

    tokens: list[str] = Field(description="Display text of each token.")
    token_ids: list[int]
    values: list[float] = Field(
        description="Feature activation on each token (0 where it did not fire)."
    )


class ExamplePublic(TokensPublic):
    context_id: int = Field(description="Row of the context in the precompute corpus.")
    kind: Literal["top", "interval"]
    bin: int = Field(description="Interval bin of an interval sample; 0 for top examples.")
    rank: int
    max_act: float
    max_pos: int = Field(description="Position of the example's largest activation.")


class ExamplesPublic(BaseModel):
    data: list[ExamplePublic]
    count: int


class IntervalPublic(BaseModel):
    bin: int
    lo: float = Field(description="Lowest activation of the bin.")
    hi: float = Field(description="Highest activation of the bin.")
    share: float = Field(
        description="Share of the feature's nonzero activations that fall in this bin."
    )
    count: int = Field(description="Nonzero activations that fall in this bin.")
    n_examples: int = Field(description="Samples stored for this bin (examples may hold fewer).")
    examples: list[ExamplePublic]


class TokenValuePublic(BaseModel):
    token_id: int
    text: str
    value: float


class NeighbourPublic(BaseModel):
    index: int
    score: float = Field(description="Decoder cosine similarity, or co-activation score.")
    label: str | None
    density: float | None
    snippet: TokensPublic | None = Field(
        description="Tokens around the neighbour's strongest activation, for a mini heatmap."
    )
    snippet_max: float = Field(
        description="The neighbour's max activation, which shades the snippet."
    )
    label_f1: float | None = Field(
        default=None, description="F1 of the label on held-out tokens (see LabelPublic)."
    )


class FamilyLinkPublic(BaseModel):
    """A feature of another SAE of the release on the same hook, near this one."""

    sae: str = Field(description="The other SAE.")
    d_sae: int = Field(description="Its width.")
    cosine: float = Field(description="Cosine of the two decoder directions.")
    jaccard: float = Field(
        description="Precompute tokens where both fire / tokens where either fires: "
        "n_both / (n_self + n_other - n_both)."
    )
    n_both: int = Field(description="Precompute tokens where both fire.")
    n_self: int = Field(description="Tokens where this feature fires.")
    n_other: int = Field(description="Tokens where the other feature fires.")
    same_latent: bool = Field(
        default=False,
        description="The other SAE is a nested prefix of the same Matryoshka dictionary (or the dictionary "
        "itself) and this is the same latent there: the same weights, so cosine and Jaccard are 1.",
    )
    feature: NeighbourPublic = Field(description="The other feature (score: the cosine).")


class FamilyPublic(BaseModel):
    """A feature's parents and children: its nearest features in the smaller and larger SAEs of
    its release on the same hook (top 5 by decoder cosine and top 5 by co-firing per SAE)."""

    release: str
    parents: list[FamilyLinkPublic] = Field(description="In smaller SAEs; by width, then cosine.")
    children: list[FamilyLinkPublic] = Field(description="In larger SAEs; by width, then cosine.")
    peers: list[FamilyLinkPublic] = Field(description="In other SAEs of the same width.")


class FeatureSummaryPublic(BaseModel):
    """One row of a feature list or search result."""

    index: int
    count: int = Field(description="Precompute tokens where the feature fired.")
    density: float = Field(description="count / precompute tokens.")
    max_act: float
    mean_act: float = Field(description="Mean activation over the tokens where it fired.")
    label: str | None
    label_source: str | None
    label_f1: float | None
    token_act: float | None = Field(
        default=None,
        description="With a token search: the feature's mean activation on the matched token.",
    )


class FeaturesPublic(BaseModel):
    data: list[FeatureSummaryPublic]
    count: int = Field(description="Features matching the search, before offset and limit.")


class FeaturePublic(BaseModel):
    sae: str
    index: int
    d_sae: int
    count: int = Field(description="Precompute tokens where the feature fired.")
    n_tokens: int = Field(description="Precompute tokens the density is measured over.")
    density: float = Field(description="count / n_tokens.")
    max_act: float
    mean_act: float = Field(description="Mean activation over the tokens where it fired.")
    label: LabelPublic | None
    act_hist: HistogramPublic | None = Field(description="Histogram of the nonzero activations.")
    logit_top: list[TokenValuePublic] = Field(
        description="Tokens whose logits the decoder direction raises most (W_dec[i] · W_U after the final norm's scale)."
    )
    logit_bottom: list[TokenValuePublic] = Field(description="Tokens whose logits it lowers most.")
    logit_hist: HistogramPublic | None = Field(
        description="Histogram of the logit effects over the vocabulary."
    )
    neighbours_cos: list[NeighbourPublic] = Field(description="Nearest features by decoder cosine.")
    neighbours_coact: list[NeighbourPublic] = Field(
        description="Features that fire on the same tokens."
    )
    top_examples: list[ExamplePublic]
    n_top_examples: int = Field(description="Top examples stored (top_examples may hold fewer).")
    intervals: list[IntervalPublic]
    prev_index: int | None
    next_index: int | None
    family: FamilyPublic | None = Field(
        default=None, description="Parents and children in the release; None without linked SAEs."
    )


class FeaturePreviewPublic(BaseModel):
    """A feature in brief: its summary and its strongest examples (the neighbour preview)."""

    sae: str
    feature: FeatureSummaryPublic
    examples: list[ExamplePublic]


def _blank_to_none(value):
    """HTML forms send empty fields as ''; they mean 'no filter'."""
    return None if isinstance(value, str) and not value.strip() else value


OptionalFloat = Annotated[float | None, BeforeValidator(_blank_to_none)]
OptionalBool = Annotated[bool | None, BeforeValidator(_blank_to_none)]
SortKey = Literal["relevance", "index", "density", "max_act", "label_score"]


class FeatureSearch(BaseModel):
    """Query parameters of a feature search; every field is optional and the filters combine."""

    model_config = ConfigDict(extra="ignore")

    q: Annotated[str | None, BeforeValidator(_blank_to_none)] = Field(
        default=None,
        max_length=200,
        description="Words of the label (full text, prefix on the last word).",
    )
    token: str | None = Field(
        default=None,
        max_length=100,
        description="Features that fire on this vocabulary token (exact text, or with a leading space).",
    )
    min_density: OptionalFloat = Field(default=None, ge=0, le=1)
    max_density: OptionalFloat = Field(default=None, ge=0, le=1)
    alive: OptionalBool = Field(default=None, description="true: fired at least once; false: dead.")
    min_max_act: OptionalFloat = None
    max_max_act: OptionalFloat = None
    sort: Annotated[SortKey | None, BeforeValidator(_blank_to_none)] = Field(
        default=None, description="Default: relevance when q or token is given, else index."
    )
    order: Annotated[Literal["asc", "desc"] | None, BeforeValidator(_blank_to_none)] = Field(
        default=None, description="Default: asc for index, desc for the others."
    )
    offset: StoreInt = 0
    # 50 rows fill a laptop screen twice; 500 bounds one response to a few hundred KB.
    limit: int = Field(default=50, ge=1, le=500)

    @model_validator(mode="after")
    def _ranges_are_ordered(self):
        for lo, hi in (("min_density", "max_density"), ("min_max_act", "max_max_act")):
            low, high = getattr(self, lo), getattr(self, hi)
            if low is not None and high is not None and low > high:
                raise ValueError(f"{lo} ({low}) is greater than {hi} ({high})")
        return self

    def effective_sort(self) -> SortKey:
        if self.sort is not None and (self.sort != "relevance" or self.q or self.token):
            return self.sort
        return "relevance" if (self.q or self.token) else "index"

    def effective_order(self) -> Literal["asc", "desc"]:
        if self.order is not None:
            return self.order
        return "asc" if self.effective_sort() == "index" else "desc"
