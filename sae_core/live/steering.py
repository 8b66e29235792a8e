"""Steering: continue a prompt with and without an intervention on SAE features at layer L.

"add" writes ``s · W_dec[i]`` into the residual at every non-special position (prompt and
generated tokens); "clamp" holds ``f_i`` at a value and decodes with the error term kept. Both
continuations use the same seed, so any difference is the intervention's.
"""

from __future__ import annotations

import inspect
from typing import Literal

import torch

from sae_core.inputs.subject import Subject
from sae_core.live.probe import LiveError, Prompt, as_prompt, check_feature
from sae_core.live.results import Continuation, Generation, SteerFeature, Steering
from sae_core.saes.sae import SAE


class SteerHook:
    """Forward hook body for block L that applies the intervention at non-special positions.

    "add": x + Σ s_i · W_dec[i]. "clamp": f_i := s_i and decode with the error term kept,
    which is x + Σ (s_i - f_i(x)) · W_dec[i]; no other feature moves.
    """

    def __init__(self, sae: SAE, mode: str, features: list[SteerFeature]):
        self.sae, self.mode = sae, mode
        self.index = torch.tensor(
            [s.feature for s in features], dtype=torch.long, device=sae.W_dec.device
        )
        self.strength = torch.tensor(
            [s.strength for s in features], dtype=sae.W_dec.dtype, device=sae.W_dec.device
        )
        self.keep: torch.Tensor | None = None  # (batch, chunk) bool, set by the caller per forward

    def __call__(self, resid: torch.Tensor) -> torch.Tensor:  # (batch, chunk, d_model)
        w = self.sae.W_dec.detach()[self.index]  # (n, d_model)
        if self.mode == "add":
            delta = (self.strength @ w).expand_as(resid)
        else:
            current = self.sae.encode(resid.to(w.dtype))[..., self.index]  # (batch, chunk, n)
            delta = (self.strength - current) @ w
        return resid + (delta * self.keep[..., None]).to(resid.dtype)


def steer(
    subject: Subject,
    sae: SAE,
    layer: int,
    prompt: str | Prompt,
    features: list[SteerFeature],
    *,
    mode: Literal["add", "clamp"] = "add",
    generation: Generation = Generation(),  # noqa: B008 (frozen, so sharing it is safe)
) -> Steering:
    """Continue ``prompt`` twice with the same seed: as the model would, and with ``features``
    steered at layer L. In "add" mode strength 0 changes nothing, so both continuations match."""
    if mode not in ("add", "clamp"):
        raise LiveError(f"unknown steering mode {mode!r}; use 'add' or 'clamp'")
    if not features:
        raise LiveError("choose at least one feature to steer")
    for item in features:
        check_feature(sae, item.feature)
    prompt = as_prompt(subject, prompt)
    default = _generate(subject, prompt, generation)
    hook = SteerHook(sae, mode, features)
    with subject.patch_layer(layer, hook):
        steered = _generate(subject, prompt, generation, hook)
    return Steering(
        prompt_text=subject.tokenizer.decode(prompt.ids.tolist()),
        mode=mode,
        features=list(features),
        generation=generation,
        default=default,
        steered=steered,
    )


@torch.no_grad()
def _generate(
    subject: Subject, prompt: Prompt, generation: Generation, hook: SteerHook | None = None
) -> Continuation:
    """Sample up to ``max_new_tokens`` with a KV cache, stopping at an end-of-sequence token.

    ``hook`` (already attached to block L) is told which positions of each chunk it may touch:
    the prompt's non-special tokens on the first pass, then every generated token."""
    generator = torch.Generator(device=subject.device).manual_seed(generation.seed)
    stop = _eos_ids(subject)
    chunk, keep = prompt.ids[None], ~prompt.special_mask[None]  # (1, seq)
    cache_name = _cache_name(subject.model)
    cache = None
    new_ids: list[int] = []
    for _ in range(generation.max_new_tokens):
        if hook is not None:
            hook.keep = keep
        out = subject.model(
            input_ids=chunk, use_cache=True, logits_to_keep=1, **{cache_name: cache}
        )
        cache = getattr(out, cache_name)
        next_id = _sample(out.logits[0, -1].float(), generation.temperature, generator)
        if next_id in stop:
            break
        new_ids.append(next_id)
        chunk = torch.tensor([[next_id]], device=subject.device)
        keep = torch.ones_like(chunk, dtype=torch.bool)
    return Continuation(new_ids, subject.tokenizer.decode(new_ids))


def _cache_name(model: torch.nn.Module) -> str:
    """The KV cache's argument and output name: ``cache`` in recent transformers 5 releases,
    ``past_key_values`` in 4.x (a misspelt keyword would be swallowed and the cache silently lost)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _sample(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> int:
    """One token from (vocab,) logits: argmax at temperature 0, else softmax(logits / T)."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = (logits / temperature).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _eos_ids(subject: Subject) -> set[int]:
    ids = {subject.tokenizer.eos_token_id}
    config_eos = getattr(getattr(subject.model, "generation_config", None), "eos_token_id", None)
    ids.update(config_eos if isinstance(config_eos, list) else [config_eos])
    return {int(i) for i in ids if i is not None}
