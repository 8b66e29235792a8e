"""Benchmark: a release in one pass against its SAEs one at a time, side by side in one run.

On SmolLM2-135M (the embedded default) and the default corpus, the same tokens for every side:

- precompute of three TopK SAEs (1,024 / 4,096 / 16,384 latents, k = 32) on layer 15: one
  ``run_precompute`` with all three vs three runs of one (target >= 2.5x);
- precompute of four 4,096-wide SAEs on layers 5, 10, 15 and 20: one pass vs four runs
  (target >= 2.5x; the blocks alone cap it at (6 + 11 + 16 + 21) / 21 = 2.57x, and with the
  encoders, each 576 x 4,096 multiply-adds a token against a block's 3.5M, at 2.39x);
- training three widths (1,024 / 4,096 / 16,384) on layer 15 from an activation cache built
  beforehand: one ``train_saes`` (one loop, evaluation shared per layer) vs three ``train_sae``
  (target >= 1.3x).

Every timed side runs in a fresh process, as separate ``saescope`` commands would (model load
included), and reports its wall time, its CPU-seconds (the ratio to trust on a loaded machine:
wall time there is mostly waiting), its peak resident memory and the 1-minute load average at its
start and end. The SAEs are random-init (the cost does not depend on what they learned).
Each precompute comparison also prints its ceiling: the speed-up the multiply-adds per token
allow (subject blocks and encoders; loads and fixed per-SAE work left out), and the share of it
reached.

The one pass also links the SAEs of a layer into families (co-firing in the pass, links, the
UMAP feature map), which SAEs precomputed one at a time never get; ``--no-families`` leaves that
out, so both sides make the same stores.

    python bench/bench_release.py [--tokens 32768] [--sets widths layers] [--no-families] [--train-tokens 40960]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

MODEL, CTX_LEN = "smollm2-135m", 64
WIDTHS = (1024, 4096, 16384)
LAYERS = (5, 10, 15, 20)


class Measured(NamedTuple):
    seconds: float
    cpu: float  # CPU-seconds of the process, all its threads
    peak_mib: float  # peak resident memory of the process (model included)
    load: tuple[float, float]  # 1-minute load average at start and end


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32768, help="precompute tokens for every side (at a few thousand, per-SAE fixed work dominates)")
    parser.add_argument("--sets", nargs="+", choices=("widths", "layers"), default=["widths", "layers"], help="precompute comparisons to run")
    parser.add_argument("--families", action=argparse.BooleanOptionalAction, default=True, help="the one pass links families, as the command does")
    parser.add_argument("--train-tokens", type=int, default=40960, help="training tokens per SAE (batches of 4096)")
    parser.add_argument("--batch-size", type=int, default=32, help="contexts per precompute forward pass")
    parser.add_argument("--only", choices=("precompute", "train"), help="run one half of the benchmark")
    return parser.parse_args()


def in_child(work, *args) -> Measured:
    """Run ``work(*args)`` in a fresh process; time it there, where imports are already done."""
    return in_child_value(_timed, work, *args)


def in_child_value(work, *args):
    """``work(*args)`` in a fresh process (so this one never loads the model)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(work, args)


def _timed(work, *args) -> Measured:
    import torch  # noqa: F401  (imported before the clock starts, as a command has it)

    load = os.getloadavg()[0]
    start, cpu = time.perf_counter(), time.process_time()
    work(*args)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return Measured(seconds, cpu, peak, (load, os.getloadavg()[0]))


def random_sae(folder: Path, layer: int, width: int) -> str:
    """Anthropic/OpenAI init: unit decoder rows, W_enc = W_dec^T."""
    import torch

    from sae_core.saes.sae import SAE, SAEConfig

    torch.manual_seed(width + layer)
    sae = SAE(SAEConfig(d_in=576, d_sae=width, architecture="topk", k=32, model_name=MODEL, layer=layer))
    sae.W_dec.data = torch.nn.functional.normalize(torch.randn(width, 576), dim=1)
    sae.W_enc.data = sae.W_dec.data.T.clone()
    return str(sae.save(folder / f"l{layer}-{width}"))


def precompute(paths: list[str], db: str, tokens: int, batch_size: int, families: bool = True) -> None:
    from sae_core.precompute.config import PrecomputeConfig
    from sae_core.precompute.job import run_precompute

    cfg = PrecomputeConfig(
        sae_paths=paths, db_url=db, model=MODEL, tokens=tokens, batch_size=batch_size, ctx_len=CTX_LEN, families=families, progress=False
    )
    run_precompute(cfg)


def train_configs(tokens: int) -> list:
    from sae_core.saes.train_config import TrainConfig

    return [
        TrainConfig(layer=15, width=width, k=32, tokens=tokens, cache_tokens=tokens, eval_contexts=32, checkpoint_every=1000)
        for width in WIDTHS
    ]


def build_cache(tokens: int) -> None:
    """The layer-15 cache both training sides read (built here, untimed)."""
    from sae_core.inputs.activations import ActivationCache
    from sae_core.inputs.corpus import build_contexts, held_out_split
    from sae_core.inputs.subject import load_subject

    cfg = train_configs(tokens)[0]
    subject = load_subject(MODEL)
    contexts = build_contexts(cfg.corpus, subject.tokenizer, ctx_len=cfg.ctx_len, seed=cfg.seed)
    train = held_out_split(contexts, cfg.eval_contexts).train
    ActivationCache.build(subject, 15, train, ActivationCache.default_folder(subject, 15, train), max_tokens=tokens, progress=False)


