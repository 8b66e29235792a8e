"""Quality does not move with speed: each architecture trained through the fast sparse step
(``train_step``) and through a plain dense implementation of the same recipe, written here
with the obvious maths (dense (batch, width) activations, autograd for every gradient), from
the same initial weights on the same batches, ends with the same metrics."""

from __future__ import annotations

import copy

import pytest
import torch

from sae_core.saes.train_config import TrainConfig
from sae_core.saes.train_data import TensorSource
from sae_core.saes.train_loop import init_state, learning_rate, train_step
from tests.test_train import synthetic

BATCH, STEPS = 256, 200


def dense_acts(z: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """(batch, width) activations by the definition of each architecture."""
    if cfg.architecture == "relu":
        return torch.relu(z)
    if cfg.architecture == "topk":
        kth = z.topk(cfg.k, dim=-1).values[:, -1:]  # each row's k-th largest
        return torch.relu(z) * (z >= kth)
    kth = z.flatten().topk(cfg.k * z.shape[0]).values[-1]  # the batch's (k·batch)-th largest
    return torch.relu(z) * (z >= kth)


def dense_loss(p: dict, x: torch.Tensor, cfg: TrainConfig, dead: torch.Tensor, step: int):
    z = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    f = dense_acts(z, cfg)
    x_hat = f @ p["W_dec"] + p["b_dec"]
    if cfg.architecture == "relu":
        l1_scale = min(1.0, (step + 1) / max(1, int(0.05 * cfg.total_steps)))
        penalty = (f * p["W_dec"].norm(dim=-1)).sum(dim=-1).mean()
        return (x_hat - x).pow(2).sum(dim=-1).mean() + cfg.l1_coeff * l1_scale * penalty, f
    variance = (x - x.mean(dim=0)).pow(2).sum()
    prefixes = cfg.prefixes or [f.shape[1]]
    loss = sum((f[:, :m] @ p["W_dec"][:m] + p["b_dec"] - x).pow(2).sum() for m in prefixes) / variance
    n_dead = int(dead.sum())
    if n_dead:
        k_aux = cfg.resolved_aux_k(x.shape[1])
        z_dead = z.masked_fill(~dead, -torch.inf)
        kth = z_dead.topk(min(k_aux, n_dead), dim=-1).values[:, -1:]
        f_aux = torch.relu(z) * dead * (z_dead >= kth)
        aux = (f_aux @ p["W_dec"] - (x - x_hat).detach()).pow(2).sum() / variance
        loss = loss + cfg.aux_coeff * min(n_dead / k_aux, 1.0) * aux
    return loss, f


def train_dense(params: dict, data: torch.Tensor, cfg: TrainConfig, scale: float) -> dict:
    """The recipe of train_loop, step by step, densely: Adam, unit decoder rows (TopK family),
    parallel-gradient removal, clipping, the lr schedule, dead-latent bookkeeping."""
    p = {name: t.detach().clone().contiguous().requires_grad_() for name, t in params.items()}
    optimizer = torch.optim.Adam(p.values(), lr=cfg.resolved_lr(cfg.width), betas=(0.9, 0.999))
    since_fired = torch.zeros(cfg.width, dtype=torch.long)
    unit_rows = cfg.architecture != "relu"
    for step, x in enumerate(data.split(BATCH)):
        x = x * scale
        dead = since_fired > cfg.resolved_dead_tokens()
        loss, f = dense_loss(p, x, cfg, dead, step)
        optimizer.zero_grad()
        loss.backward()
        with torch.no_grad():
            if unit_rows:
                W, g = p["W_dec"], p["W_dec"].grad
                g -= (g * W).sum(dim=-1, keepdim=True) * W
            torch.nn.utils.clip_grad_norm_(p.values(), cfg.grad_clip)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, cfg.resolved_lr(cfg.width), step)
            optimizer.step()
            if unit_rows:
                p["W_dec"] /= p["W_dec"].norm(dim=-1, keepdim=True)
        since_fired += x.shape[0]
        since_fired[(f > 0).any(dim=0)] = 0
    return {name: t.detach() for name, t in p.items()}


