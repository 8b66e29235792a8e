"""Run under torchrun by tests/test_distributed.py: fit each recipe on tests/dist_train_setup's
data, data-parallel over the ranks (resuming any checkpoint found in OUT_FOLDER/<recipe>), and
save the trained weights (rank 0).

    torchrun --nproc-per-node 2 -m tests.dist_train_worker OUT_FOLDER
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from sae_core.inputs import distributed
from sae_core.saes.train_data import TensorSource
from sae_core.saes.train_loop import fit
from tests.dist_train_setup import RECIPES, recipe_config, training_data


def main(out: Path) -> None:
    torch.set_num_threads(1)
    x = training_data()
    with distributed.session() as world:
        for architecture in RECIPES:
            result = fit(TensorSource(x), recipe_config(architecture), out / architecture, resume=True, progress=False)
            if world.is_main:
                save_file({k: v.contiguous() for k, v in result.sae.state_dict().items()}, out / f"{architecture}.safetensors")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
