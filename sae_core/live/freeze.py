"""The subject model made linear around one prompt: attention patterns, norm scales and MLP gates
held at the values they took on that prompt.

A Llama-family block is ``x + attn(norm(x)) + mlp(norm(·))``. Holding, at their prompt values,

- the query and key projections (so every softmax pattern is a constant),
- every RMSNorm's ``1/σ`` (so a norm is ``γ ⊙ x / σ``, a per-position linear map), and
- the gated MLP's ``act(gate(x))`` (so the MLP is ``W_down (g ⊙ W_up x)``, linear in x),

leaves a model that is *linear and homogeneous* in the residual stream: no term survives when
the residual is zero (these models have no biases), and on the prompt itself every value is the
model's own. That is what makes attribution-graph edges exact: a node's input is the sum of what
each upstream node sends it (``sae_core.live.graph``). It is the "local linear view" of
Anthropic's circuit-tracing work with residual SAEs instead of transcoders, so the MLPs between
two SAE layers are linearised by their gates rather than replaced.

``Freezer.record()`` runs the prompt once and stores those values; under ``Freezer.replay()``
those modules' forwards return them (broadcast over a batch of copies of the prompt) without
computing the projections they replace, and autograd sees the linear model. ``blocks_from`` runs a stretch of blocks directly, with the keyword arguments (rotary
embeddings, causal mask) the model passed them on the prompt.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from sae_core.inputs.subject import Subject, _hidden
from sae_core.live.graph_settings import GraphError


def _is_rms_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and hasattr(module, "weight")


def _eps(norm: nn.Module) -> float:
    return getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)


def _prefix(name: str, value, length: int):
    """A block's keyword argument cut to the first ``length`` positions."""
    if value is None or name not in _POSITIONAL:
        return value
    if name == "position_embeddings":  # (cos, sin), each (1, seq, head_dim)
        return tuple(t[..., :length, :] for t in value)
    if name == "attention_mask" and value.dim() == 4:  # (1, 1, seq, seq)
        return value[..., :length, :length]
    return value[..., :length]  # position_ids (1, seq), cache_position (seq,), a (1, seq) mask


# Keyword arguments of a decoder block that run along the sequence (transformers 4.5x-5.x).
_POSITIONAL = ("position_embeddings", "attention_mask", "position_ids", "cache_position")


def _get(module: nn.Module, dotted: str) -> nn.Module | None:
    try:
        return module.get_submodule(dotted)
    except AttributeError:
        return None


