"""bench_train_peers.py plugin: saescope's real training step, side by side with SAELens and sparsify.

    /tmp/peers/bin/python ../shared/peers/bench_train_peers.py --out /tmp/train.json \
        --plugin bench/saescope_variants.py --repeats 2 --width 8192 --k 32 --d 576 --batch 4096

Each variant drives ``sae_core.saes.train_loop.train_step`` -- the very function ``fit`` calls once
per batch -- on a ``TrainState`` built by ``init_state`` (fused torch Adam, unit decoder rows,
W_enc = W_decᵀ, b_dec = geometric median, input scale estimated from the data). One harness step
= one ``train_step``: scale the batch, forward and loss (sparse TopK-style path, or ReLU's dense
then sparse path), backward, parallel-grad removal, grad-norm clip, lr schedule, Adam, decoder
renorm, dead-latent bookkeeping, batch FVU stats. What ``fit`` adds around it (tqdm, a
checkpoint every 50 steps) is not timed, as the peers' fit() extras are not.

saescope is imported from SAESCOPE_ROOT (default: the current directory, i.e. run it from the
project root); the peers' venv runs it, so torch is the very same build for every variant. With
SAESCOPE_BEFORE_ROOT set to another checkout (e.g. ``git archive <commit> sae_core | tar -x -C
DIR``), every variant is registered a second time as ``before/...`` driven by that code, so a
change is measured before and after in one invocation.

Variants (see --list):
  saescope/topk        architecture=topk, k; no latent dead (dead window 10M tokens) -> no AuxK,
                       like sparsify/topk (auxk_alpha 0) and saelens/topk
  saescope/topk+auxk   as saescope/topk with the harness's --dead-frac latents forced dead
                       (tokens_since_fired set past the window before each step, the same latent
                       set as the peers' +auxk variants) -> AuxK (k_aux = d/2) runs every step
  saescope/batchtopk   architecture=batchtopk (k·batch largest over the batch), no AuxK
  saescope/matryoshka  architecture=matryoshka, BatchTopK with prefixes width/8, width/2, width
  saescope/relu-l1     architecture=relu: Anthropic's ReLU + λ Σ f_i ||W_dec_i||, from a
                       trained-like state (see RELU_WARM_STEPS)
"""

from __future__ import annotations

import glob
import importlib
import os
import sys

import numpy as np
import torch

ROOT = os.environ.get("SAESCOPE_ROOT", os.getcwd())
BEFORE_ROOT = os.environ.get("SAESCOPE_BEFORE_ROOT")

# Rows read from the harness's dataset for init_state's scale estimate and b_dec median (a real
# run reads up to 131072 for the scale; 4096 keep the build's RSS small; the data is normalised
# to mean ||x|| = sqrt(d) anyway, so the scale comes out ~1 either way).
INIT_ROWS = 4096
NO_DEAD_WINDOW = 10_000_000  # saescope's cap on the dead window (OpenAI's 10M tokens)
# ReLU + L1 is timed as it runs after its first few hundred steps: the L1 term has made most
# latents silent on most tokens. The harness runs 13 steps from a fresh init, where every latent
# fires on half the tokens, so the build sets b_enc to the value that leaves ~this fraction of
# (token, latent) pairs active on the harness data, what a few hundred steps reach.
RELU_ACTIVE_FRACTION = 0.01


def _import_train(root: str):
    """sae_core's training modules from ``root`` (each variant runs in its own process)."""
    sys.path.insert(0, root)
    for name in [m for m in sys.modules if m == "sae_core" or m.startswith("sae_core.")]:
        del sys.modules[name]
    config = importlib.import_module("sae_core.saes.train_config")
    data = importlib.import_module("sae_core.saes.train_data")
    loop = importlib.import_module("sae_core.saes.train_loop")
    return config, data, loop


def _forced_dead_idx(ctx) -> torch.Tensor:
    """Same latents as the harness's forced_dead_idx (seed + 12345 randperm)."""
    g = torch.Generator().manual_seed(ctx.seed + 12345)
    n_dead = int(round(ctx.dead_frac * ctx.width))
    return torch.randperm(ctx.width, generator=g)[:n_dead]


