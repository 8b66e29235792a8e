"""Metric functions against hand-computed values, and CE splicing on a tiny Llama."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sae_core.saes.metrics import (
    CEStats,
    CleanBatch,
    ReconstructionStats,
    clean_run,
    density_histogram,
    evaluate,
    evaluate_many,
    logits_after,
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
    spliced = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [0.0, math.log(3)]]])  # 1/2, 1/2
    zero = torch.tensor([[[0.0, math.log(3)], [0.0, math.log(3)], [0.0, 0.0]]])  # 3/4, 1/4
    mean = torch.tensor([[[0.0, 0.0], [0.0, math.log(7)], [0.0, 0.0]]])  # 1/8 for the counted one
    ids = torch.tensor([[0, 1, 0]])  # targets 1, 0
    special = torch.tensor([[True, False, False]])  # BOS: its prediction is dropped
    reference = CleanBatch.of(clean, ids, special)
    stats = CEStats()
    stats.update(reference, spliced, reference.nll_of(zero.log_softmax(-1)))
    stats.update_mean_ablation(reference.nll_of(mean.log_softmax(-1)))
    s = stats.summary()
    assert s["ce_clean"] == pytest.approx(-math.log(3 / 4))
    assert s["ce_with_sae"] == pytest.approx(-math.log(1 / 2))
    assert s["ce_zero_ablation"] == pytest.approx(-math.log(1 / 4))
    assert s["ce_mean_ablation"] == pytest.approx(-math.log(1 / 8))
    assert s["ce_loss_recovered"] == pytest.approx((math.log(4) - math.log(2)) / (math.log(4) - math.log(4 / 3)))
    assert s["ce_loss_recovered_mean_ablation"] == pytest.approx((math.log(8) - math.log(2)) / (math.log(8) - math.log(4 / 3)))
    assert s["delta_ce"] == pytest.approx(math.log(3 / 2))
    # KL over both non-special positions, the last one (no target) included, as SAELens counts it
    kl_1 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    kl_2 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert s["kl_div"] == pytest.approx((kl_1 + kl_2) / 2)
    assert (s["n_predictions"], s["n_kl_positions"]) == (1, 2)


def test_massive_tokens_are_left_out_of_the_second_explained_variance():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(200, 4, generator=gen)
    x[[3, 70]] *= 50  # two massive tokens: norm far above 10x the median
    x_hat = x + 0.5 * torch.randn(200, 4, generator=gen)
    x_hat[[3, 70]] = x[[3, 70]] * 0.99  # reconstructed well, and they hold most of the variance
    stats = ReconstructionStats(4, 3)
    stats.update(x[:120], x_hat[:120], torch.ones(120, 3))
    stats.update(x[120:], x_hat[120:], torch.ones(80, 3))
    s = stats.summary()
    keep = torch.ones(200, dtype=torch.bool)
    keep[[3, 70]] = False

    def ev(a, b):
        return 1 - float(((a - b) ** 2).sum() / ((a - a.mean(0)) ** 2).sum())

    assert s["n_massive_tokens"] == 2
    assert s["explained_variance"] == pytest.approx(ev(x, x_hat), rel=1e-6)
    assert s["explained_variance_without_massive"] == pytest.approx(ev(x[keep], x_hat[keep]), rel=1e-6)
    assert s["explained_variance"] > 0.9 > s["explained_variance_without_massive"]


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
def test_every_metric_equals_a_textbook_computation_on_the_same_tokens(llama):
    """Each number against a direct computation, as SAELens' run_evals makes it: the SAE spliced
    at non-special positions, F.cross_entropy per prediction from a non-special position, KL by
    F.kl_div summed over the vocabulary at every non-special position, EV from the two sums."""
    tokens, special = _contexts(llama)
    gen = torch.Generator().manual_seed(5)
    d = llama.d_model
    tensors = {"W_enc": torch.randn(d, 64, generator=gen) / d**0.5, "b_enc": torch.zeros(64),
               "W_dec": torch.randn(64, d, generator=gen) / 8, "b_dec": torch.randn(d, generator=gen) * 0.1}  # fmt: skip
    sae = SAE.from_tensors(SAEConfig(d_in=d, d_sae=64, architecture="topk", k=8), tensors, "test")
    m = evaluate(llama, sae, 1, tokens, special, batch_size=4, progress=False, corpus={"spec": "random"})

    resid = llama.forward_to_layer(tokens, layer=1)  # (B, T, d)
    x = resid[~special]
    x_hat = sae(x).sae_out
    mean = x.double().mean(0).float()

    def logits_with(fn=None):
        if fn is None:
            return llama.model(input_ids=tokens).logits
        with llama.patch_layer(1, fn):
            return llama.model(input_ids=tokens).logits

    def ce(logits):
        losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")
        return float(losses[~special[:, :-1]].mean())

    clean = logits_with()
    spliced = logits_with(lambda r: torch.where(special[..., None], r, sae(r).sae_out))
    zero = logits_with(torch.zeros_like)
    mean_ablated = logits_with(lambda r: torch.where(special[..., None], r, mean))
    kl = F.kl_div(spliced.log_softmax(-1), clean.softmax(-1), reduction="none").sum(-1)  # SAELens' _kl
    ce_clean, ce_sae, ce_zero, ce_mean = ce(clean), ce(spliced), ce(zero), ce(mean_ablated)

    for ours, textbook in [(m.ce_clean, ce_clean), (m.ce_with_sae, ce_sae), (m.ce_zero_ablation, ce_zero),
                           (m.ce_mean_ablation, ce_mean), (m.delta_ce, ce_sae - ce_clean)]:  # fmt: skip
        assert ours == pytest.approx(textbook, rel=1e-4)
    assert m.kl_div == pytest.approx(float(kl[~special].mean()), rel=1e-4)
    # the tiny random model's CE gaps are small, so the ratios carry float32 noise of ~1e-4
    assert m.ce_loss_recovered == pytest.approx((ce_zero - ce_sae) / (ce_zero - ce_clean), abs=1e-3)
    assert m.ce_loss_recovered_mean_ablation == pytest.approx((ce_mean - ce_sae) / (ce_mean - ce_clean), abs=1e-3)
    ev = 1 - float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    assert m.explained_variance == pytest.approx(ev, rel=1e-4)
    assert m.l0 == pytest.approx(float((sae.encode(x) > 0).sum(-1).float().mean()))
    assert m.mse == pytest.approx(float(((x - x_hat) ** 2).sum(-1).mean()), rel=1e-4)
    assert (m.n_tokens, m.n_predictions, m.n_kl_positions) == (int((~special).sum()), int((~special[:, :-1]).sum()),
                                                                int((~special).sum()))  # fmt: skip
    assert m.corpus == {"spec": "random"} and m.kl_div > 1e-4  # not a trivially perfect SAE


def test_several_saes_on_one_layer_share_the_clean_and_zero_runs(llama, monkeypatch):
    tokens, special = _contexts(llama)
    perfect, silent = _identity_sae(llama.d_model), _identity_sae(llama.d_model)
    silent.W_dec.data.zero_()
    alone = [evaluate(llama, sae, 1, tokens, special, batch_size=4, progress=False) for sae in (perfect, silent)]
    calls = []
    forward = llama.model.forward
    monkeypatch.setattr(llama.model, "forward", lambda *a, **kw: calls.append(1) or forward(*a, **kw))
    together = evaluate_many(llama, [perfect, silent], [1, 1], tokens, special, batch_size=4, progress=False)
    assert len(calls) == 2 * (2 + 2) + 2  # two batches, each: clean, zero-ablated, one per SAE; then mean-ablated
    assert [m.to_dict() for m in together] == [m.to_dict() for m in alone]


@torch.no_grad()
def test_runs_from_a_layer_equal_full_forwards_bit_for_bit(llama):
    """The ablated and spliced runs start from the clean run's residual and run only the blocks
    after the layer; the logits are the full patched forward's, exactly."""
    tokens, _ = _contexts(llama)
    clean, outputs = clean_run(llama, tokens, [0, 2])
    assert torch.equal(clean, llama.model(input_ids=tokens).logits.float())
    for layer in (0, 2):
        with llama.patch_layer(layer, torch.zeros_like):
            full = llama.model(input_ids=tokens).logits.float()
        assert torch.equal(logits_after(llama, layer, outputs[layer], tokens, torch.zeros_like), full)
    ran = []
    handles = [block.mlp.register_forward_pre_hook(lambda m, _a, i=i: ran.append(i)) for i, block in enumerate(llama.blocks)]
    try:
        logits_after(llama, 2, outputs[2], tokens, lambda resid: resid)
    finally:
        for handle in handles:
            handle.remove()
    assert ran == [3] and all("forward" not in vars(block) for block in llama.blocks)  # blocks 0..2 computed nothing


def test_saes_on_several_layers_share_the_clean_run_and_equal_one_call_per_layer(llama, monkeypatch):
    tokens, special = _contexts(llama)
    perfect, silent = _identity_sae(llama.d_model), _identity_sae(llama.d_model)
    silent.W_dec.data.zero_()
    per_layer = [evaluate(llama, sae, layer, tokens, special, batch_size=3, progress=False) for sae, layer in ((perfect, 0), (silent, 2))]
    calls = []
    forward = llama.model.forward
    monkeypatch.setattr(llama.model, "forward", lambda *a, **kw: calls.append(1) or forward(*a, **kw))
    together = evaluate_many(llama, [perfect, silent], [0, 2], tokens, special, batch_size=3, progress=False)
    # per batch one clean run and one spliced run per layer; one zero-ablated run per layer (both
    # batches have one shape); then one mean-ablated run per layer and batch
    assert len(calls) == 2 * (1 + 2) + 2 + 2 * 2
    assert [m.to_dict() for m in together] == [m.to_dict() for m in per_layer]
