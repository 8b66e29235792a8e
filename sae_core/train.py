"""Training sparse autoencoders on cached residual-stream activations (REFERENCE §1).

Three recipes, chosen by ``TrainConfig.architecture``:

- ``topk`` (default; OpenAI 2024): f = TopK(W_enc (x - b_dec) + b_enc), loss = FVU + AuxK/32,
  unit-norm decoder rows. Saved as SAELens ``topk``.
- ``batchtopk`` (Bussmann et al. 2024): the k·batch largest pre-activations over the whole batch;
  saved as ``jumprelu`` with one global threshold: the mean over a few batches of the smallest
  selected value, measured with the final weights.
- ``relu`` (Anthropic, Scaling Monosemanticity): loss = ||x - x̂||² + λ Σ f_i ||W_dec_i||, λ warmed
  up over the first 5% of steps, decoder unconstrained. Saved as SAELens ``standard``.

Training runs on scaled inputs c·x with E||c·x|| = sqrt(d_model); the scale is folded into the
saved weights, so a saved SAE takes raw activations.

Speed: the TopK encoder's backward and the decoder touch only the selected (token, latent)
pairs (a sparse matmul for dW_enc, ``embedding_bag`` for the decoder), so a step costs one dense
(batch × d_model × width) matmul instead of five.

Across ranks (``torchrun --nproc-per-node N -m sae_core train ...``, sae_core.distributed): each
rank takes an equal slice of every batch; whatever depends on the whole batch (its variance, the
BatchTopK threshold, which latents fired) is all-reduced, and so are the gradients, so every rank
takes the step one process would take on the whole batch. Rank 0 alone writes files.

Memory budget (fp32, width W, d_model d, batch B): parameters, gradients and Adam's two moments
are 4 × 2·W·d floats (150 MB for W=8192, d=576); a step holds the (B, W) pre-activations once
(134 MB at B=4096) for TopK, about four such tensors for ``relu``. ``memory_estimate`` says it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from tqdm import tqdm

from sae_core import distributed
from sae_core.errors import SaescopeError
from sae_core.sae import SAE, SAEConfig, default_width

ARCHITECTURES = ("topk", "batchtopk", "relu")
SAVED_ARCHITECTURE = {"topk": "topk", "batchtopk": "jumprelu", "relu": "standard"}
CHECKPOINT = "checkpoint.pt"
# Tokens read to estimate the input scale: the mean norm settles to well under 1% by then.
SCALE_SAMPLE_TOKENS = 1 << 17
# Tokens whose geometric median initialises b_dec (Weiszfeld converges in a few steps).
MEDIAN_SAMPLE_TOKENS = 4096


class TrainError(SaescopeError):
    """A training run that cannot start or resume as asked."""


@dataclass
class TrainConfig:
    # -- what to read -----------------------------------------------------------------------
    model: str = "smollm2-135m"  # the embedded default subject runs offline
    layer: int = 15  # the middle of SmolLM2's 30 blocks, where Scaling Monosemanticity looks
    corpus: str = "default"  # stdlib sources + pydoc topics: on disk, no network needed
    text_field: str = "text"  # JSONL / datasets field, the common name
    ctx_len: int = 64  # short windows keep the subject's forward cheap; enough context mid-model
    # -- the SAE ----------------------------------------------------------------------------
    architecture: str = "topk"  # TopK needs no sparsity tuning and shows no shrinkage
    width: int | None = None  # None: power of two nearest 16·d_model (8192 for SmolLM2)
    k: int = 32  # REFERENCE sweeps 16–128; 32 balances reconstruction and interpretability
    l1_coeff: float = 5.0  # λ of the relu recipe; Anthropic's value for inputs scaled to sqrt(d)
    # -- optimisation -----------------------------------------------------------------------
    tokens: int = 2_000_000  # about 25 minutes of training on two CPU cores
    cache_tokens: int | None = None  # activations cached and cycled; None: `tokens` (one epoch).
    # Fewer tokens = several epochs: the subject's forward pass is the slow part on a CPU.
    batch_size: int = 4096  # the recipe's batch: large enough for stable TopK statistics
    lr: float | None = None  # None: 2e-4/sqrt(width/16384) (TopK), 5e-5 (relu), per the papers
    warmup_steps: int = 1000  # linear lr warm-up; capped at 5% of the steps for short runs
    decay_fraction: float = 0.2  # lr decays linearly to 0 over this last part of the run
    grad_clip: float = 1.0  # Anthropic clips at norm 1; harmless for TopK's O(1) FVU loss
    aux_k: int | None = None  # None: d_model // 2 dead latents reconstruct the residual (OpenAI)
    aux_coeff: float = 1 / 32  # OpenAI's AuxK weight: revives dead latents, barely moves the MSE
    dead_tokens: int | None = None  # None: min(10M, tokens/10): OpenAI's window, scaled to the run
    # BatchTopK's θ averages this many batches' smallest selected value after training; the
    # per-batch value varies by ~1%. (A running mean kept during training lags the weights: after
    # a 300-step run it sat 13% high and cut SmolLM2's inference L0 from 32 to 19.)
    threshold_batches: int = 16
    seed: int = 0  # initialisation and corpus shuffling
    checkpoint_every: int = 50  # steps; ~1 minute of CPU work lost at most on a kill
    # -- evaluation -------------------------------------------------------------------------
    eval_contexts: int = 256  # held-out contexts (16k tokens at ctx_len 64): CE within ~0.01
    device: str = "cpu"  # where the subject and SAE run

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise TrainError(
                f"unknown architecture {self.architecture!r}; choose one of {', '.join(ARCHITECTURES)}"
            )
        for name in ("tokens", "batch_size", "k", "checkpoint_every", "eval_contexts"):
            if getattr(self, name) <= 0:
                raise TrainError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")

    @property
    def total_steps(self) -> int:
        return max(1, self.tokens // self.batch_size)

    def resolved_width(self, d_model: int) -> int:
        return self.width or default_width(d_model)

    def resolved_lr(self, width: int) -> float:
        if self.lr is not None:
            return self.lr
        if self.architecture == "relu":
            return 5e-5
        return 2e-4 / math.sqrt(width / 16384)

    def resolved_aux_k(self, d_model: int) -> int:
        return self.aux_k if self.aux_k is not None else max(1, d_model // 2)

    def resolved_dead_tokens(self) -> int:
        return self.dead_tokens if self.dead_tokens is not None else min(10_000_000, self.tokens // 10)


def memory_estimate(cfg: TrainConfig, d_model: int) -> int:
    """Bytes a training step needs: weights + grads + Adam moments, and the per-step tensors."""
    width = cfg.resolved_width(d_model)
    state = 4 * 2 * width * d_model * 4
    per_step = (4 if cfg.architecture == "relu" else 1) * cfg.batch_size * width * 4
    return state + per_step


# ---------------------------------------------------------------------------------------------
# Data


class TokenSource(Protocol):
    """What training reads: ``sae_core.activations.ActivationCache`` or a ``TensorSource``."""

    n_tokens: int
    d_model: int

    def token_batches(
        self, batch_size: int, *, start: int = 0, stop: int | None = None
    ) -> Iterator[torch.Tensor]: ...


@dataclass
class TensorSource:
    """An in-memory (n_tokens, d_model) tensor, already shuffled, read in order."""

    data: torch.Tensor  # (n_tokens, d_model)

    @property
    def n_tokens(self) -> int:
        return self.data.shape[0]

    @property
    def d_model(self) -> int:
        return self.data.shape[1]

    def token_batches(self, batch_size: int, *, start: int = 0, stop: int | None = None):
        stop = self.n_tokens if stop is None else stop
        for begin in range(start, stop, batch_size):
            yield self.data[begin : min(begin + batch_size, stop)].float()


def batches_from(
    source: TokenSource, batch_size: int, first_step: int, max_tokens: int
) -> Iterator[torch.Tensor]:
    """Full batches from the first ``max_tokens`` tokens forever, cycling epochs; batch ``i`` is
    the same tensor in every run, so a resumed run reads what the uninterrupted one would."""
    per_epoch = min(source.n_tokens, max_tokens) // batch_size
    if per_epoch == 0:
        raise TrainError(
            f"the activation source holds {source.n_tokens} tokens, fewer than one batch of "
            f"{batch_size}; lower --batch-size or cache more tokens"
        )
    step = first_step % per_epoch
    while True:
        yield from source.token_batches(batch_size, start=step * batch_size, stop=per_epoch * batch_size)
        step = 0


def estimate_scale(source: TokenSource, d_model: int) -> float:
    """c with E||c·x|| = sqrt(d_model), from the first SCALE_SAMPLE_TOKENS tokens."""
    total, count = 0.0, 0
    for batch in source.token_batches(4096, stop=min(source.n_tokens, SCALE_SAMPLE_TOKENS)):
        total += batch.double().norm(dim=-1).sum().item()
        count += batch.shape[0]
    return math.sqrt(d_model) / (total / count)


def geometric_median(points: torch.Tensor, iterations: int = 20) -> torch.Tensor:
    """(n, d) -> (d,) by Weiszfeld's algorithm, started at the mean."""
    median = points.mean(dim=0)
    for _ in range(iterations):
        weights = 1.0 / (points - median).norm(dim=-1).clamp_min(1e-8)  # (n,)
        median = (weights[:, None] * points).sum(dim=0) / weights.sum()
    return median


