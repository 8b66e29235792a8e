"""Which (feature, position) pairs of a prompt move a target logit, and by how much.

Activation × gradient, ``a_i · (d_i · ∇_x metric)`` (Scaling Monosemanticity's attribution),
with the SAE spliced into the residual stream as ``x + (x̂ - stopgrad(x̂))``: the forward pass is
bit-for-bit the model's own (the SAE error term is kept) and one backward pass serves every
feature at every position. Alongside it, the direct logit attribution (DLA) through the final
norm, defined exactly in ``direct_logit_attribution``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from sae_core.inputs.subject import Subject
from sae_core.live.probe import LiveError, Prompt, as_prompt
from sae_core.live.results import (
    Attribution,
    AttributionEntry,
    FeatureAttribution,
    Prediction,
)
from sae_core.saes.sae import SAE


@dataclass(frozen=True)
class Target:
    """What attribution explains: the logit of ``token`` in the next-token prediction made at
    ``position``, minus the logit of ``contrast`` when one is given."""

    position: int | None = None  # None: the last position, the prediction a user sees next
    token: int | None = None  # None: the model's own top prediction at that position
    contrast: int | None = None  # None: a plain logit rather than a logit difference


class _Splice:
    """Forward hook body for block L: x -> x + (x̂ - stopgrad(x̂)), x̂ = decode(f).

    The value is exactly x, so the model's forward is unchanged, while the gradient reaches ``f``
    (a leaf, zero at special tokens) through the decoder: ∂metric/∂f_i = d_i · ∇_x metric.
    """

    def __init__(self, sae: SAE, keep: torch.Tensor):
        self.sae = sae
        self.keep = keep  # (seq,) bool, False at special tokens
        self.x = self.f = self.x_hat = None

    def __call__(self, resid: torch.Tensor) -> torch.Tensor:  # (1, seq, d_model)
        x = resid.detach().to(self.sae.W_dec.dtype)
        f = self.sae.encode(x).masked_fill(~self.keep[None, :, None], 0.0)  # (1, seq, d_sae)
        self.f = f.detach().requires_grad_(True)
        self.x, self.x_hat = x, self.sae.decode(self.f)
        return (x + (self.x_hat - self.x_hat.detach())).to(resid.dtype)


@contextlib.contextmanager
def _captured_input(module: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the first positional input of every call of ``module`` while active."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0].detach()))
    try:
        yield seen
    finally:
        handle.remove()


def attribution(
    subject: Subject,
    sae: SAE,
    layer: int,
    prompt: str | Prompt,
    target: Target = Target(),
    *,
    top: int = 30,
    n_predictions: int = 5,
) -> Attribution:
    """Attribute ``target`` to every (feature, position) of ``prompt`` with one forward and one
    backward pass; also the direct logit attribution of the features at the target position."""
    prompt = as_prompt(subject, prompt)
    position = len(prompt) - 1 if target.position is None else target.position
    if not 0 <= position < len(prompt):
        raise LiveError(f"position {position} is outside the prompt's tokens 0..{len(prompt) - 1}")
    splice = _Splice(sae, keep=~prompt.special_mask)
    keep_logits = torch.tensor([position], device=subject.device)
    with (
        torch.enable_grad(),
        subject.patch_layer(layer, splice),
        _captured_input(subject.final_norm) as final,
    ):
        logits = subject.model(
            input_ids=prompt.ids[None], use_cache=False, logits_to_keep=keep_logits
        ).logits
        logits = logits[0, 0]  # (vocab,)
        token = int(logits.argmax()) if target.token is None else check_token(subject, target.token)
        contrast = None if target.contrast is None else check_token(subject, target.contrast)
        metric = logits[token] - (logits[contrast] if contrast is not None else 0.0)
        grad_f, grad_x = torch.autograd.grad(metric, [splice.f, splice.x_hat])  # (1, seq, ·)
    f = splice.f.detach()[0]  # (seq, d_sae)
    attr = f * grad_f[0]  # (seq, d_sae)
    err = (splice.x - splice.x_hat.detach())[0] * ~prompt.special_mask[:, None]  # (seq, d_model)
    direction = subject.unembed[token] - (
        subject.unembed[contrast] if contrast is not None else 0.0
    )
    dla = direct_logit_attribution(
        subject, sae, final[-1][0, position], f[position], direction
    )  # (d_sae,)
    logits = logits.detach()
    probs = logits.softmax(-1)
    top_ids = probs.topk(n_predictions).indices

    def prediction(token_id: int) -> Prediction:
        text = subject.tokenizer.decode([token_id])
        return Prediction(token_id, text, float(logits[token_id]), float(probs[token_id]))

    return Attribution(
        tokens=prompt.tokens,
        position=position,
        token=prediction(token),
        contrast=None if contrast is None else prediction(contrast),
        metric=float(metric.detach()),
        predictions=[prediction(int(i)) for i in top_ids],
        entries=_top_entries(f, attr, dla, position, top),
        features=_top_features(f, attr, dla, top),
        total=float(attr.sum()),
        error=float((err * grad_x[0]).sum()),
    )


def check_token(subject: Subject, token_id: int) -> int:
    if not 0 <= token_id < subject.vocab_size:
        raise LiveError(
            f"token id {token_id} is outside the vocabulary 0..{subject.vocab_size - 1}"
        )
    return token_id


def _top_entries(f, attr, dla, position: int, top: int) -> list[AttributionEntry]:
    """The ``top`` active (position, feature) pairs by |attribution|; f, attr: (seq, d_sae)."""
    d_sae = f.shape[1]
    n_active = int((f > 0).sum())
    score = attr.abs().masked_fill(f <= 0, -1.0).flatten()  # (seq * d_sae,)
    flat = score.topk(min(top, n_active)).indices.tolist()
    return [
        AttributionEntry(
            feature=i % d_sae,
            position=i // d_sae,
            activation=float(f.view(-1)[i]),
            attribution=float(attr.view(-1)[i]),
            dla=float(dla[i % d_sae]) if i // d_sae == position else 0.0,
        )
        for i in flat
    ]


def _top_features(f, attr, dla, top: int) -> list[FeatureAttribution]:
    """The ``top`` features that fire anywhere, by |attribution summed over positions|."""
    firing = f.amax(dim=0) > 0  # (d_sae,)
    totals = attr.sum(dim=0)  # (d_sae,)
    best = totals.abs().masked_fill(~firing, -1.0).topk(min(top, int(firing.sum()))).indices
    per_position = attr[:, best].T  # (n, seq)
    return [
        FeatureAttribution(
            feature=int(i),
            attribution=float(totals[i]),
            dla=float(dla[i]),
            top_position=int(row.abs().argmax()),
            values=row.tolist(),
        )
        for i, row in zip(best.tolist(), per_position, strict=True)
    ]


def direct_logit_attribution(
    subject: Subject, sae: SAE, resid: torch.Tensor, acts: torch.Tensor, direction: torch.Tensor
) -> torch.Tensor:
    """(d_sae,) direct effect of each feature at one position on ``direction · logits``.

    The final norm maps the last residual r to ``c(r) / σ ⊙ γ + β``, where c centres r for
    LayerNorm and is the identity for RMSNorm, σ = sqrt(mean(c(r)²) + eps), γ is
    ``final_norm_scale``. Freezing σ at its value for this r makes the norm linear, and then

        DLA_i = a_i · (c(W_dec[i]) ⊙ γ) · u / σ,     u = ``direction`` (W_U[token] [- W_U[contrast]])

    is feature i's exact share of u · norm(r) over the parts of r, counting only the direct path
    (d_i written at layer L reaches r unchanged through the residual stream, later blocks
    ignored). ``resid`` (d_model,) is r at the target position; ``acts`` (d_sae,) the features
    there. Soft-capping after the head (Gemma 2) is not modelled.
    """
    norm = subject.final_norm
    centre = isinstance(norm, torch.nn.LayerNorm)
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 0.0)
    r = resid.double()
    if centre:
        r = r - r.mean()
    sigma = torch.sqrt(r.pow(2).mean() + eps)
    w_dec = sae.W_dec.detach().double()  # (d_sae, d_model)
    if centre:
        w_dec = w_dec - w_dec.mean(dim=-1, keepdim=True)
    readout = subject.final_norm_scale().double() * direction.double()  # (d_model,)
    dla = acts.double() * (w_dec @ readout) / sigma
    return dla.masked_fill(acts == 0, 0.0).float()  # a clean 0, not -0, where a feature is off
