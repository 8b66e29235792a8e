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
from sae_core.live.freeze import Freezer
from sae_core.live.graph_settings import DEFAULT_LIMITS, GraphError, GraphLimits
from sae_core.live.probe import Prompt, as_prompt
from sae_core.live.results import Prediction, PromptToken
from sae_core.saes.sae import SAE

Progress = Callable[[str, int, int], None]  # (stage, done, total)


class GraphSae(NamedTuple):
    layer: int  # block whose output the SAE reads
    sae: SAE


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


class _Nodes(NamedTuple):
    """Which node is which, by index: features (by slot, position, index), error nodes (by
    slot, non-special position), embeddings (by position), the target last."""

    active: list[torch.Tensor]  # per slot (n, 2): position, feature of each active feature
    features: torch.Tensor  # (n_features, 3) long: slot, position, feature
    activations: torch.Tensor  # (n_features,)
    errors: torch.Tensor  # (n_errors, 2) long: slot, position
    keep_positions: torch.Tensor  # (n_keep,) non-special positions, which have error nodes
    f_start: list[int]  # first feature row of each slot, and the total
    seq: int

    @classmethod
    def of(cls, codes: list[_LayerCode], keep: torch.Tensor) -> _Nodes:
        active = [code.f.nonzero() for code in codes]  # row-major: sorted by position
        features = torch.cat(
            [torch.cat([torch.full((len(a), 1), s), a.cpu()], dim=1) for s, a in enumerate(active)]
        ).long()
        activations = torch.cat(
            [code.f[a[:, 0], a[:, 1]] for code, a in zip(codes, active, strict=True)]
        ).cpu()
        kept = keep.nonzero()[:, 0].cpu()
        errors = torch.cat(
            [torch.stack([torch.full_like(kept, s), kept], 1) for s in range(len(codes))]
        ).long()
        f_start = [0]
        for a in active:
            f_start.append(f_start[-1] + len(a))
        return cls(active, features, activations, errors, kept, f_start, len(keep))

    @property
    def n(self) -> int:
        return len(self.features) + len(self.errors) + self.seq + 1

    def feature_rows(self, slot: int) -> torch.Tensor:
        return torch.arange(self.f_start[slot], self.f_start[slot + 1])

    def feature_cols(self, slot: int) -> slice:
        return slice(self.f_start[slot], self.f_start[slot + 1])

    def error_cols(self, slot: int) -> slice:
        start = len(self.features) + slot * len(self.keep_positions)
        return slice(start, start + len(self.keep_positions))

    def embedding_cols(self) -> slice:
        start = len(self.features) + len(self.errors)
        return slice(start, start + self.seq)


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

    def graph(self, limits: GraphLimits = DEFAULT_LIMITS, progress: Progress | None = None) -> Graph:
        n_folded = self._fold(limits.max_features, progress)
        nodes = _Nodes.of(self.codes, self.keep)
        dtype = self.codes[0].x.dtype  # float32, or float64 for checks to many digits
        A = torch.zeros(nodes.n, nodes.n, dtype=dtype)
        bias = torch.zeros(nodes.n, dtype=dtype)
        inputs = torch.zeros(nodes.n, dtype=dtype)
        for slot in range(len(self.saes)):
            self._edges_into_layer(slot, nodes, A, bias, inputs, limits.batch_size, progress)
        if progress:
            progress("edges into the target", 0, 1)
        readout = _MetricReadout(self.freezer, self.position, self.direction)
        last = len(self.saes) - 1
        grad = self._gradients(
            self._residual(last), self.layers[-1] + 1, self.subject.n_layers - 1, readout
        )
        self._send(nodes, A, bias, torch.tensor([nodes.n - 1]), grad, last)
        logits = self.logits
        metric = float(
            logits[self.token] - (logits[self.contrast] if self.contrast is not None else 0.0)
        )
        inputs[nodes.n - 1] = metric
        return Graph(
            tokens=self.prompt.tokens,
            layers=self.layers,
            features=nodes.features,
            activations=nodes.activations,
            errors=nodes.errors,
            position=self.position,
            target=self._prediction(self.token),
            contrast=None if self.contrast is None else self._prediction(self.contrast),
            metric=metric,
            adjacency=A,
            bias=bias,
            inputs=inputs,
            n_folded=n_folded,
        )

    def _residual(self, slot: int) -> torch.Tensor:
        """(seq, d) what slot ``slot`` (-1: the embeddings) sends on."""
        if slot < 0:
            return self.freezer.block_inputs[0][0]
        code = self.codes[slot]
        r = self.saes[slot].sae.decode(code.f) + code.error
        return (r * self.keep[:, None] + code.held).detach()

    def _edges_into_layer(self, slot, nodes: _Nodes, A, bias, inputs, batch_size, progress) -> None:
        """Every feature node of ``slot``: its input, its bias, its edges from the slot below
        (the embeddings below the first), one backward pass per ``batch_size`` of them."""
        layer, sae = self.saes[slot]
        first = self.layers[slot - 1] + 1 if slot else 0
        source = self._residual(slot - 1)
        rows = nodes.feature_rows(slot)
        pos, idx = nodes.active[slot][:, 0], nodes.active[slot][:, 1]
        with torch.no_grad():
            inputs[rows] = sae.pre_acts(self.codes[slot].x)[pos, idx].cpu()  # (seq, d_sae) -> (n,)
            bias[rows] = sae.pre_acts(torch.zeros_like(sae.b_dec))[idx].cpu()
        for b in range(0, len(rows), batch_size):
            if progress:
                progress(f"edges into layer {layer}", b, len(rows))
            batch = slice(b, b + batch_size)
            readout = _FeatureReadout(sae, pos[batch], idx[batch])
            grad = self._gradients(source, first, layer, readout)
            self._send(nodes, A, bias, rows[batch], grad, slot - 1)

    def _send(self, nodes: _Nodes, A, bias, rows: torch.Tensor, grad: torch.Tensor, slot: int):
        """Edges into nodes ``rows`` (n,) from slot ``slot``'s nodes (-1: the embeddings), given
        the (n, seq, d) gradients at that slot's residual; its constant part into ``bias``."""
        if slot < 0:
            emb = self.freezer.block_inputs[0][0]  # (seq, d)
            A[rows, nodes.embedding_cols()] = (grad * emb).sum(-1).cpu()
            return
        code, sae = self.codes[slot], self.saes[slot].sae
        pos, idx = nodes.active[slot][:, 0], nodes.active[slot][:, 1]
        proj = grad @ sae.W_dec.detach()[idx].T  # (n, seq, n_src)
        cols = torch.arange(len(idx), device=proj.device)
        A[rows, nodes.feature_cols(slot)] = (proj[:, pos, cols] * code.f[pos, idx]).cpu()
        kept = nodes.keep_positions.to(grad.device)
        A[rows, nodes.error_cols(slot)] = (grad[:, kept] * code.error[kept]).sum(-1).cpu()
        constant = sae.b_dec.detach() * self.keep[:, None] + code.held  # (seq, d)
        bias[rows] += (grad * constant).sum((1, 2)).cpu()

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
    limits: GraphLimits = DEFAULT_LIMITS,
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
