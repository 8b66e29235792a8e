"""Training: each recipe recovers known features, the sparse step matches dense autograd,
checkpoints resume exactly, the scale is folded into the saved weights, the pipeline runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sae_core.saes import losses, sparse_codes
from sae_core.saes.checkpoint import CHECKPOINT
from sae_core.saes.formats import load_sae
from sae_core.saes.metrics import reconstruction_stats
from sae_core.saes.sparse_codes import (
    codes_at,
    decode_sparse,
    select_batch_topk,
    select_dead,
    select_topk,
)
from sae_core.saes.train_config import TrainConfig, TrainError
from sae_core.saes.train_data import TensorSource
from sae_core.saes.train_loop import FitJob, fit, fit_all, fold_scale, init_state, learning_rate

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


def test_each_width_starts_from_its_own_directions(data):
    """Widths trained side by side must not start as prefixes of each other: with one shared
    draw the 128 latents of the small SAE are the first 128 of the large one, and a short run
    leaves them near copies, so no feature of the small SAE could be seen to split."""
    source = TensorSource(data[0][:512])
    small = init_state(small_config("topk", width=128), source).sae.W_dec
    large = init_state(small_config("topk", width=512), source).sae.W_dec
    cosine = (small / small.norm(dim=1, keepdim=True)) @ (large / large.norm(dim=1, keepdim=True)).t()
    assert cosine.max() < 0.9
    again = init_state(small_config("topk", width=128), source).sae.W_dec
    assert torch.equal(small, again)  # still seeded: the same run twice starts the same


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
@pytest.mark.parametrize("mask_block", [5 * 96, 1 << 23])  # candidates found in blocks of 5 rows, or at once
def test_batch_topk_is_exact_whatever_its_sample(monkeypatch, sample, seed, mask_block):
    """The sampled lower bound only narrows the candidates: a sample too small, or blind to a
    row that holds many winners, must still give the exact k·batch largest."""
    monkeypatch.setattr(sparse_codes, "THRESHOLD_SAMPLE", sample)
    monkeypatch.setattr(sparse_codes, "MASK_BLOCK", mask_block)
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


@pytest.mark.parametrize("threads", [1, 3])  # numpy's selection runs on a block of rows per thread
def test_kth_largest_equals_topk_with_ties_and_padding(threads):
    values = (torch.randn(101, 53, generator=torch.Generator().manual_seed(0)) * 3).round()  # many ties
    values[:, 50:] = -torch.inf  # AuxK's padding columns
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for k in (1, 2, 17, 50):
            expected = values.topk(k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
            assert torch.equal(sparse_codes.kth_largest(values, k), expected), k
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("k_aux", [5, 200])  # picks among the dead latents, or all of them
@pytest.mark.parametrize("n_dead", [15, 16, 33])  # the dense path pads its columns to a multiple of 16
def test_auxk_dense_path_equals_the_sparse_one(monkeypatch, data, k_aux, n_dead):
    x = data[0][:64]
    state = init_state(small_config("topk"), TensorSource(data[0][:512]))
    sae = state.sae
    dead = torch.zeros(sae.d_sae, dtype=torch.bool)
    dead[torch.randperm(sae.d_sae, generator=torch.Generator().manual_seed(3))[:n_dead]] = True
    with torch.no_grad():
        z = sae.pre_acts(x)
    results = {}
    for name, density in (("dense", 0.0), ("sparse", float("inf"))):  # forces each path
        monkeypatch.setattr(losses, "DENSE_AUX_DENSITY", density)
        sae.zero_grad()
        aux_hat = losses.aux_reconstruction(sae, x, z, dead, k_aux)
        (aux_hat - x).pow(2).sum().backward()
        # alone, AuxK's W_dec gradient is sparse rows (in training, added into the main path's)
        results[name] = (aux_hat.detach(), {n: p.grad.to_dense() for n, p in sae.named_parameters()})
    (dense, dense_grads), (sparse, sparse_grads) = results["dense"], results["sparse"]
    assert dense.abs().sum() > 0, "some dead latents must be active for the comparison to mean anything"
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
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


class _CountingSource(TensorSource):
    def __init__(self, data):
        super().__init__(data)
        self.batches = 0

    def token_batches(self, batch_size, *, start=0, stop=None):
        for batch in super().token_batches(batch_size, start=start, stop=stop):
            self.batches += 1
            yield batch


def test_several_saes_in_one_loop_equal_separate_runs(data, tmp_path):
    x = data[0][:3000]
    configs = [
        small_config("topk", tokens=256 * 20, checkpoint_every=4, width=64),
        small_config("batchtopk", tokens=256 * 20, checkpoint_every=4, width=128, seed=1),
        small_config("relu", tokens=256 * 20, checkpoint_every=4, width=96),
    ]
    alone = [fit(TensorSource(x), cfg, tmp_path / f"alone{i}", progress=False) for i, cfg in enumerate(configs)]
    source = _CountingSource(x)
    jobs = [FitJob(cfg, source, tmp_path / f"together{i}") for i, cfg in enumerate(configs)]
    together = fit_all(jobs, progress=False)
    # three inits (scale and median: 2 batches each), 20 steps read once, 16 threshold batches
    assert source.batches == 3 * 2 + 20 + 16
    for one, other in zip(alone, together, strict=True):
        assert one.sae.cfg == other.sae.cfg and one.dead_fraction == other.dead_fraction
        for name, tensor in one.sae.named_parameters():
            assert torch.equal(dict(other.sae.named_parameters())[name], tensor), name

    # killed mid-run, the same call with resume=True finishes every SAE as if never stopped
    with pytest.raises(KeyboardInterrupt):
        fit_all([job._replace(source=_KilledSource(x, batches=3 * 2 + 10), folder=tmp_path / f"k{i}")
                 for i, job in enumerate(jobs)], progress=False)  # fmt: skip
    (tmp_path / "k1" / CHECKPOINT).unlink()  # one SAE lost its checkpoint: it starts over, alone
    resumed = fit_all([job._replace(folder=tmp_path / f"k{i}") for i, job in enumerate(jobs)], resume=True,
                      progress=False)  # fmt: skip
    for one, other in zip(alone, resumed, strict=True):
        for name, tensor in one.sae.named_parameters():
            assert torch.equal(dict(other.sae.named_parameters())[name], tensor), name


def test_saes_in_one_loop_share_their_batches(data, tmp_path):
    jobs = [FitJob(small_config("topk"), TensorSource(data[0]), tmp_path / "a"),
            FitJob(small_config("topk", batch_size=128), TensorSource(data[0]), tmp_path / "b")]  # fmt: skip
    with pytest.raises(TrainError, match="must share batch_size"):
        fit_all(jobs, progress=False)


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
    card = json.loads((out / "metrics.json").read_text())
    metrics = card["held_out"]
    assert metrics["l0"] == pytest.approx(4.0, abs=0.01)
    assert 0 < metrics["explained_variance"] <= 1
    assert (metrics["n_contexts"], metrics["corpus"]["role"]) == (8, "held out")
    assert card["other_corpus"]["corpus"]["spec"] == "stdlib-docs" and card["other_corpus"]["n_contexts"] == 8
    assert "CE recovered vs zero" in capsys.readouterr().out

    before = (out / "sae_weights.safetensors").read_bytes()
    assert main(args) == 0  # the same command again finds the finished SAE and does nothing
    assert "nothing to do" in capsys.readouterr().out
    assert (out / "sae_weights.safetensors").read_bytes() == before
    assert main([*args, "--k", "8"]) == 2  # other settings never overwrite it
    assert "trained with other settings" in capsys.readouterr().err
    # evaluate reads the split training recorded, whatever --tokens asks (16384 would once take 20% of 48)
    assert main(["evaluate", str(out), "--ctx-len", "16"]) == 0
    again = json.loads((out / "metrics.json").read_text())["held_out"]
    assert again["explained_variance"] == pytest.approx(metrics["explained_variance"], abs=1e-6)
    assert again["n_contexts"] == 8


def test_evaluate_never_reads_a_context_training_read(llama_dir, tmp_path, capsys):
    """On a small corpus (48 contexts), every context `evaluate` measures is one training never read."""
    from sae_core.cli import main
    from sae_core.inputs.corpus import build_contexts, held_out_split
    from sae_core.inputs.subject import load_subject
    from sae_core.saes.report_card import held_out_contexts
    from tests.tiny import TRAIN_TEXT

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TRAIN_TEXT) * 12)
    out = tmp_path / "sae"
    assert main(["train", "--model", str(llama_dir), "--layer", "1", "--corpus", str(corpus), "--ctx-len", "16",
                 "--out", str(out), "--tokens", "1024", "--batch-size", "128", "--width", "32", "--k", "4",
                 "--eval-contexts", "6"]) == 0  # fmt: skip
    tokenizer = load_subject(str(llama_dir)).tokenizer
    contexts = build_contexts(str(corpus), tokenizer, ctx_len=16)
    trained = {tuple(row.tolist()) for row in held_out_split(contexts, 6).train.tokens}
    sae = load_sae(out)
    format_1 = load_sae(out)  # what an SAE trained before the split was recorded holds
    del format_1.cfg.saescope["held_out"]
    for asked in (4, 6, 10_000):  # fewer, as many as, far more than training held out
        for trained_sae in (sae, format_1):
            measured = held_out_contexts(trained_sae, tokenizer, max_contexts=asked).contexts
            assert len(measured) == min(asked, 6)
            assert not trained & {tuple(row.tolist()) for row in measured.tokens}
    assert len(contexts) > 30 and len(trained) > 20  # a real split of a small corpus


def test_evaluate_writes_only_next_to_our_own_saes(llama_dir, tmp_path, capsys):
    from sae_core.cli import main
    from sae_core.saes.sae import SAE, SAEConfig
    from tests.tiny import TRAIN_TEXT

    foreign = tmp_path / "foreign"
    gen = torch.Generator().manual_seed(0)
    cfg = SAEConfig(d_in=32, d_sae=64, architecture="topk", k=4, hook_name="blocks.1.hook_resid_post", layer=1)
    tensors = {"W_enc": torch.randn(32, 64, generator=gen), "b_enc": torch.zeros(64),
               "W_dec": torch.randn(64, 32, generator=gen), "b_dec": torch.zeros(32)}  # fmt: skip
    SAE.from_tensors(cfg, tensors, origin="test").save(foreign)
    raw = json.loads((foreign / "cfg.json").read_text())
    del raw["saescope"]  # as SAELens would have written it
    (foreign / "cfg.json").write_text(json.dumps(raw))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(TRAIN_TEXT) * 20)
    args = ["evaluate", str(foreign), "--model", str(llama_dir), "--corpus", str(corpus), "--ctx-len", "16", "--tokens", "64"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "ΔCE" in printed and "was not written by saescope" in printed
    assert sorted(p.name for p in foreign.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    assert main([*args, "--out", str(tmp_path / "card.json")]) == 0
    card = json.loads((tmp_path / "card.json").read_text())
    assert card["held_out"]["corpus"]["role"] == "last contexts" and "unknown" in card["held_out"]["corpus"]["note"]
    assert sorted(p.name for p in foreign.iterdir()) == ["cfg.json", "sae_weights.safetensors"]


def test_train_command_takes_lists_of_layers_and_widths(llama_dir, tmp_path, capsys):
    from sae_core.cli import main
    from tests.tiny import TRAIN_TEXT

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": " ".join(TRAIN_TEXT) * 2}) for _ in range(24)))
    out = tmp_path / "release"
    args = ["train", "--model", str(llama_dir), "--layer", "1,2", "--width", "32,64", "--corpus", str(corpus),
            "--ctx-len", "32", "--out", str(out), "--tokens", "2048", "--batch-size", "256", "--k", "4",
            "--eval-contexts", "8"]  # fmt: skip
    assert main(args) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["l1-topk-32", "l1-topk-64", "l2-topk-32", "l2-topk-64"]
    for name in names:
        sae = load_sae(out / name, d_in=32)
        assert f"l{sae.cfg.layer}-topk-{sae.d_sae}" == name
        assert (out / name / "metrics.json").is_file() and not (out / name / CHECKPOINT).exists()
    alone = tmp_path / "alone"  # one of them trained by itself: the same weights and report card
    assert main(["train", "--model", str(llama_dir), "--layer", "2", "--width", "64", "--corpus", str(corpus),
                 "--ctx-len", "32", "--out", str(alone), "--tokens", "2048", "--batch-size", "256", "--k", "4",
                 "--eval-contexts", "8"]) == 0  # fmt: skip
    together = out / "l2-topk-64"
    assert json.loads((alone / "metrics.json").read_text()) == json.loads((together / "metrics.json").read_text())
    assert (alone / "sae_weights.safetensors").read_bytes() == (together / "sae_weights.safetensors").read_bytes()
    capsys.readouterr()
    assert main(args) == 0  # every SAE is finished: nothing is trained again
    assert capsys.readouterr().out.count("nothing to do") == 4
    assert main([*args[:-2], "--eval-contexts", "4"]) == 2  # other settings never overwrite them
    assert "l1-topk-32 already holds an SAE trained with other settings" in capsys.readouterr().err


def test_unknown_architecture_is_one_line_error(tmp_path, capsys):
    from sae_core.cli import main

    assert main(["train", "--out", str(tmp_path / "x"), "--arch", "gated"]) == 2
    assert "unknown architecture 'gated'" in capsys.readouterr().err
