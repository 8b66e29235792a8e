"""Training: each recipe recovers known features, the sparse step matches dense autograd,
checkpoints resume exactly, the scale is folded into the saved weights, the pipeline runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sae_core.saes import losses, sparse_codes
from sae_core.saes.checkpoint import CHECKPOINT
from sae_core.saes.metrics import reconstruction_stats
from sae_core.saes.sae import load_sae
from sae_core.saes.sparse_codes import (
    codes_at,
    decode_sparse,
    select_batch_topk,
    select_dead,
    select_topk,
)
from sae_core.saes.train_config import TrainConfig, TrainError
from sae_core.saes.train_data import TensorSource
from sae_core.saes.train_loop import fit, fold_scale, init_state, learning_rate

D, N_FEATURES, ACTIVE = 32, 48, 3


def synthetic(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x = sparse codes @ unit feature directions + offset + noise; returns (x, features)."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(N_FEATURES, D, generator=gen)
    features /= features.norm(dim=1, keepdim=True)
    chosen = torch.rand(n, N_FEATURES, generator=gen).argsort(dim=1)[:, :ACTIVE]
    magnitudes = torch.rand(n, ACTIVE, generator=gen) + 0.5
    codes = torch.zeros(n, N_FEATURES).scatter_(1, chosen, magnitudes)
    x = codes @ features + 2.0 + 0.01 * torch.randn(n, D, generator=gen)
    return x, features


@pytest.fixture(scope="module")
def data():
    return synthetic(36_000)


def small_config(architecture: str, **overrides) -> TrainConfig:
    settings = dict(architecture=architecture, width=128, k=4, tokens=256 * 300, batch_size=256)
    if architecture == "relu":
        settings.update(lr=3e-3, l1_coeff=0.3)
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "relu"])
def test_each_architecture_recovers_the_true_features(architecture, data, tmp_path):
    x, features = data
    result = fit(TensorSource(x[:30_000]), small_config(architecture), tmp_path, progress=False)
    stats = reconstruction_stats(result.sae, [x[30_000:]]).summary()
    decoder = result.sae.W_dec / result.sae.W_dec.norm(dim=1, keepdim=True)
    best_cosine = (features @ decoder.t()).max(dim=1).values  # (N_FEATURES,)
    assert stats["explained_variance"] > 0.5
    assert (best_cosine > 0.9).float().mean() > 0.8
    expected = {"topk": "topk", "batchtopk": "jumprelu", "relu": "standard"}[architecture]
    assert result.sae.cfg.architecture == expected
    if architecture != "relu":  # BatchTopK's calibrated threshold keeps L0 at k at inference
        assert stats["l0"] == pytest.approx(4, rel=0.1)


def test_sparse_topk_gradients_equal_dense_autograd(data):
    x = data[0][:64] * 0.3
    cfg = small_config("topk")
    state = init_state(cfg, TensorSource(data[0][:512]))
    sae = state.sae
    with torch.no_grad():
        z = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    rows, latents = select_topk(z, cfg.k)
    x_hat = decode_sparse(sae.W_dec, codes_at(sae, x, z, rows, latents)) + sae.b_dec
    (x_hat - x).pow(2).sum().backward()
    sparse_grads = {name: p.grad.clone() for name, p in sae.named_parameters()}

    sae.zero_grad()
    dense_z = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    values, indices = dense_z.topk(cfg.k, dim=-1)
    f = torch.zeros_like(dense_z).scatter(-1, indices, torch.relu(values))
    ((f @ sae.W_dec + sae.b_dec) - x).pow(2).sum().backward()
    for name, p in sae.named_parameters():
        torch.testing.assert_close(sparse_grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_batch_topk_selects_the_global_top_k_times_batch():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(16, 64, generator=gen)
    z[3] += 5.0  # one row holds more than 4k of the winners: the exact fallback must kick in
    k = 2
    rows, latents = select_batch_topk(z, k)
    expected = set(z.flatten().topk(k * 16).indices.tolist())
    assert {int(r) * 64 + int(c) for r, c in zip(rows, latents, strict=True)} == expected
    assert torch.all(rows[1:] >= rows[:-1])  # sorted rows, as embedding_bag needs


@pytest.mark.parametrize("sample", [16, 200, 1 << 18])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_topk_is_exact_whatever_its_sample(monkeypatch, sample, seed):
    """The sampled lower bound only narrows the candidates: a sample too small, or blind to a
    row that holds many winners, must still give the exact k·batch largest."""
    monkeypatch.setattr(sparse_codes, "THRESHOLD_SAMPLE", sample)
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(64, 96, generator=gen)
    z[seed * 7] += 4.0  # one row holds a large share of the winners
    k = 3
    rows, latents = select_batch_topk(z, k)
    expected = set(z.flatten().topk(k * 64).indices.tolist())
    assert {int(r) * 96 + int(c) for r, c in zip(rows, latents, strict=True)} == expected
    assert torch.all(rows[1:] >= rows[:-1])


def test_select_dead_takes_each_rows_largest_dead_latents():
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(32, 40, generator=gen)
    dead = torch.rand(40, generator=gen) < 0.3
    rows, latents = select_dead(z, dead, 5)
    expected = torch.where(dead, z, -torch.inf).topk(5, dim=-1).indices  # (32, 5)
    assert torch.equal(rows, torch.arange(32).repeat_interleave(5))
    assert set(zip(rows.tolist(), latents.tolist(), strict=True)) == {(r, int(c)) for r in range(32) for c in expected[r]}


@pytest.mark.parametrize("bias", [-1.5, 0.0])  # few latents active, or half of them
def test_relu_sparse_step_equals_the_dense_one(monkeypatch, data, bias):
    x = data[0][:64]
    cfg = small_config("relu")
    state = init_state(cfg, TensorSource(data[0][:512]))
    state.sae.b_enc.data.fill_(bias)
    results = {}
    for name, density in (("dense", 0.0), ("sparse", 1.01)):  # forces each path
        monkeypatch.setattr(losses, "SPARSE_RELU_DENSITY", density)
        state.sae.zero_grad()
        out = losses.forward_relu(state.sae, x, cfg, step=3)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in state.sae.named_parameters()}
        results[name] = (out, grads)
    (dense, dense_grads), (sparse, sparse_grads) = results["dense"], results["sparse"]
    torch.testing.assert_close(sparse.loss, dense.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sparse.x_hat, dense.x_hat, rtol=1e-5, atol=1e-5)
    assert torch.equal(sparse.fired, dense.fired) and sparse.l0 == dense.l0
    for name, grad in dense_grads.items():
        torch.testing.assert_close(sparse_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_saved_sae_takes_raw_activations(data):
    x = data[0][:256]
    cfg = small_config("topk")
    state = init_state(cfg, TensorSource(x))
    state.scale = 0.37
    saved = fold_scale(state, cfg)
    trained = state.sae
    trained.cfg.architecture, trained.cfg.k = "topk", cfg.k
    with torch.no_grad():
        torch.testing.assert_close(saved.encode(x), trained.encode(x * 0.37), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(saved(x).sae_out, trained(x * 0.37).sae_out / 0.37, rtol=1e-4, atol=1e-5)


def test_learning_rate_warms_up_and_decays_to_zero():
    cfg = TrainConfig(tokens=100 * 4096, batch_size=4096, warmup_steps=1000)
    assert learning_rate(cfg, 1.0, 0) == pytest.approx(1 / 5)  # warm-up capped at 5% = 5 steps
    assert learning_rate(cfg, 1.0, 50) == 1.0
    assert learning_rate(cfg, 1.0, 90) == pytest.approx(0.5)
    assert learning_rate(cfg, 1.0, 99) == pytest.approx(0.05)


class _KilledSource(TensorSource):
    """Raises KeyboardInterrupt after ``batches`` batches, like a Ctrl-C mid-run."""

    def __init__(self, data, batches):
        super().__init__(data)
        self.left = batches

    def token_batches(self, batch_size, *, start=0, stop=None):
        for batch in super().token_batches(batch_size, start=start, stop=stop):
            if self.left == 0:
                raise KeyboardInterrupt
            self.left -= 1
            yield batch


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_killed_run_resumes_to_the_same_weights(architecture, data, tmp_path):
    x = data[0][:3000]  # 11 batches per epoch: the run also crosses epochs
    cfg = small_config(architecture, tokens=256 * 30, checkpoint_every=4, dead_tokens=1024)
    whole = fit(TensorSource(x), cfg, tmp_path / "whole", progress=False)

    with pytest.raises(KeyboardInterrupt):
        # init_state reads two batches (scale, median) before the 15 training batches
        fit(_KilledSource(x, batches=2 + 15), cfg, tmp_path / "killed", progress=False)
    assert torch.load(tmp_path / "killed" / CHECKPOINT, weights_only=True)["step"] == 12
    with pytest.raises(TrainError, match="--resume"):
        fit(TensorSource(x), cfg, tmp_path / "killed", progress=False)
    resumed = fit(TensorSource(x), cfg, tmp_path / "killed", resume=True, progress=False)

    for name, tensor in whole.sae.named_parameters():
        torch.testing.assert_close(dict(resumed.sae.named_parameters())[name], tensor, rtol=0, atol=1e-6, msg=name)
    assert resumed.dead_fraction == whole.dead_fraction


def test_resume_with_other_settings_is_refused(data, tmp_path):
    x = data[0][:3000]
    cfg = small_config("topk", tokens=256 * 4, checkpoint_every=2)
    fit(TensorSource(x), cfg, tmp_path, progress=False)
    with pytest.raises(TrainError, match="k"):
        fit(TensorSource(x), small_config("topk", tokens=256 * 4, checkpoint_every=2, k=8), tmp_path, resume=True)


def test_too_little_data_for_one_batch_is_refused(tmp_path):
    with pytest.raises(TrainError, match="fewer than one batch"):
        fit(TensorSource(torch.randn(100, D)), small_config("topk"), tmp_path, progress=False)


def command_corpus(folder) -> Path:
    """A folder of 24 small text files for `saescope train` on the tiny model."""
    from tests.tiny import TRAIN_TEXT

    corpus = folder / "corpus"
    corpus.mkdir()
    for i in range(24):
        (corpus / f"{i}.txt").write_text(" ".join(TRAIN_TEXT[i % 8 :] + TRAIN_TEXT[: i % 8]) * 2)
    return corpus


def test_train_command_writes_a_loadable_sae_with_metrics(llama_dir, tmp_path, capsys):
    from sae_core.cli import main

    corpus = command_corpus(tmp_path)
    out = tmp_path / "sae"
    args = ["train", "--model", str(llama_dir), "--layer", "1", "--corpus", str(corpus), "--ctx-len", "32",
            "--out", str(out), "--tokens", "4096", "--batch-size", "256", "--width", "64", "--k", "4",
            "--eval-contexts", "8"]  # fmt: skip
    assert main(args) == 0
    assert {"cfg.json", "sae_weights.safetensors", "metrics.json"} <= {p.name for p in out.iterdir()}
    assert not (out / CHECKPOINT).exists()
    sae = load_sae(out, d_in=32)
    assert (sae.cfg.architecture, sae.cfg.k, sae.cfg.layer) == ("topk", 4, 1)
    assert sae.cfg.hook_name == "blocks.1.hook_resid_post"
    assert sae.cfg.saescope["training"]["tokens"] == 4096
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["l0"] == pytest.approx(4.0, abs=0.01)
    assert 0 < metrics["explained_variance"] <= 1
    assert "CE loss recovered" in capsys.readouterr().out

    before = (out / "sae_weights.safetensors").read_bytes()
    assert main(args) == 0  # the same command again finds the finished SAE and does nothing
    assert "nothing to do" in capsys.readouterr().out
    assert (out / "sae_weights.safetensors").read_bytes() == before
    assert main([*args, "--k", "8"]) == 2  # other settings never overwrite it
    assert "trained with other settings" in capsys.readouterr().err
    assert main(["evaluate", str(out), "--corpus", str(corpus), "--ctx-len", "32", "--tokens", "256"]) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["explained_variance"] == pytest.approx(metrics["explained_variance"], abs=1e-6)


def test_unknown_architecture_is_one_line_error(tmp_path, capsys):
    from sae_core.cli import main

    assert main(["train", "--out", str(tmp_path / "x"), "--arch", "gated"]) == 2
    assert "unknown architecture 'gated'" in capsys.readouterr().err
