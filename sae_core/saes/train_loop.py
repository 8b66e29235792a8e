"""The training loop: initialisation, one optimiser step, the loop with its checkpoints, and
the inference SAE made from the trained weights (input scale folded in, BatchTopK's threshold
measured with the final weights).

Across ranks (``torchrun --nproc-per-node N -m sae_core train ...``, sae_core.inputs.distributed):
each rank takes an equal slice of every batch; whatever depends on the whole batch (its variance,
the BatchTopK threshold, which latents fired) is all-reduced, and so are the gradients, so every
rank takes the step one process would take on the whole batch. Rank 0 alone writes files."""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from sae_core.inputs import distributed
from sae_core.saes.checkpoint import (
    CHECKPOINT,
    TrainState,
    load_checkpoint,
    save_checkpoint,
    training_sae,
)
from sae_core.saes.losses import batch_variance, forward_relu, forward_sparse
from sae_core.saes.sae import SAE, SAEConfig
from sae_core.saes.sparse_codes import select_batch_topk
from sae_core.saes.train_config import BATCH_THRESHOLD, SAVED_ARCHITECTURE, TrainConfig, TrainError
from sae_core.saes.train_data import (
    MEDIAN_SAMPLE_TOKENS,
    TokenSource,
    batches_from,
    estimate_scale,
    geometric_median,
)


class StepStats(NamedTuple):
    loss: float
    explained_variance: float  # 1 - FVU of this batch (about the batch mean)
    l0: float
    dead_fraction: float  # latents silent for more than the dead window


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
        out = forward_relu(sae, x, cfg, state.step)
    else:
        if state.pre_acts is None or state.pre_acts.shape != (x.shape[0], sae.d_sae):
            state.pre_acts = x.new_empty(x.shape[0], sae.d_sae)
        out = forward_sparse(sae, x, cfg, dead, state.pre_acts)
    out.loss.backward()
    all_reduce_grads(sae)
    if cfg.architecture != "relu":
        remove_parallel_grad(sae.W_dec)
    clip_grad_norm(sae, cfg.grad_clip)
    for group in state.optimizer.param_groups:
        group["lr"] = learning_rate(cfg, base_lr, state.step)
    state.optimizer.step()
    # freed now, not before the next backward: the next forward's (batch, width) pre-activations
    # would otherwise share the step's peak with both (width, d) gradients
    state.optimizer.zero_grad(set_to_none=True)
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
    """Keep unit-norm decoder rows on their sphere: drop the gradient along each row (in place,
    without a (width, d) temporary for the part removed)."""
    if W_dec.grad is not None:
        along = (W_dec.grad * W_dec).sum(dim=-1, keepdim=True)  # (width, 1)
        W_dec.grad.addcmul_(along, W_dec, value=-1.0)


