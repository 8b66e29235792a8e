"""Matryoshka BatchTopK: every prefix of the dictionary learns to reconstruct on its own, the
SAE is saved once as JumpReLU with its prefixes, and ``load_sae(folder, prefix=m)`` gives the
nested SAEs, which encode as slices of the full one."""

from __future__ import annotations

import json

import pytest
import torch

from sae_core.saes.checkpoint import CHECKPOINT, training_sae
from sae_core.saes.formats import load_sae
from sae_core.saes.sae import SAEError
from sae_core.saes.train_config import TrainConfig, TrainError
from sae_core.saes.train_data import TensorSource
from sae_core.saes.train_loop import fit, init_state, train_step
from tests.test_train import command_corpus, synthetic
from tests.test_train_reference import dense_acts

PREFIXES = [8, 32, 128]
BATCH, STEPS = 256, 200


def config(architecture: str, **overrides) -> TrainConfig:
    prefixes = PREFIXES if architecture == "matryoshka" else None
    settings = dict(architecture=architecture, width=128, k=4, tokens=BATCH * STEPS, batch_size=BATCH, prefixes=prefixes)
    return TrainConfig(**{**settings, **overrides})


def prefix_fvus(sae, x: torch.Tensor, cfg: TrainConfig, prefixes: list[int] = PREFIXES) -> list[float]:
    """Each prefix's FVU on x: the first m latents of the BatchTopK code, decoded alone."""
    with torch.no_grad():
        f = dense_acts(sae.pre_acts(x), cfg)
        variance = (x - x.mean(dim=0)).pow(2).sum()
        return [float((f[:, :m] @ sae.W_dec[:m] + sae.b_dec - x).pow(2).sum() / variance) for m in prefixes]


def trained_fvus(architecture: str, train: torch.Tensor, held_out: torch.Tensor) -> tuple[list[float], list[float]]:
    cfg = config(architecture)
    state = init_state(cfg, TensorSource(train))
    before = prefix_fvus(state.sae, held_out * state.scale, cfg)
    for batch in train.split(BATCH):
        train_step(state, batch, cfg, cfg.resolved_lr(cfg.width))
    return before, prefix_fvus(state.sae, held_out * state.scale, cfg)


def test_each_prefix_learns_to_reconstruct_on_its_own():
    x, _ = synthetic(BATCH * STEPS + 4096, seed=2)
    train, held_out = x[: BATCH * STEPS], x[BATCH * STEPS :]
    before, after = trained_fvus("matryoshka", train, held_out)
    for m, start, end in zip(PREFIXES, before, after, strict=True):
        assert end < 0.8 * start, f"prefix {m}: FVU {start:.3f} -> {end:.3f}"
    # the same run without the nested losses leaves its small prefixes far behind
    _, plain = trained_fvus("batchtopk", train, held_out)
    assert after[0] < plain[0] - 0.1 and after[1] < plain[1] - 0.1


def test_a_short_run_saved_and_loaded_reconstructs_as_in_training(tmp_path):
    """After a short run (20 steps, as bench_matryoshka's) of a dictionary much wider than d, on
    data where every 50th token has 8x the norm (as a real model's first tokens do), each loaded
    prefix reconstructs held-out data as the training SAE's prefix does, and the whole dictionary
    at least as well as its smallest prefix. (With W_enc = W_decᵀ unscaled, BatchTopK gave those
    tokens many correlated latents whose sum overshot: FVU 2.6 for the whole dictionary, 1.0 for
    its first 8 latents.)"""
    x, _ = synthetic(BATCH * 20 + 4096, seed=5)
    x[::50] *= 8
    train, held_out = x[: BATCH * 20], x[BATCH * 20 :]
    prefixes = [8, 32, 512]
    cfg = config("matryoshka", tokens=BATCH * 20, width=prefixes[-1], prefixes=prefixes)
    fit(TensorSource(train), cfg, tmp_path, progress=False).sae.save(tmp_path)
    payload = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    trained = training_sae(x.shape[1], cfg.width, "cpu")
    trained.load_state_dict(payload["sae"])
    during_training = prefix_fvus(trained, held_out * payload["scale"], cfg, prefixes)
    variance = (held_out - held_out.mean(dim=0)).pow(2).sum()
    with torch.no_grad():
        loaded = [float((load_sae(tmp_path, prefix=m)(held_out).sae_out - held_out).pow(2).sum() / variance) for m in prefixes]
    for m, expected, got in zip(prefixes, during_training, loaded, strict=True):
        assert got == pytest.approx(expected, abs=0.02), f"prefix {m}: FVU {expected:.3f} in training, {got:.3f} loaded"
    assert loaded[-1] <= loaded[0], f"the whole dictionary's FVU {loaded[-1]:.3f} is worse than prefix {prefixes[0]}'s {loaded[0]:.3f}"