def metrics(p: dict, x: torch.Tensor, cfg: TrainConfig) -> tuple[float, float]:
    """(explained variance, mean L0) on held-out data, selecting as training does."""
    with torch.no_grad():
        f = dense_acts((x - p["b_dec"]) @ p["W_enc"] + p["b_enc"], cfg)
        x_hat = f @ p["W_dec"] + p["b_dec"]
    ev = 1 - float((x - x_hat).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum())
    return ev, float((f > 0).sum(dim=-1).float().mean())


RECIPES = {
    "topk": dict(architecture="topk"),
    "batchtopk": dict(architecture="batchtopk"),
    "matryoshka": dict(architecture="matryoshka", prefixes=[16, 48, 128]),
    "relu": dict(architecture="relu", lr=3e-3, l1_coeff=0.3),
}


@pytest.mark.parametrize("recipe", RECIPES)
def test_fast_step_trains_as_the_dense_reference(recipe):
    x, _ = synthetic(BATCH * STEPS + 4096, seed=5)
    train, held_out = x[: BATCH * STEPS], x[BATCH * STEPS :]
    # a short dead window (2 batches) so that AuxK runs on the latents that stop firing
    cfg = TrainConfig(width=128, k=4, tokens=BATCH * STEPS, batch_size=BATCH, dead_tokens=2 * BATCH, **RECIPES[recipe])
    state = init_state(cfg, TensorSource(train))
    start = {name: t.detach().clone() for name, t in state.sae.named_parameters()}
    fast_batches = copy.deepcopy(list(train.split(BATCH)))
    aux_ran = 0
    for batch in fast_batches:
        aux_ran += int((state.tokens_since_fired > cfg.resolved_dead_tokens()).any())
        train_step(state, batch, cfg, cfg.resolved_lr(cfg.width))
    fast = {name: t.detach() for name, t in state.sae.named_parameters()}
    dense = train_dense(start, train, cfg, state.scale)

    fast_ev, fast_l0 = metrics(fast, held_out * state.scale, cfg)
    dense_ev, dense_l0 = metrics(dense, held_out * state.scale, cfg)
    assert fast_ev > 0.5, "the recipe must actually train for the comparison to mean anything"
    assert fast_ev == pytest.approx(dense_ev, abs=0.002)
    if recipe == "relu":
        assert fast_l0 == pytest.approx(dense_l0, rel=0.02)
    else:
        assert fast_l0 == dense_l0
        assert aux_ran > 0, "AuxK must have run in this comparison"


@pytest.mark.parametrize("architecture", ["batchtopk", "matryoshka"])
def test_batch_topk_starts_no_worse_than_b_dec(architecture):
    """BatchTopK's encoder starts scaled to fit a sample (train_loop.initial_encoder_scale): with
    W_enc = W_decᵀ alone, a dictionary 16x wider than d gave the high-norm tokens (every 50th,
    8x the norm) many correlated latents whose sum overshot, an FVU far above 1 at step 0."""
    x, _ = synthetic(1024, seed=6)
    x[::50] *= 8
    prefixes = [16, 512] if architecture == "matryoshka" else None
    cfg = TrainConfig(architecture=architecture, width=512, k=4, tokens=1024, batch_size=256, prefixes=prefixes)
    state = init_state(cfg, TensorSource(x))
    scaled = x * state.scale
    with torch.no_grad():
        x_hat = dense_acts(state.sae.pre_acts(scaled), cfg) @ state.sae.W_dec + state.sae.b_dec
    fvu = float((x_hat - scaled).pow(2).sum() / (scaled - scaled.mean(dim=0)).pow(2).sum())
    assert fvu < 1, f"FVU {fvu:.2f} at initialisation"
