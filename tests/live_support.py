"""A random SAE sized for the tiny models, and a store that serves it, for the live-prompt tests
(no training, no precompute)."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
import torch

from sae_core.saes.sae import SAE, SAEConfig
from sae_core.store.db import FeatureRow, SaeRow, create_engine_for
from tests.app.synthetic_store import StoreSpec, build_synthetic_store

# The synthetic store's SAE (layer 2 of a d_model 32 model) at a size that builds in a blink.
LIVE_STORE = StoreSpec(n_features=48, n_contexts=12, n_top=3, n_bins=2, per_bin=1)


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


def build_live_store(folder: Path, url: str | None = None) -> str:
    """A synthetic store at ``url`` (default: a SQLite file in ``folder``) whose SAE row points at
    a random TopK SAE for the tiny Llama saved in ``folder`` (serve it with
    ``Settings(model=<tiny llama folder>)``); returns its URL."""
    spec = LIVE_STORE
    random_sae(32, d_sae=spec.n_features, architecture="topk", k=8, layer=2).save(folder / "sae")
    url = url or f"sqlite:///{folder / 'store.db'}"
    engine = create_engine_for(url)
    build_synthetic_store(engine, spec)
    with engine.begin() as conn:
        conn.execute(sa.update(SaeRow).values(path=str(folder / "sae")))
    engine.dispose()
    return url


def label_every_feature(url: str, prefix: str) -> None:
    """Label each feature of the store ``prefix`` + its index (e.g. a planted ``<script>`` tag
    that pages must show as text)."""
    engine = create_engine_for(url)
    with engine.begin() as conn:
        conn.execute(
            sa.update(FeatureRow).values(label=prefix + " " + sa.cast(FeatureRow.idx, sa.String))
        )
    engine.dispose()
