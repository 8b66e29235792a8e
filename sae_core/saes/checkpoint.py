"""Training checkpoints: ``TrainState`` is everything one holds; written atomically, and
refused on resume when the settings that decide the result have changed."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sae_core.saes.sae import SAE, SAEConfig
from sae_core.saes.train_config import TrainConfig, TrainError
from sae_core.saes.train_data import TokenSource

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainState:
    """Everything a checkpoint holds; resuming from it reproduces the uninterrupted run."""

    sae: SAE  # in scaled units; `fold_scale` makes the saved one
    optimizer: torch.optim.Optimizer
    scale: float  # c with E||c·x|| = sqrt(d_model)
    step: int = 0
    tokens_since_fired: torch.Tensor | None = None  # (width,) int64
    # (batch, width) pre-activations, rewritten by every TopK-family step and never saved: a new
    # tensor that size each step is a new mapping, ~33k page faults at batch 4096, width 8192
    pre_acts: torch.Tensor | None = field(default=None, repr=False)


def training_sae(d_model: int, width: int, device: str) -> SAE:
    """A zero SAE as training holds it: W_enc (d_model, width) stored as the transpose of a
    (width, d_model) matrix, the layout of the sparse encoder gradient (``sparse_codes``), which
    then lands in .grad without a transposing copy of the whole matrix every step."""
    sae = SAE(SAEConfig(d_in=d_model, d_sae=width, architecture="standard"))
    sae.W_enc = torch.nn.Parameter(torch.zeros(width, d_model).t())
    return sae.to(device)


def save_checkpoint(folder: Path, state: TrainState, cfg: TrainConfig) -> None:
    """Write everything needed to continue, atomically (a kill leaves the previous one intact)."""
    payload = {
        "config": asdict(cfg),
        "step": state.step,
        "scale": state.scale,
        "sae": state.sae.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "tokens_since_fired": state.tokens_since_fired,
        "rng": torch.get_rng_state(),
    }
    tmp = folder / (CHECKPOINT + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, folder / CHECKPOINT)


def load_checkpoint(folder: Path, cfg: TrainConfig, source: TokenSource) -> TrainState:
    path = folder / CHECKPOINT
    payload = torch.load(path, map_location=cfg.device, weights_only=True)
    changed = sorted(name for name, value in comparable(cfg).items() if payload["config"].get(name) != value)
    if changed:
        raise TrainError(
            f"{path} was written with different settings ({', '.join(changed)}); "
            "resume with the same arguments, or train into a new --out folder"
        )
    width = cfg.resolved_width(source.d_model)
    sae = training_sae(source.d_model, width, cfg.device)
    sae.load_state_dict(payload["sae"])
    optimizer = torch.optim.Adam(sae.parameters(), fused=True)
    optimizer.load_state_dict(payload["optimizer"])
    torch.set_rng_state(payload["rng"])
    return TrainState(
        sae=sae,
        optimizer=optimizer,
        scale=payload["scale"],
        step=payload["step"],
        tokens_since_fired=payload["tokens_since_fired"],
    )


def comparable(cfg: TrainConfig) -> dict:
    """The settings that decide what a run produces (where it runs does not)."""
    return {name: value for name, value in asdict(cfg).items() if name != "device"}


def trained_with(folder: Path) -> dict | None:
    """The comparable training settings recorded in a saved SAE's cfg.json, if any."""
    try:
        recorded = json.loads((folder / "cfg.json").read_text())["saescope"]["training"]
    except (OSError, ValueError, KeyError):
        return None
    return {name: value for name, value in recorded.items() if name != "device"}
