"""Metric functions against hand-computed values, and CE splicing on a tiny Llama."""

from __future__ import annotations

import math

import pytest
import torch

from sae_core.saes.metrics import (
    CEStats,
    ReconstructionStats,
    density_histogram,
    evaluate,
    evaluate_many,
)
from sae_core.saes.sae import SAE, SAEConfig


def test_reconstruction_stats_by_hand():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    x_hat = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    f = torch.tensor([[0.5, 0.0, 0.0], [0.2, 0.3, 0.0]])
    stats = ReconstructionStats(2, 3)
    stats.update(x, x_hat, f)
    s = stats.summary()
    # errors: 0 + 1; variance about the mean [2, 0]: 1 + 1 (about zero it would be 10)
    assert s["explained_variance"] == pytest.approx(1 - 1 / 2)
    assert s["mse"] == pytest.approx(0.5)
    assert s["l0"] == pytest.approx(1.5)
    assert s["dead_fraction"] == pytest.approx(1 / 3)
    assert s["dense_fraction"] == pytest.approx(2 / 3)  # both live latents fire on > 10%


def test_sums_accumulate_across_batches_not_ratios():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(10, 4, generator=gen) + 3
    x_hat = x + 0.3 * torch.randn(10, 4, generator=gen)
    f = torch.rand(10, 6, generator=gen) - 0.5
    whole, parts = ReconstructionStats(4, 6), ReconstructionStats(4, 6)
    whole.update(x, x_hat, f)
    parts.update(x[:3], x_hat[:3], f[:3])
    parts.update(x[3:], x_hat[3:], f[3:])
    expected = 1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert parts.summary()["explained_variance"] == pytest.approx(float(expected), rel=1e-6)
    assert parts.summary()["l0"] == whole.summary()["l0"]


def test_density_histogram_bins_log10_rates():
    counts = torch.tensor([0, 1, 10, 100, 1000])
    hist = density_histogram(counts, n_tokens=1000, bins=3)
    assert hist["edges"] == [-3.0, -2.0, -1.0, 0.0]
    assert hist["counts"] == [1, 1, 2]  # rates 1e-3 | 1e-2 | 1e-1 and 1
    assert hist["dead"] == 1


def test_ce_stats_by_hand():
    # one context of 3 tokens, vocab 2; predictions from positions 0 and 1 of tokens 1 and 2
    clean = torch.tensor([[[0.0, 0.0], [math.log(3), 0.0], [0.0, 0.0]]])  # p(target) 1/2, 3/4
    spliced = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])  # 1/2, 1/2
    zero = torch.tensor([[[0.0, math.log(3)], [0.0, math.log(3)], [0.0, 0.0]]])  # 3/4, 1/4
    targets = torch.tensor([[1, 0]])
    stats = CEStats()
    stats.update(clean, spliced, zero, targets, torch.tensor([[False, True]]))  # drop the BOS prediction
    s = stats.summary()
    assert s["ce_clean"] == pytest.approx(-math.log(3 / 4))
    assert s["ce_with_sae"] == pytest.approx(-math.log(1 / 2))
    assert s["ce_zero_ablation"] == pytest.approx(-math.log(1 / 4))
    assert s["ce_loss_recovered"] == pytest.approx((math.log(4) - math.log(2)) / (math.log(4) - math.log(4 / 3)))
    assert s["delta_ce"] == pytest.approx(math.log(3 / 2))
    assert s["kl_div"] == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert s["n_predictions"] == 1


def _identity_sae(d: int) -> SAE:
    """ReLU SAE with latents x+ and x-: reconstructs every input exactly."""
    eye = torch.eye(d)
    tensors = {
        "W_enc": torch.cat([eye, -eye], dim=1),
        "b_enc": torch.zeros(2 * d),
        "W_dec": torch.cat([eye, -eye], dim=0),
        "b_dec": torch.zeros(d),
    }
    return SAE.from_tensors(SAEConfig(d_in=d, d_sae=2 * d, architecture="standard"), tensors, "test")


def _contexts(llama):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(2, llama.vocab_size, (6, 12), generator=gen)
    tokens[:, 0] = llama.bos_token_id
    special = torch.zeros_like(tokens, dtype=torch.bool)
    special[:, 0] = True
    return tokens, special


def _manual_ce(llama, tokens, special, fn=None) -> float:
    """Mean next-token CE over predictions from non-special positions, optionally patched."""
    if fn is None:
        logits = llama.model(input_ids=tokens).logits
    else:
        with llama.patch_layer(1, fn):
            logits = llama.model(input_ids=tokens).logits
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")
    return float(losses[~special[:, :-1]].mean())


def test_perfect_sae_recovers_all_loss(llama):
    tokens, special = _contexts(llama)
    m = evaluate(llama, _identity_sae(llama.d_model), 1, tokens, special, batch_size=4, progress=False)
    assert m.ce_loss_recovered == pytest.approx(1.0, abs=1e-4)
    assert m.delta_ce == pytest.approx(0.0, abs=1e-5)
    assert m.kl_div == pytest.approx(0.0, abs=1e-5)
    assert m.explained_variance == pytest.approx(1.0, abs=1e-5)
    assert m.n_tokens == 6 * 11 and m.n_predictions == 6 * 11 - 6


@torch.no_grad()
def test_splice_keeps_bos_clean_and_zero_ablation_zeroes_everything(llama):
    tokens, special = _contexts(llama)
    sae = _identity_sae(llama.d_model)
    sae.W_dec.data.zero_()  # reconstructs zeros
    m = evaluate(llama, sae, 1, tokens, special, batch_size=4, progress=False)

    def zero_but_bos(resid):
        return torch.where(special[..., None], resid, torch.zeros_like(resid))

    ce_clean = _manual_ce(llama, tokens, special)
    ce_sae = _manual_ce(llama, tokens, special, zero_but_bos)
    ce_zero = _manual_ce(llama, tokens, special, torch.zeros_like)
    assert m.ce_clean == pytest.approx(ce_clean, rel=1e-5)
    assert m.ce_with_sae == pytest.approx(ce_sae, rel=1e-5)
    assert m.ce_zero_ablation == pytest.approx(ce_zero, rel=1e-5)
    assert ce_sae != pytest.approx(ce_zero, rel=1e-4)  # BOS kept clean makes a difference
    assert m.ce_loss_recovered == pytest.approx((ce_zero - ce_sae) / (ce_zero - ce_clean), abs=1e-3)
    assert m.l0 > 0 and m.explained_variance < 0.1


@torch.no_grad()
def test_several_saes_on_one_layer_share_the_clean_and_zero_runs(llama, monkeypatch):
    tokens, special = _contexts(llama)
    perfect, silent = _identity_sae(llama.d_model), _identity_sae(llama.d_model)
    silent.W_dec.data.zero_()
    alone = [evaluate(llama, sae, 1, tokens, special, batch_size=4, progress=False) for sae in (perfect, silent)]
    calls = []
    forward = llama.model.forward
    monkeypatch.setattr(llama.model, "forward", lambda *a, **kw: calls.append(1) or forward(*a, **kw))
    together = evaluate_many(llama, [perfect, silent], 1, tokens, special, batch_size=4, progress=False)
    assert len(calls) == 2 * (2 + 2)  # two batches, each: clean, zero-ablated, one per SAE
    assert [m.to_dict() for m in together] == [m.to_dict() for m in alone]
