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
    (out / f"gloo-threads-rank{world.rank}.txt").write_text("\n".join(gloo_threads()))


def gloo_threads() -> list[str]:
    """The names of this process's threads that gloo runs (Linux names them in /proc)."""
    names = ((task / "comm").read_text().strip() for task in Path("/proc/self/task").iterdir())
    return sorted(name for name in names if "gloo" in name)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