@pytest.fixture(scope="module")
def matryoshka_folder(tmp_path_factory):
    x, _ = synthetic(BATCH * 40, seed=3)
    folder = tmp_path_factory.mktemp("matryoshka")
    result = fit(TensorSource(x), config("matryoshka", tokens=BATCH * 30), folder, progress=False)
    result.sae.save(folder)
    return folder


def test_saved_once_as_jumprelu_with_its_prefixes(matryoshka_folder):
    cfg = json.loads((matryoshka_folder / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["d_sae"]) == ("jumprelu", 128)
    assert cfg["saescope"]["matryoshka_prefixes"] == PREFIXES
    sae = load_sae(matryoshka_folder)
    threshold = sae.threshold.detach()
    assert torch.all(threshold == threshold[0]) and float(threshold[0]) > 0  # one global θ


@pytest.mark.parametrize("m", PREFIXES)
def test_nested_saes_encode_as_slices_of_the_full_one(matryoshka_folder, m):
    full, nested = load_sae(matryoshka_folder), load_sae(matryoshka_folder, prefix=m)
    assert (nested.cfg.d_sae, nested.cfg.architecture) == (m, "jumprelu")
    assert nested.cfg.saescope["matryoshka_prefixes"] == [p for p in PREFIXES if p <= m]
    x = synthetic(512, seed=4)[0]
    with torch.no_grad():
        f = full.encode(x)
        assert (f[:, :m] > 0).any()
        got = nested.encode(x)
        assert torch.equal(got > 0, f[:, :m] > 0)  # the same latents fire
        torch.testing.assert_close(got, f[:, :m], rtol=1e-5, atol=1e-6)  # a narrower matmul's rounding
        torch.testing.assert_close(nested.decode(f[:, :m]), f[:, :m] @ full.W_dec[:m] + full.b_dec)


def test_prefix_errors_name_the_folder_and_the_choices(matryoshka_folder, tmp_path):
    with pytest.raises(SAEError, match="its prefixes are 8, 32, 128"):
        load_sae(matryoshka_folder, prefix=16)
    x, _ = synthetic(BATCH * 4, seed=3)
    plain = fit(TensorSource(x), config("batchtopk", tokens=BATCH * 2), tmp_path, progress=False).sae
    plain.save(tmp_path)
    with pytest.raises(SAEError, match="not a Matryoshka SAE"):
        load_sae(tmp_path, prefix=8)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(prefixes=None), "needs --prefixes"),
        (dict(prefixes=[32, 8, 128]), "ascending"),
        (dict(prefixes=[8, 32, 64]), r"the last prefix \(64\) must be the whole --width \(128\)"),
        (dict(architecture="topk"), "for --arch matryoshka only"),
    ],
)
def test_bad_prefixes_are_refused(overrides, message):
    settings = {"architecture": "matryoshka", "width": 128, "prefixes": PREFIXES, **overrides}
    with pytest.raises(TrainError, match=message):
        TrainConfig(**settings)


def test_width_defaults_to_the_last_prefix():
    assert config("matryoshka", width=None).resolved_width(576) == 128


def test_train_command_trains_a_matryoshka_sae(llama_dir, tmp_path):
    from sae_core.cli import main

    corpus = command_corpus(tmp_path)
    out = tmp_path / "sae"
    args = ["train", "--model", str(llama_dir), "--layer", "1", "--corpus", str(corpus), "--ctx-len", "32",
            "--out", str(out), "--tokens", "2048", "--batch-size", "256", "--arch", "matryoshka",
            "--prefixes", "16,64", "--k", "4", "--eval-contexts", "8"]  # fmt: skip
    assert main(args) == 0
    saved = load_sae(out, d_in=32)
    assert (saved.cfg.architecture, saved.cfg.d_sae) == ("jumprelu", 64)
    assert saved.cfg.saescope["matryoshka_prefixes"] == [16, 64]
    assert saved.cfg.saescope["training"]["prefixes"] == [16, 64]
    assert load_sae(out, prefix=16).cfg.d_sae == 16