# ---------------------------------------------------------------------------------------------
# Sparse TopK machinery


class SparseCodes(NamedTuple):
    """Active (token, latent) pairs of a batch, rows sorted, as ``embedding_bag`` wants them."""

    rows: torch.Tensor  # (n,) token index in the batch
    latents: torch.Tensor  # (n,) latent index
    values: torch.Tensor  # (n,) activation, differentiable
    offsets: torch.Tensor  # (batch,) start of each token's pairs in rows/latents/values


class _PreActsAt(torch.autograd.Function):
    """Encoder pre-activations (x - b_dec) @ W_enc + b_enc at chosen (row, latent) pairs.

    ``z`` is that dense product, computed once without autograd for the selection; the backward
    uses only the chosen pairs: a sparse (width × batch) @ (batch × d) matmul for W_enc, and
    for b_dec the identity Σ_rows ∂/∂b_dec = -W_enc @ (∂/∂b_enc). The data x gets no gradient.
    """

    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, rows, latents, z):
        ctx.save_for_backward(x, b_dec, W_enc, rows, latents)
        return z[rows, latents]

    @staticmethod
    def backward(ctx, grad):  # grad: (n,)
        x, b_dec, W_enc, rows, latents = ctx.saved_tensors
        batch, width = x.shape[0], W_enc.shape[1]
        grad_b_enc = torch.zeros(width, dtype=grad.dtype, device=grad.device).index_add_(0, latents, grad)
        pairs_t = _sparse(latents, rows, grad, (width, batch))
        grad_w = torch.sparse.mm(pairs_t, x - b_dec).t()  # (d, width)
        return None, -(W_enc @ grad_b_enc), grad_w, grad_b_enc, None, None, None


