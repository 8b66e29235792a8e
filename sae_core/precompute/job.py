"""``run_precompute(PrecomputeConfig(...))``: the whole job, in this process
(``sae_core.precompute.run``) or, launched by ``torchrun``, as one rank of several
(``sae_core.precompute.sharded``)."""

from __future__ import annotations

from sae_core.inputs import distributed
from sae_core.precompute.config import PrecomputeConfig
from sae_core.precompute.run import PrecomputeResult, run_in_process
from sae_core.precompute.sharded import run_sharded


def run_precompute(cfg: PrecomputeConfig) -> list[PrecomputeResult]:
    """Every SAE of ``cfg`` precomputed into the store (or skipped when complete), in order."""
    if distributed.launched_world().size > 1:  # a rank of a torchrun job
        with distributed.session():
            return run_sharded(cfg)
    return run_in_process(cfg)
