"""The inference SAE: encode/decode per architecture, and save/load round trips."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sae_core.saes.sae import FORMAT_VERSION, SAE, SAEConfig, SAEError, default_width, load_sae


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
        tensors["threshold"] = torch.rand(16, generator=gen)
    return SAE.from_tensors(cfg, tensors, origin="test")


def test_topk_keeps_exactly_the_k_largest():
    sae = random_sae("topk", k=3)
    x = torch.randn(4, 6)
    f = sae.encode(x)
    z = sae.pre_acts(x)
    assert ((f > 0).sum(dim=-1) <= 3).all()
    kth = z.topk(3, dim=-1).values[:, -1:]
    assert torch.equal(f > 0, (z >= kth) & (z > 0))


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
