"""A prompt through the model and its SAE: which features fire, and where.

``encode_prompt`` tokenises text the way contexts are tokenised (BOS first) or through the chat
template; ``activations`` gives per token its strongest features and every feature ranked by its
max over the prompt, and ``release_activations`` the same for several SAEs from one forward pass;
``feature_activations`` one feature on custom text. Special tokens (BOS, chat
markers) never count: their residuals are outliers the SAE was not trained on (REFERENCE §4).
Attribution to an output token is in ``sae_core.live.attribution``, steering in ``sae_core.live.steering``.
Nothing here knows HTTP; the web worker calls these functions from one thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from sae_core.errors import SaescopeError
from sae_core.inputs.subject import Subject
from sae_core.inputs.token_bytes import joined_texts, token_bytes
from sae_core.live.results import (
    FeatureOnText,
    FeatureValue,
    PromptActivations,
    PromptToken,
    RankedFeature,
    ReleaseActivations,
    SaeActivations,
)
from sae_core.saes.sae import SAE


class LiveError(SaescopeError):
    """A live request that cannot be served as asked (bad feature index, unknown token ...)."""


class PromptTooLong(LiveError):
    """The prompt has more tokens than the configured limit."""

    def __init__(self, n_tokens: int, limit: int):
        super().__init__(
            f"the prompt is {n_tokens} tokens but at most {limit} are allowed here; shorten it"
        )
        self.n_tokens = n_tokens
        self.limit = limit


# ---------------------------------------------------------------------------------------------
# Prompts


@dataclass(frozen=True)
class Prompt:
    """A tokenised prompt exactly as the model sees it."""

    ids: torch.Tensor  # (seq,) long, BOS first when the tokenizer has one
    special_mask: torch.Tensor  # (seq,) bool, True at special tokens
    tokens: list[PromptToken]

    def __len__(self) -> int:
        return len(self.tokens)


def encode_prompt(
    subject: Subject, text: str, *, chat: bool = False, max_tokens: int | None = None
) -> Prompt:
    """Tokenise ``text`` the way contexts are tokenised (BOS prepended when the tokenizer has one),
    or, with ``chat``, as one user turn of the model's chat template with the assistant prompt
    opened. ``max_tokens`` counts every token the model sees, special ones included."""
    if not text.strip():
        raise LiveError("the prompt is empty; type some text")
    tokenizer = subject.tokenizer
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise LiveError(
                f"{subject.name} has no chat template; send the prompt without apply_chat_template"
            )
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
        )
        ids = list(encoded["input_ids"])
    else:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if subject.bos_token_id is not None:
            ids = [subject.bos_token_id, *ids]
    if max_tokens is not None and len(ids) > max_tokens:
        raise PromptTooLong(len(ids), max_tokens)
    special = set(subject.special_ids)
    texts = joined_texts(token_bytes(tokenizer, ids))  # an emoji split over tokens stays one
    tokens = [
        PromptToken(position=pos, token_id=tid, text=text, special=tid in special)
        for pos, (tid, text) in enumerate(zip(ids, texts, strict=True))
    ]
    return Prompt(
        ids=torch.tensor(ids, dtype=torch.long, device=subject.device),
        special_mask=torch.tensor(
            [t.special for t in tokens], dtype=torch.bool, device=subject.device
        ),
        tokens=tokens,
    )


def single_token_id(subject: Subject, text: str) -> int:
    """The id of the one token that ``text`` encodes to (e.g. " Paris"), or a LiveError."""
    ids = subject.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise LiveError(
            f"{text!r} is {len(ids)} tokens for this model; give text that is exactly one token "
            "(mind the leading space) or a token id"
        )
    return int(ids[0])


def as_prompt(subject: Subject, prompt: str | Prompt) -> Prompt:
    return encode_prompt(subject, prompt) if isinstance(prompt, str) else prompt


def check_feature(sae: SAE, feature: int) -> int:
    if not 0 <= feature < sae.d_sae:
        raise LiveError(
            f"feature {feature} does not exist; this SAE has features 0..{sae.d_sae - 1}"
        )
    return feature


def _feature_acts(subject: Subject, sae: SAE, layer: int, prompt: Prompt) -> torch.Tensor:
    """(seq, d_sae) SAE activations on the prompt, zero at special tokens."""
    return _encode(sae, subject.forward_to_layer(prompt.ids[None], layer)[0], prompt)


def _encode(sae: SAE, x: torch.Tensor, prompt: Prompt) -> torch.Tensor:
    """(seq, d_sae) activations of ``sae`` on the residual ``x`` (seq, d_model) of ``prompt``,
    zero at special tokens."""
    with torch.no_grad():
        f = sae.encode(x.to(sae.W_dec.dtype))  # (seq, d_sae)
    return f.masked_fill(prompt.special_mask[:, None], 0.0)


class _Firing(NamedTuple):
    top_per_token: list[list[FeatureValue]]
    ranked: list[RankedFeature]


def _firing(f: torch.Tensor, *, per_token: int, top: int) -> _Firing:
    """The ``per_token`` strongest features at each token of ``f`` (seq, d_sae), and the ``top``
    features ranked by their max over the prompt."""
    f = f.float()
    values, indices = f.topk(min(per_token, f.shape[1]), dim=-1)  # (seq, per_token)
    top_per_token = [
        [FeatureValue(int(i), float(v)) for v, i in zip(row_v, row_i, strict=True) if v > 0]
        for row_v, row_i in zip(values.tolist(), indices.tolist(), strict=True)
    ]
    max_values, max_positions = f.max(dim=0)  # (d_sae,)
    n_firing = int((max_values > 0).sum())
    best_values, best = max_values.topk(min(top, n_firing))
    per_feature = f[:, best].T.tolist()  # (n, seq)
    ranked = [
        RankedFeature(int(i), float(v), int(max_positions[i]), row)
        for i, v, row in zip(best.tolist(), best_values.tolist(), per_feature, strict=True)
    ]
    return _Firing(top_per_token, ranked)


# ---------------------------------------------------------------------------------------------
# What fires


def activations(
    subject: Subject,
    sae: SAE,
    layer: int,
    prompt: str | Prompt,
    *,
    per_token: int = 5,
    top: int = 50,
) -> PromptActivations:
    """Which features fire on ``prompt``: the ``per_token`` strongest at each token and the ``top``
    features ranked by their max over the prompt (BOS and other special tokens excluded)."""
    prompt = as_prompt(subject, prompt)
    firing = _firing(_feature_acts(subject, sae, layer, prompt), per_token=per_token, top=top)
    return PromptActivations(
        tokens=prompt.tokens, top_per_token=firing.top_per_token, ranked=firing.ranked
    )


def release_activations(
    subject: Subject,
    saes: Sequence[tuple[str, SAE, int]],
    prompt: str | Prompt,
    *,
    per_token: int = 5,
    top: int = 50,
) -> ReleaseActivations:
    """``activations`` for every (name, SAE, layer) of ``saes`` at once: one forward pass, stopped
    after the deepest of their layers, and each SAE encodes the residual of its own layer."""
    prompt = as_prompt(subject, prompt)
    resid = subject.forward_to_layers(prompt.ids[None], [layer for _, _, layer in saes])
    parts = []
    for name, sae, layer in saes:
        firing = _firing(_encode(sae, resid[layer][0], prompt), per_token=per_token, top=top)
        parts.append(SaeActivations(name, layer, firing.top_per_token, firing.ranked))
    return ReleaseActivations(tokens=prompt.tokens, saes=parts)


def feature_activations(
    subject: Subject, sae: SAE, layer: int, prompt: str | Prompt, feature: int
) -> FeatureOnText:
    """One feature's activation at every token of custom text (the feature page's try-it box)."""
    check_feature(sae, feature)
    prompt = as_prompt(subject, prompt)
    column = _feature_acts(subject, sae, layer, prompt)[:, feature].float()  # (seq,)
    max_value, max_position = column.max(dim=0)
    return FeatureOnText(
        feature=feature,
        tokens=prompt.tokens,
        values=column.tolist(),
        max_value=float(max_value),
        max_position=int(max_position),
    )
