"""Attribution graphs: which features, at which positions and layers, make the model say what it
says, from residual-stream SAEs on several layers.

The *replacement model* splices every SAE into the residual stream after its block: at layer L
and a non-special position, ``r = W_dec f + b_dec + e`` with ``f = encode(x)`` and the error
``e = x - x̂`` held at its value on the prompt; special tokens (BOS, chat markers) keep their
residual ``x`` as a constant. With attention patterns, norm scales and MLP gates frozen
(``sae_core.live.freeze``) the model between two SAE layers is linear, so every node's input is
exactly the sum of what each node upstream sends it plus a constant:

- nodes: every active feature (SAE slot, position, index), one error node per (slot, non-special
  position), the input embedding at every position (the residual entering block 0), the target
  (``Target``: a logit or a logit difference at one position);
- the input of a feature node is its encoder pre-activation ``z = W_enc·(x - b_dec) + b_enc``; of
  the target, the metric ``u · norm(x)``;
- edge ``s → t`` is ``a_s · ∂(input_t)/∂a_s`` in the linear model, ``a_s`` the source's activation
  (1 for an error or embedding node, whose vector is its value); the constant part (encoder and
  decoder biases, held special-token residuals) is ``bias_t``. So ``Σ_s A[t, s] + bias_t`` is
  node t's input to float precision (the tests check it to 1e-4).

Each residual SAE cuts the whole stream, so direct edges join consecutive SAE layers (the
embeddings feed the first, the last feeds the target); influence through the whole graph is in
``sae_core.live.graph_prune``. Edges are computed one backward pass per batch of target nodes:
the stretch of blocks between two SAE layers runs on a batch of copies of the prompt, each copy
reading out one target node, and the gradient at the stretch's input, dotted with each source
node's vector, is that node's edge to every target in the batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from sae_core.inputs.subject import Subject
from sae_core.live.attribution import Target, check_token
from sae_core.live.freeze import Freezer, GraphError
from sae_core.live.probe import Prompt, as_prompt
from sae_core.live.results import Prediction, PromptToken
from sae_core.saes.sae import SAE

Progress = Callable[[str, int, int], None]  # (stage, done, total)


class GraphSae(NamedTuple):
    layer: int  # block whose output the SAE reads
    sae: SAE


@dataclass(frozen=True)
class GraphLimits:
    # Feature nodes before pruning. Neuronpedia's graphs keep a few thousand; 1,000 keeps the
    # dense adjacency small (~5 MB) and a 32-token graph of SmolLM2-135M well under a minute on
    # two cores. Features past it (least |activation × gradient| first) fold into error nodes.
    max_features: int = 1000
    # Target nodes per backward pass: 64 copies of a 64-token prompt through a stretch of blocks
    # fit in a few hundred MB and amortise the per-pass overhead.
    batch_size: int = 64


@dataclass
class Graph:
    """An attribution graph before pruning. Node order: features (by slot, position, index),
    error nodes (by slot, position), embeddings (by position), the target last."""

    tokens: list[PromptToken]
    layers: list[int]  # SAE layers, ascending; a feature's "slot" indexes this list
    features: torch.Tensor  # (n_features, 3) long: slot, position, feature index
    activations: torch.Tensor  # (n_features,)
    errors: torch.Tensor  # (n_errors, 2) long: slot, position
    position: int  # where the target prediction is made
    target: Prediction
    contrast: Prediction | None
    metric: float  # logit(target) [- logit(contrast)] at ``position``
    adjacency: torch.Tensor  # (n_nodes, n_nodes) [to, from]: what ``from`` adds to ``to``'s input
    bias: torch.Tensor  # (n_nodes,) the part of each input no node sends; 0 for sources
    inputs: torch.Tensor  # (n_nodes,) pre-activation of a feature, the metric for the target
    n_folded: int  # active features beyond the cap, folded into their error nodes

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def n_errors(self) -> int:
        return len(self.errors)

    @property
    def n_positions(self) -> int:
        return len(self.tokens)

    @property
    def n_nodes(self) -> int:
        return self.n_features + self.n_errors + self.n_positions + 1

    @property
    def error_start(self) -> int:
        return self.n_features

    @property
    def embedding_start(self) -> int:
        return self.n_features + self.n_errors

    @property
    def target_index(self) -> int:
        return self.n_nodes - 1

    def feature_node(self, layer: int, position: int, feature: int) -> int:
        """The node index of an active feature, or a GraphError."""
        key = torch.tensor([self.layers.index(layer), position, feature])
        hits = (self.features == key).all(dim=1).nonzero()
        if len(hits) == 0:
            raise GraphError(
                f"feature {feature} is not active at layer {layer}, position {position}"
            )
        return int(hits[0, 0])


class _LayerCode(NamedTuple):
    """One SAE on the prompt: what the replacement model holds and what its nodes carry."""

    x: torch.Tensor  # (seq, d) the model's residual after the block
    f: torch.Tensor  # (seq, d_sae) feature activations, 0 at special tokens and folded features
    error: torch.Tensor  # (seq, d) x - x̂ (+ folded features) at non-special positions, else 0
    held: torch.Tensor  # (seq, d) x at special positions, else 0
    folded: torch.Tensor  # (seq, d_sae) bool: active features past the cap, held in ``error``


class ReplacementModel:
    """The subject with SAEs spliced in and the prompt's nonlinearities frozen (see module doc).
    Made by ``replacement_model``, valid inside its ``with`` block."""

    def __init__(self, subject: Subject, saes: Sequence[GraphSae], prompt: Prompt, target: Target):
        self.subject = subject
        self.saes = sorted(saes, key=lambda s: s.layer)
        self.prompt = prompt
        self.keep = ~prompt.special_mask  # (seq,)
        self.freezer = Freezer(subject)
        layers = [s.layer for s in self.saes]
        if not layers:
            raise GraphError("a graph needs at least one SAE")
        if len(set(layers)) != len(layers):
            raise GraphError(f"two SAEs read the same layer ({layers}); give one per layer")
        for layer, sae in self.saes:
            subject.check_layer(layer)
            if sae.d_in != subject.d_model:
                raise GraphError(
                    f"the SAE at layer {layer} reads width {sae.d_in}, the model's is {subject.d_model}"
                )
        if getattr(subject.model.get_output_embeddings(), "bias", None) is not None:
            raise GraphError(f"{subject.name}'s unembedding has a bias; graphs do not model it")
        self.position = len(prompt) - 1 if target.position is None else target.position
        if not 0 <= self.position < len(prompt):
            raise GraphError(
                f"position {self.position} is outside the prompt's tokens 0..{len(prompt) - 1}"
            )
        self.target = target
        self.codes: list[_LayerCode] = []

    @property
    def layers(self) -> list[int]:
        return [s.layer for s in self.saes]

    def _start(self) -> None:
        logits = self.freezer.record(self.prompt.ids[None])  # (seq, vocab)
        self.logits = logits[self.position]
        token = self.target.token
        token = int(self.logits.argmax()) if token is None else check_token(self.subject, token)
        contrast = self.target.contrast
        contrast = None if contrast is None else check_token(self.subject, contrast)
        self.token, self.contrast = token, contrast
        unembed = self.subject.unembed.detach()
        self.direction = unembed[token] - (unembed[contrast] if contrast is not None else 0.0)
        keep = self.keep[:, None]
        for layer, sae in self.saes:
            x = self.freezer.block_outputs[layer][0]  # (seq, d)
            with torch.no_grad():
                f = sae.encode(x).masked_fill(~keep, 0.0)
                error = (x - sae.decode(f)) * keep
            folded = torch.zeros_like(f, dtype=torch.bool)
            self.codes.append(_LayerCode(x=x, f=f, error=error, held=x * ~keep, folded=folded))

    # -- the replacement model's forward -----------------------------------------------------

    def metric(
        self, *, scale: tuple[int, int, int, float] | None = None, track: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The target metric of the frozen replacement model, and each slot's features.

        Features are recomputed from their inputs (``encode``) while errors and special-token
        residuals are held, so ``scale=(slot, position, feature, factor)`` multiplies one
        feature and lets the change flow through every later feature: the model's answer to
        what the graph predicts (``predicted_change``). ``track`` keeps each slot's features'
        gradients (``f.grad`` after ``backward``)."""
        x = self.freezer.block_inputs[0]
        first = 0
        feats = []
        keep = self.keep[None, :, None]
        with self.freezer.replay(), torch.set_grad_enabled(track):
            for slot, ((layer, sae), code) in enumerate(zip(self.saes, self.codes, strict=True)):
                x = self.freezer.blocks_from(x, first, layer)
                f = sae.encode(x) * keep * ~code.folded  # folded features stay in the errors
                if scale is not None and scale[0] == slot:
                    factor = torch.ones_like(f)
                    factor[0, scale[1], scale[2]] = scale[3]
                    f = f * factor
                if track:
                    f.retain_grad()
                feats.append(f)
                x = (sae.decode(f) + code.error) * keep + code.held
                first = layer + 1
            x = self.freezer.blocks_from(x, first, self.subject.n_layers - 1)
            value = self.freezer.final_norm(x)[:, self.position] @ self.direction
        return value[0], feats

    def _fold(self, max_features: int, progress: Progress | None) -> int:
        """Keep the ``max_features`` active features of largest |activation × gradient| (the
        first-order total effect on the metric); the rest join their error nodes."""
        n_active = sum(int((code.f > 0).sum()) for code in self.codes)
        if n_active <= max_features:
            return 0
        if progress:
            progress("ranking features", 0, 1)
        value, feats = self.metric(track=True)
        value.backward()
        scores = torch.cat([(f * f.grad).abs()[0].flatten() for f in feats])
        active = torch.cat([(code.f > 0).flatten() for code in self.codes])
        scores = scores.masked_fill(~active, -1.0)
        keep = torch.zeros_like(active)
        keep[scores.topk(max_features).indices] = True
        offset = 0
        for slot, ((_, sae), code) in enumerate(zip(self.saes, self.codes, strict=True)):
            size = code.f.numel()
            kept = keep[offset : offset + size].view_as(code.f)
            offset += size
            folded = code.f * ~kept
            self.codes[slot] = code._replace(
                f=code.f * kept,
                folded=code.f.gt(0) & ~kept,
                error=code.error + (folded @ sae.W_dec.detach()) * self.keep[:, None],
            )
        return n_active - max_features

    # -- edges ---------------------------------------------------------------------------------

    def _gradients(self, source: torch.Tensor, first: int, last: int, readout) -> torch.Tensor:
        """(n, seq, d): gradient of each of ``readout``'s n outputs at the input of blocks
        first..last, in the linear model, for one batch of n copies of the prompt (cut after
        the batch's last read position: later positions cannot reach it)."""
        n, length = readout.n, readout.last + 1
        x = source[None, :length].expand(n, -1, -1).clone().requires_grad_(True)
        with self.freezer.replay(), torch.enable_grad():
            out = self.freezer.blocks_from(x, first, last)
            (grad,) = torch.autograd.grad(readout(out).sum(), x)
        return torch.nn.functional.pad(grad, (0, 0, 0, source.shape[0] - length))

    def graph(self, limits: GraphLimits = GraphLimits(), progress: Progress | None = None) -> Graph:
        n_folded = self._fold(limits.max_features, progress)
        seq = len(self.prompt)
        active = [code.f.nonzero() for code in self.codes]  # per slot (n, 2): position, feature
        features = torch.cat(
            [torch.cat([torch.full((len(a), 1), s), a.cpu()], dim=1) for s, a in enumerate(active)]
        ).long()
        activations = torch.cat(
            [code.f[a[:, 0], a[:, 1]] for code, a in zip(self.codes, active, strict=True)]
        )
        keep_positions = self.keep.nonzero()[:, 0].cpu()
        errors = torch.cat(
            [
                torch.stack([torch.full_like(keep_positions, s), keep_positions], 1)
                for s in range(len(self.codes))
            ]
        ).long()
        n_f, n_e = len(features), len(errors)
        n = n_f + n_e + seq + 1
        dtype = self.codes[0].x.dtype  # float32, or float64 for checks to many digits
        A = torch.zeros(n, n, dtype=dtype)
        bias = torch.zeros(n, dtype=dtype)
        inputs = torch.zeros(n, dtype=dtype)
        f_start = [0]  # first feature row of each slot
        for a in active:
            f_start.append(f_start[-1] + len(a))
        n_keep = len(keep_positions)
        device = self.prompt.ids.device

        def residual(slot: int) -> torch.Tensor:
            """(seq, d) what slot ``slot`` (-1: the embeddings) sends on."""
            if slot < 0:
                return self.freezer.block_inputs[0][0]
            code = self.codes[slot]
            r = self.saes[slot].sae.decode(code.f) + code.error
            return (r * self.keep[:, None] + code.held).detach()

        def fill(rows: torch.Tensor, grad: torch.Tensor, slot: int) -> None:
            """Edges into node ``rows`` (n,) from slot ``slot``'s nodes, given the (n, seq, d)
            gradients at that slot's residual; the constant part into ``bias``."""
            if slot < 0:
                emb = self.freezer.block_inputs[0][0]  # (seq, d)
                A[rows, n_f + n_e : n_f + n_e + seq] = (grad * emb).sum(-1).cpu()
                return
            code, sae = self.codes[slot], self.saes[slot].sae
            pos, idx = active[slot][:, 0], active[slot][:, 1]
            proj = grad @ sae.W_dec.detach()[idx].T  # (n, seq, n_src)
            cols = torch.arange(len(idx), device=proj.device)
            A[rows, f_start[slot] : f_start[slot + 1]] = (
                proj[:, pos, cols] * code.f[pos, idx]
            ).cpu()
            kp = keep_positions.to(device)
            A[rows, n_f + slot * n_keep : n_f + (slot + 1) * n_keep] = (
                (grad[:, kp] * code.error[kp]).sum(-1).cpu()
            )
            constant = sae.b_dec.detach() * self.keep[:, None] + code.held  # (seq, d)
            bias[rows] += (grad * constant).sum((1, 2)).cpu()

        n_slots = len(self.saes)
        for slot in range(n_slots):
            layer, sae = self.saes[slot]
            first = self.layers[slot - 1] + 1 if slot else 0
            source = residual(slot - 1)
            rows_all = torch.arange(f_start[slot], f_start[slot + 1])
            pos_all, idx_all = active[slot][:, 0], active[slot][:, 1]
            with torch.no_grad():
                z = sae.pre_acts(self.codes[slot].x)  # (seq, d_sae)
                inputs[rows_all] = z[pos_all, idx_all].cpu()
                bias[rows_all] = sae.pre_acts(torch.zeros_like(sae.b_dec))[idx_all].cpu()
            for b in range(0, len(rows_all), limits.batch_size):
                if progress:
                    progress(f"edges into layer {layer}", b, len(rows_all))
                pos, idx = pos_all[b : b + limits.batch_size], idx_all[b : b + limits.batch_size]
                readout = _FeatureReadout(sae, pos, idx)
                grad = self._gradients(source, first, layer, readout)
                fill(rows_all[b : b + limits.batch_size], grad, slot - 1)
        if progress:
            progress("edges into the target", 0, 1)
        source = residual(n_slots - 1)
        readout = _MetricReadout(self.freezer, self.position, self.direction)
        grad = self._gradients(source, self.layers[-1] + 1, self.subject.n_layers - 1, readout)
        target_row = torch.tensor([n - 1])
        fill(target_row, grad, n_slots - 1)
        logits = self.logits
        metric = float(
            logits[self.token] - (logits[self.contrast] if self.contrast is not None else 0.0)
        )
        inputs[n - 1] = metric
        return Graph(
            tokens=self.prompt.tokens,
            layers=self.layers,
            features=features,
            activations=activations.cpu(),
            errors=errors,
            position=self.position,
            target=self._prediction(self.token),
            contrast=None if self.contrast is None else self._prediction(self.contrast),
            metric=metric,
            adjacency=A,
            bias=bias,
            inputs=inputs,
            n_folded=n_folded,
        )

    def _prediction(self, token_id: int) -> Prediction:
        probs = self.logits.softmax(-1)
        text = self.subject.tokenizer.decode([token_id])
        return Prediction(token_id, text, float(self.logits[token_id]), float(probs[token_id]))