def _init_sample(ctx) -> tuple[torch.Tensor, str]:
    pattern = f"/tmp/saebench_cache/acts_v1_n*_d{ctx.d}_s{ctx.seed}.f32"
    for path in sorted(glob.glob(pattern)):
        if os.path.getsize(path) >= INIT_ROWS * ctx.d * 4:
            arr = np.fromfile(path, dtype=np.float32, count=INIT_ROWS * ctx.d)
            return torch.from_numpy(arr.reshape(INIT_ROWS, ctx.d)).clone(), path
    g = torch.Generator().manual_seed(ctx.seed)
    return torch.randn(INIT_ROWS, ctx.d, generator=g), "seeded randn (harness dataset not found)"


@torch.no_grad()
def _sparsify_relu(state, sample: torch.Tensor) -> float:
    """Shift b_enc so that RELU_ACTIVE_FRACTION of the sample's (token, latent) pairs are active."""
    sae = state.sae
    z = (sample * state.scale - sae.b_dec) @ sae.W_enc + sae.b_enc
    cut = torch.quantile(z.flatten()[:: max(1, z.numel() // 2_000_000)], 1 - RELU_ACTIVE_FRACTION)
    sae.b_enc -= cut
    return float(((z - cut) > 0).float().mean())


def build_saescope(arch: str, auxk: bool = False, root: str = ROOT):
    def build(ctx):
        config, data, loop = _import_train(root)
        extra = {"prefixes": (ctx.width // 8, ctx.width // 2, ctx.width)} if arch == "matryoshka" else {}
        cfg = config.TrainConfig(
            architecture=arch,
            width=ctx.width,
            k=ctx.k,
            batch_size=ctx.batch,
            tokens=ctx.batch * ctx.total_steps * (100 if arch == "relu" else 1),  # relu: past the λ warm-up
            dead_tokens=NO_DEAD_WINDOW,
            seed=ctx.seed,
            device="cpu",
            **extra,
        )
        sample, sample_src = _init_sample(ctx)
        state = loop.init_state(cfg, data.TensorSource(sample))
        active = _sparsify_relu(state, sample) if arch == "relu" else None
        del sample
        base_lr = cfg.resolved_lr(ctx.width)
        dead = _forced_dead_idx(ctx) if auxk else None
        window = cfg.resolved_dead_tokens()

        def step(x):
            if dead is not None:  # keep the forced latents "dead" so AuxK runs, as the peers do
                state.tokens_since_fired[dead] = window + 1
            stats = loop.train_step(state, x, cfg, base_lr)
            return torch.tensor(stats.loss)

        meta = dict(
            api="sae_core.saes.train_loop.train_step (what fit() calls per batch)",
            saescope_root=root,
            architecture=arch,
            optimizer="torch.optim.Adam(fused=True) (init_state)",
            lr=base_lr,
            scale=state.scale,
            init_sample=sample_src,
            dead_window_tokens=window,
            grad_clip=cfg.grad_clip,
            loadavg_at_build=os.getloadavg(),
            **extra,
        )
        if arch == "relu":
            meta.update(l1_coeff=cfg.l1_coeff, active_fraction_at_start=active)
        else:
            meta.update(aux_k=cfg.resolved_aux_k(ctx.d), aux_coeff=cfg.aux_coeff)
        if dead is not None:
            meta["forced_dead"] = int(dead.numel())
        return step, meta

    return build


VARIANTS = [
    ("topk", "topk", False, "train_step topk (sparse step), no dead latents -> no AuxK"),
    ("topk+auxk", "topk", True, "as topk with --dead-frac latents forced dead (AuxK runs)"),
    ("batchtopk", "batchtopk", False, "train_step batchtopk (sparse step), no AuxK"),
    ("matryoshka", "matryoshka", False, "train_step matryoshka BatchTopK, prefixes w/8, w/2, w"),
    ("relu-l1", "relu", False, "train_step relu: ReLU + lambda*sum f_i||W_dec_i||, ~1% pairs active"),
]


def register(add):
    for name, arch, auxk, desc in VARIANTS:
        add(f"saescope/{name}", "saescope", desc, build_saescope(arch, auxk))
        if BEFORE_ROOT:
            add(f"before/{name}", "saescope", f"{desc} ({BEFORE_ROOT})", build_saescope(arch, auxk, BEFORE_ROOT))
