"""The inference SAE: encode/decode per architecture, and save/load round trips."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sae_core.saes.formats import load_sae
from sae_core.saes.sae import (
    ARCHITECTURES,
    FORMAT_VERSION,
    SAE,
    SAEConfig,
    SAEError,
    default_width,
)
from sae_core.saes.sparse_acts import sparse_encode


def random_sae(architecture: str, *, k: int | None = None, seed: int = 0) -> SAE:
    gen = torch.Generator().manual_seed(seed)
    cfg = SAEConfig(d_in=6, d_sae=16, architecture=architecture, k=k, model_name="m", hook_name="blocks.2.hook_resid_post", layer=2)
    tensors = {
        "W_enc": torch.randn(6, 16, generator=gen),
        "b_enc": torch.randn(16, generator=gen) * 0.1,
        "W_dec": torch.randn(16, 6, generator=gen),
        "b_dec": torch.randn(6, generator=gen),
    }
    if architecture == "jumprelu":
        tensors["threshold"] = torch.rand(16, generator=gen) * 2 - 1  # some θ < 0, as Gemma Scope allows
    return SAE.from_tensors(cfg, tensors, origin="test")


def test_topk_keeps_exactly_the_k_largest():
    sae = random_sae("topk", k=3)
    x = torch.randn(4, 6)
    f = sae.encode(x)
    z = sae.pre_acts(x)
    assert ((f > 0).sum(dim=-1) <= 3).all()
    kth = z.topk(3, dim=-1).values[:, -1:]
    assert torch.equal(f > 0, (z >= kth) & (z > 0))


def test_jumprelu_is_relu_gated_by_the_threshold():
    """SAELens / Gemma Scope: f = ReLU(z) · [z > θ]; with θ < 0 a negative z above θ gives 0."""
    sae = random_sae("jumprelu")
    sae.threshold.data.fill_(-1.0)
    z = torch.tensor([[-2.0, -0.5, 0.0, 0.7] * 4])
    torch.testing.assert_close(sae.activate(z), torch.tensor([[0.0, 0.0, 0.0, 0.7] * 4]), rtol=0, atol=0)
    sae.threshold.data.fill_(0.5)
    torch.testing.assert_close(sae.activate(z), torch.tensor([[0.0, 0.0, 0.0, 0.7] * 4]), rtol=0, atol=0)
    sae.threshold.data.fill_(0.8)
    assert not sae.activate(z).any()


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("chunk", [3, 16])
def test_sparse_encode_equals_encode(architecture, chunk):
    sae = random_sae(architecture, k=3 if architecture == "topk" else None)
    x = torch.randn(20, 6) * 2
    dense = sae.encode(x).detach()
    sparse = sparse_encode(sae, x, chunk)
    rebuilt = torch.zeros_like(dense).index_put_((sparse.token, sparse.feature), sparse.value)
    assert (sparse.value > 0).all() and sparse.token.numel() == int((dense > 0).sum()) > 0
    torch.testing.assert_close(rebuilt, dense, rtol=1e-5, atol=1e-6)


def test_an_architecture_without_an_activation_is_refused_by_both_encoders():
    sae = random_sae("standard")
    sae.cfg.architecture = "gated"  # past SAEConfig's check, as a half-added architecture would be
    with pytest.raises(SAEError, match="'gated'"):
        sae.encode(torch.randn(2, 6))
    with pytest.raises(SAEError, match="'gated'"):
        sparse_encode(sae, torch.randn(2, 6), 4)


@pytest.mark.parametrize(("architecture", "k"), [("standard", None), ("topk", 3), ("jumprelu", None)])
def test_save_load_round_trip(tmp_path, architecture, k):
    sae = random_sae(architecture, k=k)
    sae.save(tmp_path / "sae", extra={"training": {"tokens": 123}})
    loaded = load_sae(tmp_path / "sae", d_in=6)
    x = torch.randn(5, 6)
    torch.testing.assert_close(loaded(x).sae_out, sae(x).sae_out, rtol=0, atol=0)
    assert (loaded.cfg.architecture, loaded.cfg.k, loaded.cfg.layer) == (architecture, k, 2)
    assert loaded.cfg.saescope == {"training": {"tokens": 123}, "model": "m", "layer": 2, "format_version": FORMAT_VERSION}


def test_saved_folder_follows_the_saelens_layout(tmp_path):
    random_sae("jumprelu").save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["metadata"] | {"sae_lens_version": None} == {"model_name": "m", "hook_name": "blocks.2.hook_resid_post",
                                                            "sae_lens_version": None, "sae_lens_training_version": None}
    assert cfg["normalize_activations"] == "none"
    modes = {path.name: path.stat().st_mode & 0o777 for path in tmp_path.iterdir()}
    assert modes["sae_weights.safetensors"] == modes["cfg.json"]  # safetensors alone makes it 0600
    shapes = {name: tuple(t.shape) for name, t in load_file(tmp_path / "sae_weights.safetensors").items()}
    assert shapes == {"W_enc": (6, 16), "b_enc": (16,), "W_dec": (16, 6), "b_dec": (6,), "threshold": (16,)}
    assert not list(tmp_path.glob("*.tmp"))


def test_config_refuses_unknown_architecture_and_topk_without_k():
    with pytest.raises(SAEError, match="unknown SAE architecture"):
        SAEConfig(d_in=2, d_sae=4, architecture="gated")
    with pytest.raises(SAEError, match="needs k"):
        SAEConfig(d_in=2, d_sae=4, architecture="topk")


def test_default_width_is_the_power_of_two_nearest_16x():
    assert default_width(576) == 8192
    assert default_width(32) == 512
    assert default_width(2304) == 32768