class _FeatureReadout:
    """Pre-activation of feature ``idx[b]`` at position ``pos[b]`` on copy b of the prompt."""

    def __init__(self, sae: SAE, pos: torch.Tensor, idx: torch.Tensor):
        self.sae, self.pos, self.idx, self.n = sae, pos, idx, len(pos)
        self.last = int(pos.max())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (n, seq, d) -> (n,)
        rows = torch.arange(self.n, device=x.device)
        w = self.sae.W_enc[:, self.idx].T  # (n, d)
        return (x[rows, self.pos] * w).sum(-1)  # the linear part; the bias has no gradient


class _MetricReadout:
    """The target metric ``u · norm(x)`` at the target position (one copy)."""

    n = 1

    def __init__(self, freezer: Freezer, position: int, direction: torch.Tensor):
        self.freezer, self.position, self.direction = freezer, position, direction
        self.last = position

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.freezer.final_norm(x)[:, self.position] @ self.direction  # the norm's
        # frozen scales are per position, so it runs on the whole sequence


@contextlib.contextmanager
def replacement_model(
    subject: Subject,
    saes: Sequence[GraphSae],
    prompt: str | Prompt,
    target: Target | None = None,
) -> Iterator[ReplacementModel]:
    """The replacement model of ``prompt`` (target: the top next token by default), its hooks
    installed for the ``with`` block."""
    model = ReplacementModel(subject, saes, as_prompt(subject, prompt), target or Target())
    with model.freezer.installed():
        model._start()
        yield model