def train(outs: list[str], widths: list[int], tokens: int) -> None:
    from sae_core.saes.train import TrainJob, train_saes

    configs = {cfg.width: cfg for cfg in train_configs(tokens)}
    train_saes([TrainJob(configs[width], Path(out)) for out, width in zip(outs, widths, strict=True)], progress=False)


def block_macs() -> int:
    """Multiply-adds per token of one block of the subject: its linear layers' weights (attention
    over 64 positions adds under 3%, left out)."""
    import torch

    from sae_core.inputs.subject import load_subject

    block = load_subject(MODEL).blocks[0]
    return sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))


def ceiling(sae_shapes: list[tuple[int, int]], per_block: int) -> float:
    """The best one-pass speed-up the multiply-adds per token allow, for SAEs given as (layer,
    width): each separate run does layer + 1 blocks and its encoder (576 x width); the one pass
    does the deepest layer's blocks once and every encoder. Loads, which the one pass saves, and
    fixed per-SAE work (logit effects), which both sides pay, are left out."""
    encoders = sum(576 * width for _, width in sae_shapes)
    separate = sum((layer + 1) * per_block for layer, _ in sae_shapes) + encoders
    together = (max(layer for layer, _ in sae_shapes) + 1) * per_block + encoders
    return separate / together


def side_by_side(title: str, target: float, together: Measured, alone: list[Measured], best: float | None = None) -> None:
    separate, separate_cpu = sum(m.seconds for m in alone), sum(m.cpu for m in alone)
    ratio = separate / together.seconds
    loads = [load for m in (together, *alone) for load in m.load]
    print(f"\n{title}")
    print(f"  one pass / loop : {together.seconds:7.1f} s {together.cpu:7.1f} CPU-s   peak {together.peak_mib:6.0f} MiB")
    print(f"  one at a time   : {separate:7.1f} s {separate_cpu:7.1f} CPU-s   peak {max(m.peak_mib for m in alone):6.0f} MiB  "
          f"({' + '.join(f'{m.seconds:.1f}' for m in alone)} s)")  # fmt: skip
    verdict = "met" if ratio >= target else "NOT met"
    print(f"  speed-up        : {ratio:.2f}x wall, {separate_cpu / together.cpu:.2f}x CPU-s (target >= {target}x: {verdict}); "
          f"load {min(loads):.1f}..{max(loads):.1f}")  # fmt: skip
    if best is not None:
        print(f"  ceiling         : {best:.2f}x from multiply-adds per token (subject blocks + encoders); "
              f"reached {ratio / best:.0%} of it")  # fmt: skip


def compare_precompute(tmp: Path, args: argparse.Namespace) -> None:
    shapes = {"widths": [(15, width) for width in WIDTHS], "layers": [(layer, 4096) for layer in LAYERS]}
    sets = {
        "widths": ("three widths (1k, 4k, 16k) on layer 15", [random_sae(tmp, *shape) for shape in shapes["widths"]]),
        "layers": ("four layers (5, 10, 15, 20), 4k wide", [random_sae(tmp, *shape) for shape in shapes["layers"]]),
    }
    warm_tokens = args.batch_size * CTX_LEN  # one batch: the model converted and the corpus cached, untimed
    warm = in_child(precompute, sets["widths"][1][:1], f"sqlite:///{tmp / 'warm.db'}", warm_tokens, args.batch_size)
    print(f"warm-up (model, corpus cached): {warm.seconds:.1f} s")
    per_block = in_child_value(block_macs)

    def precompute_sides(paths: list[str], tag: str) -> tuple[Measured, list[Measured]]:
        together = in_child(precompute, paths, f"sqlite:///{tmp / f'{tag}-one.db'}", args.tokens, args.batch_size, args.families)
        alone = [
            in_child(precompute, [path], f"sqlite:///{tmp / f'{tag}-{i}.db'}", args.tokens, args.batch_size)
            for i, path in enumerate(paths)
        ]
        return together, alone

    print(f"\nprecompute over {args.tokens} tokens, batches of {args.batch_size} contexts of {CTX_LEN}; "
          f"the one pass {'with' if args.families else 'without'} families")  # fmt: skip
    for tag in args.sets:
        title, paths = sets[tag]
        side_by_side(title, 2.5, *precompute_sides(paths, tag), best=ceiling(shapes[tag], per_block))


def compare_training(tmp: Path, args: argparse.Namespace) -> None:
    in_child(build_cache, args.train_tokens)
    print(f"\ntraining {args.train_tokens} tokens per SAE (batches of 4096) from a built cache, evaluation on 32 contexts")
    together = in_child(train, [str(tmp / f"t-one-{w}") for w in WIDTHS], list(WIDTHS), args.train_tokens)
    alone = [in_child(train, [str(tmp / f"t-{w}")], [w], args.train_tokens) for w in WIDTHS]
    side_by_side("three widths (1k, 4k, 16k) on layer 15", 1.3, together, alone)


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"{os.cpu_count()} CPUs")
        if args.only != "train":
            compare_precompute(tmp, args)
        if args.only != "precompute":
            compare_training(tmp, args)


if __name__ == "__main__":
    main()