@torch.no_grad()
def clip_grad_norm(sae: SAE, max_norm: float) -> None:
    """torch's ``clip_grad_norm_``, without its multiply of every gradient by 1.0 when the norm is
    within bounds (most steps; a pass over both (width, d) gradients on a CPU)."""
    grads = [p.grad for p in sae.parameters() if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    if max_norm / (float(total) + 1e-6) < 1.0:  # torch's clip coefficient, below 1
        torch.nn.utils.clip_grads_with_norm_(sae.parameters(), max_norm, total)


@torch.no_grad()
def normalise_rows(W_dec: torch.nn.Parameter) -> None:
    W_dec /= W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def init_seed(seed: int, width: int) -> int:
    """The seed of a width's initial decoder directions: the run's seed, apart for every width."""
    return seed * 1_000_003 + width


def init_state(cfg: TrainConfig, source: TokenSource) -> TrainState:
    """Scale from the data, decoder rows random (unit norm for TopK, 0.1 for relu), W_enc = W_decᵀ,
    b_dec the geometric median of a sample."""
    d_model = source.d_model
    width = cfg.resolved_width(d_model)
    torch.manual_seed(cfg.seed)
    scale = estimate_scale(source, d_model)
    sae = training_sae(d_model, width, "cpu")
    with torch.no_grad():
        # Each width draws its own directions: from the one global seed, a 1,024-wide SAE would
        # start as the first 1,024 latents of the 4,096-wide one, and short runs keep them near
        # copies (every small feature with exactly one partner, no split to see).
        directions = torch.randn(width, d_model, generator=torch.Generator().manual_seed(init_seed(cfg.seed, width)))
        directions /= directions.norm(dim=-1, keepdim=True)
        sae.W_dec.copy_(directions * (0.1 if cfg.architecture == "relu" else 1.0))
        sae.W_enc.copy_(sae.W_dec.t())
        sample = next(source.token_batches(min(MEDIAN_SAMPLE_TOKENS, source.n_tokens))) * scale
        sae.b_dec.copy_(geometric_median(sample))
        if cfg.architecture in BATCH_THRESHOLD:
            sae.W_enc *= initial_encoder_scale(sae, sample, cfg.k)
    sae.to(cfg.device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.resolved_lr(width), betas=(0.9, 0.999), fused=True)
    return TrainState(
        sae=sae,
        optimizer=optimizer,
        scale=scale,
        tokens_since_fired=torch.zeros(width, dtype=torch.long, device=cfg.device),
    )


@torch.no_grad()
def initial_encoder_scale(sae: SAE, sample: torch.Tensor, k: int) -> float:
    """The factor s ≤ 1 on W_enc = W_decᵀ that best fits a sample at initialisation, so that
    BatchTopK starts from a reconstruction no worse than b_dec alone.

    With unit-norm decoder rows and W_enc = W_decᵀ, each selected latent i adds (r·d_i)·d_i to
    x̂ (r = x - b_dec). TopK caps that at k latents per token; BatchTopK's batch-wide selection
    gives a high-norm token many latents at once, and their sum overshoots r several times over
    (synthetic data, every 50th token at 8x norm, 16 latents per dimension: FVU 54 at step 0,
    still above 1 after 20 steps; bench_matryoshka's EV -80 after 20 SmolLM2 steps looks alike).
    With b_enc = 0 the selection does not depend on a positive s, so x̂ = b_dec + s·y and the
    least-squares s is <r, y> / <y, y>. One extra (sample × width) product, on the CPU at init.

    The selection is training's own ``select_batch_topk``: a ``topk`` over the flattened z keeps
    a (value, index) pair per entry, 4x z (537 MB for 4,096 × 8,192), the run's peak memory."""
    residual = sample - sae.b_dec
    z = sae.pre_acts(sample)  # (n, width), b_enc = 0
    rows, latents = select_batch_topk(z, k)
    kth = z[rows, latents].min() if rows.numel() else torch.inf
    y = z.masked_fill_(z < kth, 0.0).relu_() @ sae.W_dec  # (n, d): the unscaled reconstruction
    fit = float((residual * y).sum() / (y * y).sum().clamp_min(1e-12))
    return min(1.0, fit)


@torch.no_grad()
def calibrate_threshold(state: TrainState, source: TokenSource, cfg: TrainConfig, rows: range) -> float:
    """BatchTopK -> JumpReLU θ: the mean over cfg.threshold_batches batches (the first ones, so a
    resumed run gets the same) of the smallest activation BatchTopK selects, with the final weights."""
    sae = state.sae
    batches = batches_from(source, cfg.batch_size, 0, cfg.cache_tokens or cfg.tokens)
    smallest = []
    for _ in range(cfg.threshold_batches):
        x = next(batches)[rows.start : rows.stop].to(sae.W_enc.device) * state.scale
        z = sae.pre_acts(x)  # (batch, width)
        selected_rows, selected_latents = select_batch_topk(z, cfg.k)
        selected = z[selected_rows, selected_latents]
        local = selected.min() if selected.numel() else torch.tensor(torch.inf, device=z.device)
        value = float(distributed.all_reduce(local.reshape(1).clone(), "min", step="the BatchTopK threshold"))
        if math.isfinite(value):
            smallest.append(value)
    return sum(smallest) / len(smallest) if smallest else 0.0


class FitResult(NamedTuple):
    sae: SAE  # inference SAE taking raw activations (scale folded in)
    scale: float  # the input scale used in training
    steps: int
    tokens: int  # tokens trained on
    dead_fraction: float  # latents silent for longer than the dead window at the end


class FitJob(NamedTuple):
    """One SAE of a training loop: its settings, what it reads, where it checkpoints."""

    cfg: TrainConfig
    source: TokenSource  # jobs that share a source (one layer's cache) share its batches
    folder: Path


# Settings every SAE of one loop shares: they decide which batch each step reads.
SHARED_SETTINGS = ("tokens", "batch_size", "cache_tokens", "checkpoint_every")


def fit(
    source: TokenSource, cfg: TrainConfig, folder: str | Path, *, resume: bool = False, progress: bool = True
) -> FitResult:
    """Train on ``source`` for cfg.tokens tokens, checkpointing into ``folder``."""
    return fit_all([FitJob(cfg, source, Path(folder))], resume=resume, progress=progress)[0]


def fit_all(jobs: list[FitJob], *, resume: bool = False, progress: bool = True) -> list[FitResult]:
    """Train several SAEs in one loop: each step reads one batch per source and feeds it to every
    SAE on that source, each with its own optimiser and checkpoint. The same as fitting them one
    by one (same seeds, same batches), with the batches read once."""
    cfg = jobs[0].cfg
    for job in jobs[1:]:
        differ = [name for name in SHARED_SETTINGS if getattr(job.cfg, name) != getattr(cfg, name)]
        if differ:
            raise TrainError(f"SAEs trained in one loop must share {', '.join(differ)}")
    me = distributed.world()
    if cfg.batch_size % me.size:
        raise TrainError(f"--batch-size {cfg.batch_size} does not split evenly over {me.size} ranks; use a multiple of {me.size}")
    rows = distributed.shard_range(cfg.batch_size)  # this rank's slice of every batch
    states = [start_state(job, resume) for job in jobs]
    base_lrs = [job.cfg.resolved_lr(job.cfg.resolved_width(job.source.d_model)) for job in jobs]
    first, total = min(state.step for state in states), cfg.total_steps
    sources = {id(job.source): job.source for job in jobs}
    batches = {key: batches_from(source, cfg.batch_size, first, cfg.cache_tokens or cfg.tokens) for key, source in sources.items()}
    bar = tqdm(
        total=total * cfg.batch_size,
        initial=first * cfg.batch_size,
        unit="tok",
        unit_scale=True,
        disable=not (progress and me.is_main),
        desc=f"train {', '.join(sorted({job.cfg.architecture for job in jobs}))} x{len(jobs)}",
    )
    with bar:
        for step in range(first, total):
            batch = {key: next(source)[rows.start : rows.stop] for key, source in batches.items()}
            for job, state, base_lr in zip(jobs, states, base_lrs, strict=True):
                if state.step != step:  # its checkpoint is ahead (a kill between two saves)
                    continue
                stats = train_step(state, batch[id(job.source)], job.cfg, base_lr)
                if me.is_main and (state.step % cfg.checkpoint_every == 0 or state.step == total):
                    save_checkpoint(job.folder, state, job.cfg)
            bar.update(cfg.batch_size)
            if len(jobs) == 1:
                bar.set_postfix(
                    L0=f"{stats.l0:.1f}", EV=f"{stats.explained_variance:.3f}", dead=f"{stats.dead_fraction:.3f}", refresh=False
                )
    return [finish(job, state, rows) for job, state in zip(jobs, states, strict=True)]


def start_state(job: FitJob, resume: bool) -> TrainState:
    """A fresh state, or the one the job's checkpoint holds (with ``resume``)."""
    job.folder.mkdir(parents=True, exist_ok=True)
    if not (job.folder / CHECKPOINT).is_file():
        return init_state(job.cfg, job.source)
    if not resume:
        raise TrainError(f"{job.folder} holds an unfinished run; pass --resume to continue it, or choose another --out")
    return load_checkpoint(job.folder, job.cfg, job.source)


def finish(job: FitJob, state: TrainState, rows: range) -> FitResult:
    cfg = job.cfg
    dead = state.tokens_since_fired > cfg.resolved_dead_tokens()
    threshold = calibrate_threshold(state, job.source, cfg, rows) if cfg.architecture in BATCH_THRESHOLD else None
    return FitResult(
        sae=fold_scale(state, cfg, threshold),
        scale=state.scale,
        steps=state.step,
        tokens=state.step * cfg.batch_size,
        dead_fraction=float(dead.float().mean()),
    )


def fold_scale(state: TrainState, cfg: TrainConfig, threshold: float | None = None) -> SAE:
    """The inference SAE on raw x: f(c·x) = act(c·W_enc (x - b_dec/c) + b_enc), x̂ = (W_dec f + b_dec)/c.

    ``threshold`` is BatchTopK's θ (pre-activations are the same in both units). A Matryoshka
    SAE records its prefixes, for ``load_sae(..., prefix=m)``."""
    trained, c = state.sae, state.scale
    saved_arch = SAVED_ARCHITECTURE[cfg.architecture]
    sae_cfg = SAEConfig(
        d_in=trained.d_in,
        d_sae=trained.d_sae,
        architecture=saved_arch,
        k=cfg.k if cfg.architecture != "relu" else None,
        saescope={"matryoshka_prefixes": list(cfg.prefixes)} if cfg.prefixes else {},
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
