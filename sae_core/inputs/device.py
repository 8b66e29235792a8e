"""Where and in what precision work runs, decided in one place.

Every stage runs on this rank's GPU when torch sees one and on the CPU otherwise. On a GPU the
subject model's forward pass runs under bf16 autocast (tensor-core matmuls; the residual stream
is returned as float32), while SAE weights, their gradients and all statistics stay float32. On
a CPU everything is float32: bf16 matmuls there are many times slower (REFERENCE §1).
"""

from __future__ import annotations

import contextlib

import torch

from sae_core.inputs.distributed import launched_world


def pick_device(requested: str | None = None) -> torch.device:
    """``requested`` if given, else the GPU of this rank (LOCAL_RANK under torchrun), else the CPU."""
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", launched_world().local_rank)
    return torch.device("cpu")


def model_autocast(device: torch.device | str) -> contextlib.AbstractContextManager:
    """The precision of the subject's forward pass on ``device``: bf16 autocast on a GPU."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
