"""Benchmark: time to a pruned attribution graph on SmolLM2-135M, CPU.

SAEs on four layers (5, 10, 15, 20). ``--sae`` is a trained SAE folder for layer 15, or a folder of
SAE folders such as the demo's ``--out`` (trained SAEs on those layers, the widest of each layer
taken); a layer with no trained SAE gets a random-init TopK SAE (4,096 latents, k = 32, decoder
rows random unit directions, encoder = decoder transposed). Random SAEs reconstruct poorly, so
their error nodes carry most of the influence: the replacement score measures the SAEs, the
timings measure the method (they depend on the number of active features, capped at
``--max-features``, not on what the features mean).

Runs, in order: 16 tokens over 4 SAE layers, 32 tokens over 4 layers, 32 tokens over 2 layers
(how time scales with tokens and with SAE layers). For each: seconds to the unpruned graph and
to the pruned one, the process's CPU seconds (all threads; on a busy machine a steadier figure
than wall time), peak resident memory so far, nodes and edges before and after pruning,
replacement score and completeness, and the 1-minute load average during the run (the machine
is shared).

    PYTHONPATH=$PWD python bench/bench_graph.py --sae ~/.cache/saescope/runs/demo-release-smollm2-135m-l15-default [--max-features 1000]
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

import torch

from sae_core.inputs.subject import load_subject
from sae_core.live.graph import GraphSae, build_graph
from sae_core.live.graph_prune import prune
from sae_core.live.graph_settings import GraphLimits
from sae_core.live.probe import encode_prompt
from sae_core.saes.formats import load_sae
from sae_core.saes.sae import SAE, SAEConfig

TEXT = (
    "def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n"
    "        self.x = x\n        self.y = y\n\n    def norm(self):\n        return (self.x ** 2 + "
    "self.y ** 2) ** 0.5\n"
)


def random_topk_sae(d_in: int, layer: int, *, d_sae: int = 4096, k: int = 32) -> SAE:
    generator = torch.Generator().manual_seed(layer)
    w_dec = torch.randn(d_sae, d_in, generator=generator)
    w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True)
    tensors = {
        "W_dec": w_dec,
        "W_enc": w_dec.T.clone(),
        "b_enc": torch.zeros(d_sae),
        "b_dec": torch.zeros(d_in),
    }
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=k, layer=layer)
    return SAE.from_tensors(cfg, tensors, origin=f"random layer {layer}").eval()


def trained_saes(folder: Path, d_in: int) -> dict[int, SAE]:
    """The trained SAEs of ``folder``: itself if it is an SAE folder, else its SAE subfolders, the
    widest of each layer."""
    found: dict[int, SAE] = {}
    for candidate in [folder] if (folder / "cfg.json").is_file() else sorted(folder.glob("*/cfg.json")):
        sae = load_sae(candidate if candidate.is_dir() else candidate.parent, d_in=d_in)
        if sae.cfg.layer is not None and (sae.cfg.layer not in found or sae.cfg.d_sae > found[sae.cfg.layer].cfg.d_sae):
            found[sae.cfg.layer] = sae
    return found


def prompt_of(subject, n_tokens: int):
    ids = subject.tokenizer(TEXT, add_special_tokens=False)["input_ids"][: n_tokens - 1]
    text = subject.tokenizer.decode(ids)
    prompt = encode_prompt(subject, text)
    return prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sae", required=True, help="a trained SAE folder for layer 15, or a folder of SAE folders (the demo's --out)")
    parser.add_argument("--max-features", type=int, default=GraphLimits.max_features)
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    subject = load_subject("smollm2-135m")
    trained = trained_saes(Path(args.sae), subject.d_model)
    saes = {layer: trained.get(layer) or random_topk_sae(subject.d_model, layer) for layer in (5, 10, 15, 20)}
    for layer, sae in saes.items():
        print(f"layer {layer}: " + (f"trained {sae.cfg.architecture} {sae.cfg.d_sae}" if layer in trained else "random-init TopK 4096, k=32"))
    runs = [(16, (5, 10, 15, 20)), (32, (5, 10, 15, 20)), (32, (10, 15))]
    limits = GraphLimits(max_features=args.max_features)
    print(
        "tokens layers  graph_s  pruned_s  cpu_s  peak_MiB  nodes   edges  ->  nodes  edges"
        "  replacement  completeness  load1"
    )
    for n_tokens, layers in runs:
        prompt = prompt_of(subject, n_tokens)
        graph_saes = [GraphSae(layer, saes[layer]) for layer in layers]
        start, cpu = time.perf_counter(), time.process_time()
        graph = build_graph(subject, graph_saes, prompt, limits=limits)
        built = time.perf_counter() - start
        pruned = prune(graph)
        total = time.perf_counter() - start
        cpu = time.process_time() - cpu
        load = os.getloadavg()[0]
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            f"{len(prompt):6d} {len(layers):6d} {built:8.1f} {total:9.1f} {cpu:6.1f} {peak:9.0f} "
            f"{graph.n_nodes:6d} {int((graph.adjacency != 0).sum()):6d}  -> "
            f"{int(pruned.nodes.sum()):5d} {int(pruned.edges.sum()):6d} "
            f"{pruned.replacement_score:12.3f} {pruned.completeness:13.3f} {load:6.2f}"
            f"   (target {graph.target.text!r}, {graph.n_folded} features folded)",
            flush=True,
        )


if __name__ == "__main__":
    main()