class Freezer:
    """Record the prompt's attention inputs, norm scales and gates; replay them as constants."""

    def __init__(self, subject: Subject):
        self.subject = subject
        self.mode = "off"  # "record" while the prompt runs
        self.values: dict[str, torch.Tensor] = {}
        self.block_inputs: list[torch.Tensor] = []  # (1, seq, d) input of every block
        self.block_outputs: list[torch.Tensor] = []  # (1, seq, d) output of every block
        self.block_kwargs: list[dict[str, Any]] = []
        self.final_input: torch.Tensor | None = None  # (1, seq, d) input of the final norm
        self._held, self._gates, self._norms = self._find_modules()

    def _find_modules(
        self,
    ) -> tuple[dict[str, nn.Module], dict[str, nn.Module], dict[str, nn.Module]]:
        """(held: q/k projections and MLP activations, their gate projections, RMSNorms)."""
        held: dict[str, nn.Module] = {}
        gates: dict[str, nn.Module] = {}
        norms: dict[str, nn.Module] = {}
        for b, block in enumerate(self.subject.blocks):
            found = {"q_proj": 0, "k_proj": 0, "act_fn": 0}
            for name, module in block.named_modules():
                last = name.rsplit(".", 1)[-1]
                if last in found:
                    held[f"{b}.{name}"] = module
                    found[last] += 1
                    if last == "act_fn":
                        gate = _get(
                            block,
                            name.rsplit(".", 1)[0] + ".gate_proj" if "." in name else "gate_proj",
                        )
                        if gate is not None:
                            gates[f"{b}.{name}"] = gate
                elif _is_rms_norm(module):
                    norms[f"{b}.{name}"] = module
            if (
                not all(found.values())
                or not any(k.startswith(f"{b}.") for k in norms)
                or not any(k.startswith(f"{b}.") for k in gates)
            ):
                raise GraphError(
                    f"attribution graphs need a Llama-family model (RMSNorm, q/k projections, "
                    f"gated MLP); block {b} of {self.subject.name} "
                    f"({self.subject.config.model_type}) is not one"
                )
        final = self.subject.final_norm
        if not _is_rms_norm(final):
            raise GraphError(f"the final norm of {self.subject.name} is not an RMSNorm")
        norms["final"] = final
        return held, gates, norms

    # -- recording ----------------------------------------------------------------------------

    def _record_output(self, key: str):
        def hook(_module, _inputs, output):
            if self.mode == "record":
                self.values[key] = output.detach()

        return hook

    def _record_scale(self, key: str, module: nn.Module):
        eps = _eps(module)

        def hook(_module, inputs, _output):
            if self.mode == "record":
                x = inputs[0].detach()
                x = x.to(torch.promote_types(x.dtype, torch.float32))
                self.values[key] = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)  # (1, seq, 1)

        return hook

    # -- replaying: module forwards swapped for constants and frozen scales -------------------

    def _constant(self, key: str):
        def forward(x, *_args, **_kwargs):  # the prompt's value, for every copy in the batch
            stored = self.values[key][:, : x.shape[1]]  # a prefix of the prompt reads a prefix
            return stored.expand(x.shape[0], *stored.shape[1:])  # no copy: views split its last dim

        return forward

    def _frozen_norm(self, key: str, module: nn.Module):
        def forward(x):
            scale = self.values[key][:, : x.shape[1]]  # (1, seq, 1): broadcasts over copies
            return module.weight * (x.to(scale.dtype) * scale).to(x.dtype)

        return forward

    def _replay_forwards(self) -> dict[nn.Module, object]:
        """Instance ``forward`` overrides: q/k projections return the prompt's values; a gate
        projection returns the prompt's *activated* gate and its activation passes it on (so
        neither is computed); norms scale by the prompt's 1/σ."""
        forwards: dict[nn.Module, object] = {}
        for key, module in self._held.items():
            if key in self._gates:
                forwards[self._gates[key]] = self._constant(key)
                forwards[module] = lambda x: x
            else:
                forwards[module] = self._constant(key)
        for key, module in self._norms.items():
            forwards[module] = self._frozen_norm(key, module)
        return forwards

    def _block_pre(self, b: int):
        def hook(_module, args, kwargs):
            if self.mode == "record":
                self.block_inputs.append(args[0].detach())
                self.block_kwargs.append(dict(kwargs))
            return None

        return hook

    def _block_post(self, _module, _inputs, output):
        if self.mode == "record":
            self.block_outputs.append(_hidden(output).detach())

    def _final_pre(self, _module, args):
        if self.mode == "record":
            self.final_input = args[0].detach()

    @contextlib.contextmanager
    def installed(self) -> Iterator[Freezer]:
        handles = []
        try:
            for key, module in self._held.items():
                handles.append(module.register_forward_hook(self._record_output(key)))
            for key, module in self._norms.items():
                handles.append(module.register_forward_hook(self._record_scale(key, module)))
            for b, block in enumerate(self.subject.blocks):
                handles.append(
                    block.register_forward_pre_hook(self._block_pre(b), with_kwargs=True)
                )
                handles.append(block.register_forward_hook(self._block_post))
            handles.append(self.subject.final_norm.register_forward_pre_hook(self._final_pre))
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self.mode = "off"

    # -- use ----------------------------------------------------------------------------------

    def record(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt (1, seq) through the model, storing what replay holds; return the
        logits (seq, vocab)."""
        self.values.clear()
        self.block_inputs.clear()
        self.block_outputs.clear()
        self.block_kwargs.clear()
        self.mode = "record"
        try:
            with torch.no_grad():
                logits = self.subject.model(input_ids=input_ids, use_cache=False).logits
        finally:
            self.mode = "off"
        return logits[0]

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """While active, the model is the linear model of the recorded prompt."""
        forwards = self._replay_forwards()
        try:
            for module, forward in forwards.items():
                module.forward = forward
            yield
        finally:
            for module in forwards:
                module.__dict__.pop("forward", None)

    def blocks_from(self, x: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """Run blocks ``first..last`` (inclusive) on ``x`` (batch, length, d) with the prompt's
        keyword arguments; call under ``replay()`` for the linear model. ``x`` may be the first
        ``length`` positions of the prompt only: the model is causal, so they do not depend on
        the rest, and a batch of early target nodes runs on a short sequence."""
        length = x.shape[1]
        for b in range(first, last + 1):
            kwargs = {k: _prefix(k, v, length) for k, v in self.block_kwargs[b].items()}
            x = _hidden(self.subject.blocks[b](x, **kwargs))
        return x

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.subject.final_norm(x)
