"""A random SAE sized for the tiny models, for the live-prompt tests (no training needed)."""

from __future__ import annotations

import torch

from sae_core.sae import SAE, SAEConfig


def random_sae(
    d_in: int, *, d_sae: int = 64, architecture: str = "standard", k: int | None = None, layer: int = 1, seed: int = 0
) -> SAE:
    """Unit-norm random decoder rows, encoder = decoder transposed scaled up, small biases: on a
    tiny model's residual stream about half the latents fire per token (standard) or exactly k."""
    generator = torch.Generator().manual_seed(seed)
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture=architecture, k=k, layer=layer)
    w_dec = torch.randn(d_sae, d_in, generator=generator)
    w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True)
    tensors = {
        "W_dec": w_dec,
        "W_enc": 10.0 * w_dec.T.clone(),
        "b_enc": 0.01 * torch.randn(d_sae, generator=generator),
        "b_dec": 0.01 * torch.randn(d_in, generator=generator),
    }
    return SAE.from_tensors(cfg, tensors, origin="random_sae").eval()