def build_graph(
    subject: Subject,
    saes: Sequence[GraphSae],
    prompt: str | Prompt,
    target: Target | None = None,
    *,
    limits: GraphLimits = GraphLimits(),
    progress: Progress | None = None,
) -> Graph:
    """The attribution graph of ``target`` on ``prompt`` (see the module doc)."""
    if progress:
        progress("running the prompt", 0, 1)
    with replacement_model(subject, saes, prompt, target) as model:
        return model.graph(limits, progress)


def predicted_change(graph: Graph, node: int, delta: float) -> float:
    """The change of the target metric that the graph predicts when feature ``node``'s
    activation changes by ``delta``: propagated along the edges (``A[t, s] / a_s`` per unit of
    source activation), each active feature passing its input change on one-to-one."""
    n_f = graph.n_features
    change = torch.zeros(graph.n_nodes, dtype=torch.float64)
    change[node] = delta
    per_unit = graph.adjacency.double().clone()
    per_unit[:, :n_f] /= graph.activations.double()[None, :]
    slots = graph.features[:, 0]
    for slot in range(int(slots[node]) + 1, len(graph.layers)):
        rows = (slots == slot).nonzero()[:, 0]
        change[rows] = per_unit[rows, :n_f] @ change[:n_f]
    return float(per_unit[graph.target_index, :n_f] @ change[:n_f])