def _sparse(row, col, values, size) -> torch.Tensor:
    return torch.sparse_coo_tensor(torch.stack([row, col]), values, size, check_invariants=False)


def codes_at(sae: SAE, x: torch.Tensor, z: torch.Tensor, rows: torch.Tensor, latents: torch.Tensor) -> SparseCodes:
    """ReLU'd, differentiable activations at the selected pairs (rows sorted ascending)."""
    values = torch.relu(_PreActsAt.apply(x, sae.b_dec, sae.W_enc, sae.b_enc, rows, latents, z))
    counts = torch.bincount(rows, minlength=x.shape[0])
    offsets = torch.cumsum(counts, 0) - counts
    return SparseCodes(rows, latents, values, offsets)


def decode_sparse(W_dec: torch.Tensor, codes: SparseCodes) -> torch.Tensor:
    """Σ over a token's pairs of value · W_dec[latent]: (batch, d), no bias."""
    return F.embedding_bag(
        codes.latents, W_dec, codes.offsets, mode="sum", per_sample_weights=codes.values
    )


def select_topk(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest latents of each row: (rows, latents), each (batch·k,)."""
    latents = z.topk(k, dim=-1, sorted=False).indices  # (batch, k)
    rows = torch.arange(z.shape[0], device=z.device).repeat_interleave(k)
    return rows, latents.flatten()


def select_batch_topk(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k·batch largest positive pre-activations of the whole batch (all ranks' slices):
    this rank's (rows, latents).

    Fast path: the global threshold among each row's top 4k candidates; exact unless a row has
    all its candidates above it, in which case the threshold comes from every row's top k·batch.
    """
    n = k * z.shape[0] * distributed.world().size
    width = z.shape[1]
    candidates = z.topk(min(width, 4 * k), dim=-1, sorted=False).values  # (batch, ≤4k)
    gathered = distributed.all_gather(candidates.flatten(), step="the BatchTopK threshold")
    threshold = gathered.kthvalue(gathered.numel() - n + 1).values
    short = torch.tensor(int(candidates.shape[1] < width and (candidates.amin(dim=-1) >= threshold).any()))
    if distributed.all_reduce(short, "max", step="the BatchTopK threshold"):
        best = z.flatten().topk(min(n, z.numel()), sorted=False).values
        gathered = distributed.all_gather(best, step="the BatchTopK threshold")
        threshold = gathered.kthvalue(gathered.numel() - n + 1).values
    rows, latents = ((z >= threshold) & (z > 0)).nonzero(as_tuple=True)
    return rows, latents


def select_dead(z: torch.Tensor, dead: torch.Tensor, k_aux: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k_aux largest pre-activations among dead latents of each row: (rows, latents)."""
    masked = torch.where(dead, z, torch.tensor(-torch.inf, device=z.device))
    return select_topk(masked, min(k_aux, int(dead.sum())))


# ---------------------------------------------------------------------------------------------
# One step


@dataclass
class TrainState:
    """Everything a checkpoint holds; resuming from it reproduces the uninterrupted run."""

    sae: SAE  # in scaled units; `fold_scale` makes the saved one
    optimizer: torch.optim.Optimizer
    scale: float  # c with E||c·x|| = sqrt(d_model)
    step: int = 0
    tokens_since_fired: torch.Tensor | None = None  # (width,) int64


class StepStats(NamedTuple):
    loss: float
    explained_variance: float  # 1 - FVU of this batch (about the batch mean)
    l0: float
    dead_fraction: float  # latents silent for more than the dead window


class Forward(NamedTuple):
    x_hat: torch.Tensor  # (batch, d)
    loss: torch.Tensor  # scalar, for backward
    fired: torch.Tensor  # (width,) bool: latents active in this batch
    l0: float


def forward_sparse(state: TrainState, x: torch.Tensor, cfg: TrainConfig, dead: torch.Tensor) -> Forward:
    """TopK or BatchTopK reconstruction + AuxK loss, both normalised by the batch variance."""
    sae = state.sae
    with torch.no_grad():
        z = (x - sae.b_dec) @ sae.W_enc + sae.b_enc  # (batch, width): the one dense matmul
    if cfg.architecture == "topk":
        rows, latents = select_topk(z, cfg.k)
    else:
        rows, latents = select_batch_topk(z, cfg.k)
    codes = codes_at(sae, x, z, rows, latents)
    x_hat = decode_sparse(sae.W_dec, codes) + sae.b_dec
    total_variance = batch_variance(x)
    loss = (x_hat - x).pow(2).sum() / total_variance
    n_dead = int(dead.sum())
    if n_dead:
        k_aux = cfg.resolved_aux_k(x.shape[1])
        aux_rows, aux_latents = select_dead(z, dead, k_aux)
        residual = (x - x_hat).detach()
        aux_hat = decode_sparse(sae.W_dec, codes_at(sae, x, z, aux_rows, aux_latents))
        aux_loss = (aux_hat - residual).pow(2).sum() / total_variance
        loss = loss + cfg.aux_coeff * min(n_dead / k_aux, 1.0) * aux_loss
    fired = torch.zeros(z.shape[1], dtype=torch.bool, device=z.device)
    fired[latents[codes.values.detach() > 0]] = True
    return Forward(x_hat, loss, fired, float((codes.values > 0).sum()) / x.shape[0])


def batch_variance(x: torch.Tensor) -> torch.Tensor:
    """Σ ||x - mean||² over the whole batch (every rank's slice of it, all equal in size)."""
    mean = distributed.all_reduce(x.sum(dim=0), step="the batch mean") / (x.shape[0] * distributed.world().size)
    return distributed.all_reduce((x - mean).pow(2).sum(), step="the batch variance")


@torch.no_grad()
def calibrate_threshold(state: TrainState, source: TokenSource, cfg: TrainConfig, rows: range) -> float:
    """BatchTopK -> JumpReLU θ: the mean over cfg.threshold_batches batches (the first ones, so a
    resumed run gets the same) of the smallest activation BatchTopK selects, with the final weights."""
    sae = state.sae
    batches = batches_from(source, cfg.batch_size, 0, cfg.cache_tokens or cfg.tokens)
    smallest = []
    for _ in range(cfg.threshold_batches):
        x = next(batches)[rows.start : rows.stop].to(sae.W_enc.device) * state.scale
        z = (x - sae.b_dec) @ sae.W_enc + sae.b_enc  # (batch, width)
        selected_rows, selected_latents = select_batch_topk(z, cfg.k)
        selected = z[selected_rows, selected_latents]
        local = selected.min() if selected.numel() else torch.tensor(torch.inf, device=z.device)
        value = float(distributed.all_reduce(local.reshape(1).clone(), "min", step="the BatchTopK threshold"))
        if math.isfinite(value):
            smallest.append(value)
    return sum(smallest) / len(smallest) if smallest else 0.0


def forward_relu(state: TrainState, x: torch.Tensor, cfg: TrainConfig) -> Forward:
    """Anthropic's loss: mean ||x - x̂||² + λ_t · mean Σ_i f_i ||W_dec_i||, λ warmed up over 5%
    (means over the whole batch: this rank's sums over its slice, divided by the batch size)."""
    sae = state.sae
    f = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)  # (batch, width)
    x_hat = f @ sae.W_dec + sae.b_dec
    batch = x.shape[0] * distributed.world().size
    mse = (x_hat - x).pow(2).sum() / batch
    penalty = (f * sae.W_dec.norm(dim=-1)).sum() / batch
    l1_scale = min(1.0, (state.step + 1) / max(1, int(0.05 * cfg.total_steps)))
    active = (f > 0).detach()
    return Forward(x_hat, mse + cfg.l1_coeff * l1_scale * penalty, active.any(dim=0), float(active.sum()) / x.shape[0])


def learning_rate(cfg: TrainConfig, base: float, step: int) -> float:
    """Linear warm-up (≤ 5% of the run), flat, then linear decay to 0 over the last 20%."""
    total = cfg.total_steps
    warmup = max(1, min(cfg.warmup_steps, int(0.05 * total)))
    decay_start = int((1 - cfg.decay_fraction) * total)
    factor = min(1.0, (step + 1) / warmup)
    if step >= decay_start:
        factor *= (total - step) / max(1, total - decay_start)
    return base * factor


def train_step(state: TrainState, x: torch.Tensor, cfg: TrainConfig, base_lr: float) -> StepStats:
    """One optimiser step on a raw batch (batch, d): scale, forward, backward, update, bookkeeping."""
    sae = state.sae
    x = x.to(sae.W_enc.device) * state.scale
    dead = state.tokens_since_fired > cfg.resolved_dead_tokens()
    if cfg.architecture == "relu":
        out = forward_relu(state, x, cfg)
    else:
        out = forward_sparse(state, x, cfg, dead)
    state.optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    all_reduce_grads(sae)
    if cfg.architecture != "relu":
        remove_parallel_grad(sae.W_dec)
    torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
    for group in state.optimizer.param_groups:
        group["lr"] = learning_rate(cfg, base_lr, state.step)
    state.optimizer.step()
    if cfg.architecture != "relu":
        normalise_rows(sae.W_dec)
    fired = distributed.all_reduce(out.fired.to(torch.uint8), "max", step="which latents fired").bool()
    state.tokens_since_fired += x.shape[0] * distributed.world().size
    state.tokens_since_fired[fired] = 0
    state.step += 1
    with torch.no_grad():
        error = distributed.all_reduce((out.x_hat - x).pow(2).sum(), step="the batch error")
        fvu = error / batch_variance(x)
    return StepStats(float(out.loss.detach()), 1.0 - float(fvu), out.l0, float(dead.float().mean()))


@torch.no_grad()
def all_reduce_grads(sae: SAE) -> None:
    """Sum every rank's gradients (one flat buffer): each rank's loss is its slice's share of the
    whole batch's loss, so the sum is the whole batch's gradient."""
    if distributed.world().size == 1:
        return
    params = list(sae.parameters())
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = distributed.all_reduce(torch.cat([p.grad.reshape(-1) for p in params]), step="the gradient all-reduce")
    for p, part in zip(params, flat.split([p.numel() for p in params]), strict=True):
        p.grad.copy_(part.view_as(p))


@torch.no_grad()
def remove_parallel_grad(W_dec: torch.nn.Parameter) -> None:
    """Keep unit-norm decoder rows on their sphere: drop the gradient along each row."""
    if W_dec.grad is not None:
        W_dec.grad -= (W_dec.grad * W_dec).sum(dim=-1, keepdim=True) * W_dec


@torch.no_grad()
def normalise_rows(W_dec: torch.nn.Parameter) -> None:
    W_dec /= W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)


# ---------------------------------------------------------------------------------------------
# Initialisation, checkpoints, the loop


def init_state(cfg: TrainConfig, source: TokenSource) -> TrainState:
    """Scale from the data, decoder rows random (unit norm for TopK, 0.1 for relu), W_enc = W_decᵀ,
    b_dec the geometric median of a sample."""
    d_model = source.d_model
    width = cfg.resolved_width(d_model)
    torch.manual_seed(cfg.seed)
    scale = estimate_scale(source, d_model)
    sae = SAE(SAEConfig(d_in=d_model, d_sae=width, architecture="standard"))
    with torch.no_grad():
        directions = torch.randn(width, d_model)
        directions /= directions.norm(dim=-1, keepdim=True)
        sae.W_dec.copy_(directions * (0.1 if cfg.architecture == "relu" else 1.0))
        sae.W_enc.copy_(sae.W_dec.t())
        sample = next(source.token_batches(min(MEDIAN_SAMPLE_TOKENS, source.n_tokens))) * scale
        sae.b_dec.copy_(geometric_median(sample))
    sae.to(cfg.device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.resolved_lr(width), betas=(0.9, 0.999), fused=True)
    return TrainState(
        sae=sae,
        optimizer=optimizer,
        scale=scale,
        tokens_since_fired=torch.zeros(width, dtype=torch.long, device=cfg.device),
    )


def save_checkpoint(folder: Path, state: TrainState, cfg: TrainConfig) -> None:
    """Write everything needed to continue, atomically (a kill leaves the previous one intact)."""
    payload = {
        "config": asdict(cfg),
        "step": state.step,
        "scale": state.scale,
        "sae": state.sae.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "tokens_since_fired": state.tokens_since_fired,
        "rng": torch.get_rng_state(),
    }
    tmp = folder / (CHECKPOINT + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, folder / CHECKPOINT)


def load_checkpoint(folder: Path, cfg: TrainConfig, source: TokenSource) -> TrainState:
    path = folder / CHECKPOINT
    payload = torch.load(path, map_location=cfg.device, weights_only=True)
    changed = sorted(name for name, value in comparable(cfg).items() if payload["config"].get(name) != value)
    if changed:
        raise TrainError(
            f"{path} was written with different settings ({', '.join(changed)}); "
            "resume with the same arguments, or train into a new --out folder"
        )
    width = cfg.resolved_width(source.d_model)
    sae = SAE(SAEConfig(d_in=source.d_model, d_sae=width, architecture="standard")).to(cfg.device)
    sae.load_state_dict(payload["sae"])
    optimizer = torch.optim.Adam(sae.parameters(), fused=True)
    optimizer.load_state_dict(payload["optimizer"])
    torch.set_rng_state(payload["rng"])
    return TrainState(
        sae=sae,
        optimizer=optimizer,
        scale=payload["scale"],
        step=payload["step"],
        tokens_since_fired=payload["tokens_since_fired"],
    )


class FitResult(NamedTuple):
    sae: SAE  # inference SAE taking raw activations (scale folded in)
    scale: float  # the input scale used in training
    steps: int
    tokens: int  # tokens trained on
    dead_fraction: float  # latents silent for longer than the dead window at the end


def fit(
    source: TokenSource, cfg: TrainConfig, folder: str | Path, *, resume: bool = False, progress: bool = True
) -> FitResult:
    """Train on ``source`` for cfg.tokens tokens, checkpointing into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    me = distributed.world()
    if cfg.batch_size % me.size:
        raise TrainError(f"--batch-size {cfg.batch_size} does not split evenly over {me.size} ranks; use a multiple of {me.size}")
    rows = distributed.shard_range(cfg.batch_size)  # this rank's slice of every batch
    has_checkpoint = (folder / CHECKPOINT).is_file()
    if has_checkpoint and not resume:
        raise TrainError(f"{folder} holds an unfinished run; pass --resume to continue it, or choose another --out")
    state = load_checkpoint(folder, cfg, source) if has_checkpoint else init_state(cfg, source)
    base_lr = cfg.resolved_lr(cfg.resolved_width(source.d_model))
    total = cfg.total_steps
    bar = tqdm(
        total=total * cfg.batch_size,
        initial=state.step * cfg.batch_size,
        unit="tok",
        unit_scale=True,
        disable=not (progress and me.is_main),
        desc=f"train {cfg.architecture}",
    )
    batches = batches_from(source, cfg.batch_size, state.step, cfg.cache_tokens or cfg.tokens)
    with bar:
        while state.step < total:
            stats = train_step(state, next(batches)[rows.start : rows.stop], cfg, base_lr)
            bar.update(cfg.batch_size)
            bar.set_postfix(
                L0=f"{stats.l0:.1f}", EV=f"{stats.explained_variance:.3f}", dead=f"{stats.dead_fraction:.3f}", refresh=False
            )
            if me.is_main and (state.step % cfg.checkpoint_every == 0 or state.step == total):
                save_checkpoint(folder, state, cfg)
    dead = state.tokens_since_fired > cfg.resolved_dead_tokens()
    threshold = calibrate_threshold(state, source, cfg, rows) if cfg.architecture == "batchtopk" else None
    return FitResult(
        sae=fold_scale(state, cfg, threshold),
        scale=state.scale,
        steps=state.step,
        tokens=state.step * cfg.batch_size,
        dead_fraction=float(dead.float().mean()),
    )


def fold_scale(state: TrainState, cfg: TrainConfig, threshold: float | None = None) -> SAE:
    """The inference SAE on raw x: f(c·x) = act(c·W_enc (x - b_dec/c) + b_enc), x̂ = (W_dec f + b_dec)/c.

    ``threshold`` is BatchTopK's θ (pre-activations are the same in both units)."""
    trained, c = state.sae, state.scale
    saved_arch = SAVED_ARCHITECTURE[cfg.architecture]
    sae_cfg = SAEConfig(
        d_in=trained.d_in,
        d_sae=trained.d_sae,
        architecture=saved_arch,
        k=cfg.k if cfg.architecture != "relu" else None,
    )
    tensors = {
        "W_enc": trained.W_enc.detach().cpu() * c,
        "b_enc": trained.b_enc.detach().cpu(),
        "W_dec": trained.W_dec.detach().cpu() / c,
        "b_dec": trained.b_dec.detach().cpu() / c,
    }
    if saved_arch == "jumprelu":
        tensors["threshold"] = torch.full((trained.d_sae,), threshold or 0.0)
    return SAE.from_tensors(sae_cfg, tensors, origin="training")


def with_metadata(sae: SAE, **fields) -> SAE:
    """A copy of ``sae`` whose config carries model/hook/layer/saescope fields."""
    cfg = dataclasses.replace(sae.cfg, **fields)
    return SAE.from_tensors(cfg, dict(sae.named_parameters()), origin="training")


# ---------------------------------------------------------------------------------------------
# The pipeline: corpus -> activation cache -> fit -> save -> evaluate


class Split(NamedTuple):
    train: object  # sae_core.corpus.Contexts: the contexts training may read
    held_out: object  # the last contexts of the corpus, never trained on


def held_out_split(contexts, n_eval: int) -> Split:
    """The last min(n_eval, 20%) contexts are held out; training and `evaluate` agree on them."""
    n_eval = min(n_eval, len(contexts) // 5)
    if n_eval == 0:
        raise TrainError(f"the corpus {contexts.spec!r} has only {len(contexts)} contexts; it needs at least 5")
    n_train = len(contexts) - n_eval

    def rows(begin, end, tag):
        return dataclasses.replace(
            contexts,
            tokens=contexts.tokens[begin:end],
            special_mask=contexts.special_mask[begin:end],
            fingerprint=f"{contexts.fingerprint}-{tag}{begin}-{end}",
        )

    return Split(rows(0, n_train, "train"), rows(n_train, len(contexts), "heldout"))


def comparable(cfg: TrainConfig) -> dict:
    """The settings that decide what a run produces (where it runs does not)."""
    return {name: value for name, value in asdict(cfg).items() if name != "device"}


def trained_with(folder: Path) -> dict | None:
    """The comparable training settings recorded in a saved SAE's cfg.json, if any."""
    try:
        recorded = json.loads((folder / "cfg.json").read_text())["saescope"]["training"]
    except (OSError, ValueError, KeyError):
        return None
    return {name: value for name, value in recorded.items() if name != "device"}


def train_sae(cfg: TrainConfig, out: str | Path, *, resume: bool = False, progress: bool = True) -> Path:
    """Build (or reuse) the activation cache, train, save the SAE and its metrics.json into ``out``."""
    from sae_core.activations import ActivationCache
    from sae_core.corpus import build_contexts
    from sae_core.metrics import evaluate, save_metrics
    from sae_core.subject import hook_name, load_subject

    out = Path(out)
    if (out / "metrics.json").is_file() and not (out / CHECKPOINT).is_file():
        if trained_with(out) == comparable(cfg):
            print(f"saescope: {out} already holds this SAE, trained with the same settings; nothing to do")
            return out
        raise TrainError(f"{out} already holds an SAE trained with other settings; choose another --out")
    subject = load_subject(cfg.model, device=cfg.device)
    subject.check_layer(cfg.layer)
    with distributed.main_first("building the corpus and activation caches"):  # rank 0 builds, the rest reuse
        contexts = build_contexts(
            cfg.corpus, subject.tokenizer, text_field=cfg.text_field, ctx_len=cfg.ctx_len, seed=cfg.seed
        )
        split = held_out_split(contexts, cfg.eval_contexts)
        cache = ActivationCache.build(
            subject,
            cfg.layer,
            split.train,
            ActivationCache.default_folder(subject, cfg.layer, split.train),
            max_tokens=cfg.cache_tokens or cfg.tokens,
        )
    print(f"saescope: training needs about {memory_estimate(cfg, subject.d_model) / 2**20:.0f} MiB")
    result = fit(cache, cfg, out, resume=resume, progress=progress)
    if not distributed.is_main():
        return out
    sae = with_metadata(
        result.sae,
        model_name=cfg.model,
        hook_name=hook_name(cfg.layer),
        layer=cfg.layer,
        saescope={
            "training": asdict(cfg),
            "input_scale": result.scale,
            "tokens_trained": result.tokens,
            "steps": result.steps,
            "train_dead_fraction": result.dead_fraction,
            "dead_window_tokens": cfg.resolved_dead_tokens(),
            "cached_tokens": cache.n_tokens,
            "corpus": split.train.describe(),
        },
    )
    sae.save(out)
    metrics = evaluate(
        subject, sae, cfg.layer, split.held_out.tokens, split.held_out.special_mask, progress=progress
    )
    save_metrics(out, metrics)
    for line in metrics.lines():
        print(line)
    (out / CHECKPOINT).unlink(missing_ok=True)
    return out
