"""Foreign layouts written here from their documented format load and encode like a direct
computation; broken files are refused with the file and the problem named."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sae_core.saes.formats import load_sae
from sae_core.saes.sae import SAEError

D_IN, D_SAE = 8, 24


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(D_IN, D_SAE, generator=gen),
        "b_enc": torch.randn(D_SAE, generator=gen) * 0.1,
        "W_dec": torch.randn(D_SAE, D_IN, generator=gen),
        "b_dec": torch.randn(D_IN, generator=gen),
    }


@pytest.fixture
def x():
    return torch.randn(5, D_IN, generator=torch.Generator().manual_seed(9))


def write_saelens(folder, cfg: dict, tensors: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(folder / "sae_weights.safetensors"))


def test_saelens6_standard_with_metadata(tmp_path, x):
    w = weights()
    cfg = {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "apply_b_dec_to_input": True,
           "normalize_activations": "none",
           "metadata": {"model_name": "gpt2", "hook_name": "blocks.6.hook_resid_pre"}}  # fmt: skip
    write_saelens(tmp_path / "sae", cfg, w)
    sae = load_sae(tmp_path / "sae")
    expected = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    torch.testing.assert_close(sae.encode(x), expected)
    torch.testing.assert_close(sae.decode(expected), expected @ w["W_dec"] + w["b_dec"])
    assert (sae.cfg.model_name, sae.cfg.hook_name, sae.cfg.layer) == ("gpt2", "blocks.6.hook_resid_pre", 5)


@pytest.mark.parametrize(
    "style",
    [
        {"architecture": "topk", "k": 3, "hook_name": "blocks.2.hook_resid_post", "model_name": "m"},
        {"architecture": "standard", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3}},
    ],
    ids=["saelens6-topk", "saelens5-topk-activation-fn"],
)
def test_saelens_topk(tmp_path, x, style):
    w = weights(1)
    write_saelens(tmp_path / "sae", {"d_in": D_IN, "d_sae": D_SAE, **style}, w)
    sae = load_sae(tmp_path / "sae" / "cfg.json")  # a file inside the folder works too
    z = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    values, indices = z.topk(3, dim=-1)
    expected = torch.zeros_like(z).scatter(-1, indices, torch.relu(values))
    torch.testing.assert_close(sae.encode(x), expected)
    assert sae.cfg.architecture == "topk" and sae.cfg.k == 3


def test_saelens_jumprelu_without_b_dec_on_input(tmp_path, x):
    w = weights(2) | {"threshold": torch.full((D_SAE,), 0.5)}
    write_saelens(tmp_path / "sae", {"architecture": "jumprelu", "d_in": D_IN, "d_sae": D_SAE, "apply_b_dec_to_input": False}, w)
    z = x @ w["W_enc"] + w["b_enc"]
    torch.testing.assert_close(load_sae(tmp_path / "sae").encode(x), z * (z > 0.5))


def test_sparsify_folder(tmp_path, x):
    w = weights(3)
    hook = tmp_path / "run" / "layers.4"
    hook.mkdir(parents=True)
    (hook / "cfg.json").write_text(json.dumps({"expansion_factor": 3, "normalize_decoder": True, "num_latents": 0, "k": 4}))
    save_file({"encoder.weight": w["W_enc"].t().contiguous(), "encoder.bias": w["b_enc"], "W_dec": w["W_dec"],
               "b_dec": w["b_dec"]}, str(hook / "sae.safetensors"))  # fmt: skip
    # sparsify: pre = relu(encoder(x - b_dec)); top-k of pre; decode = acts @ W_dec + b_dec
    pre = torch.relu(torch.nn.functional.linear(x - w["b_dec"], w["W_enc"].t(), w["b_enc"]))
    values, indices = pre.topk(4, dim=-1)
    expected = torch.zeros_like(pre).scatter(-1, indices, values)
    for path in (hook, tmp_path / "run"):  # the hook folder, or a run folder holding one hook
        sae = load_sae(path)
        torch.testing.assert_close(sae.encode(x), expected)
        torch.testing.assert_close(sae(x).sae_out, expected @ w["W_dec"] + w["b_dec"])
        assert (sae.cfg.layer, sae.cfg.hook_name) == (4, "blocks.4.hook_resid_post")


def test_gemma_scope_params_npz(tmp_path, x):
    w = {name: t.numpy() for name, t in weights(4).items()} | {"threshold": np.full(D_SAE, 0.3, dtype=np.float32)}
    np.savez(tmp_path / "params.npz", **w)
    sae = load_sae(tmp_path)
    z = x @ torch.from_numpy(w["W_enc"]) + torch.from_numpy(w["b_enc"])
    torch.testing.assert_close(sae.encode(x), z * (z > 0.3))
    assert load_sae(tmp_path / "params.npz").cfg.architecture == "jumprelu"


BASE_CFG = {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE}


@pytest.mark.parametrize(
    ("cfg", "tensors", "message"),
    [
        (BASE_CFG, {k: v for k, v in weights().items() if k != "b_enc"}, r"sae_weights\.safetensors: missing tensor 'b_enc'"),
        (BASE_CFG, weights() | {"W_dec": torch.zeros(D_IN, D_SAE)}, r"sae_weights\.safetensors: tensor 'W_dec' has shape \(8, 24\), expected \(24, 8\)"),
        (BASE_CFG, weights() | {"b_dec": torch.full((D_IN,), float("nan"))}, r"sae_weights\.safetensors: tensor 'b_dec' contains NaN"),
        (BASE_CFG | {"architecture": "gated"}, weights(), r'cfg\.json: architecture = "gated" is not supported'),
        (BASE_CFG | {"architecture": "topk"}, weights(), r"cfg\.json: a topk SAE needs a positive integer 'k'"),
        (BASE_CFG | {"normalize_activations": "layer_norm"}, weights(), r'cfg\.json: normalize_activations = "layer_norm" needs a scaling'),
        ({"architecture": "standard", "d_sae": D_SAE}, weights(), r"cfg\.json: 'd_in' must be a positive integer"),
        (BASE_CFG | {"d_sae": 10**12}, weights(), r"tensor 'W_enc' has shape \(8, 24\), expected \(8, 1000000000000\)"),
        (BASE_CFG, weights() | {"W_skip": torch.zeros(D_IN, D_IN)}, r"tensor 'W_skip' is not part of a standard SAE"),
        (BASE_CFG | {"activation_fn_str": "tanh-relu"}, weights(), r'activation_fn_str = "tanh-relu" is not supported'),
    ],
    ids=["missing", "shape", "nan", "architecture", "topk-without-k", "normalisation", "no-d_in", "huge-d_sae",
         "extra-tensor", "activation"],
)
def test_broken_saelens_folders_are_refused(tmp_path, cfg, tensors, message):
    write_saelens(tmp_path / "sae", cfg, tensors)
    with pytest.raises(SAEError, match=message):
        load_sae(tmp_path / "sae")


def test_d_in_mismatch_is_refused(tmp_path):
    write_saelens(tmp_path / "sae", BASE_CFG, weights())
    with pytest.raises(SAEError, match=r"d_in=8 but the model's residual stream has d_model=576"):
        load_sae(tmp_path / "sae", d_in=576)


def test_not_an_sae_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SAEError, match="holds no SAE"):
        load_sae(tmp_path)
    with pytest.raises(SAEError, match="no such SAE"):
        load_sae(tmp_path / "missing")
    (tmp_path / "cfg.json").write_text("{not json")
    save_file(weights(), str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(SAEError, match=r"cfg\.json: not valid JSON"):
        load_sae(tmp_path)
