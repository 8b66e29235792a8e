"""Training sparse autoencoders on cached residual-stream activations (REFERENCE §1).

Three recipes, chosen by ``TrainConfig.architecture``:

- ``topk`` (default; OpenAI 2024): f = TopK(W_enc (x - b_dec) + b_enc), loss = FVU + AuxK/32,
  unit-norm decoder rows. Saved as SAELens ``topk``.
- ``batchtopk`` (Bussmann et al. 2024): the k·batch largest pre-activations over the whole batch;
  saved as ``jumprelu`` with one global threshold: the mean over a few batches of the smallest
  selected value, measured with the final weights.
- ``relu`` (Anthropic, Scaling Monosemanticity): loss = ||x - x̂||² + λ Σ f_i ||W_dec_i||, λ warmed
  up over the first 5% of steps, decoder unconstrained. Saved as SAELens ``standard``.

Training runs on scaled inputs c·x with E||c·x|| = sqrt(d_model); the scale is folded into the
saved weights, so a saved SAE takes raw activations.

The pieces, one file each: ``train_config`` (what to do), ``train_data`` (what is read),
``sparse_codes`` (TopK's sparse machinery), ``losses`` (each architecture's loss), ``checkpoint``
(state and resume), ``train_loop`` (init, step, loop, the saved SAE). This module is the
pipeline: corpus -> activation cache -> fit -> save -> evaluate.

Memory budget (fp32, width W, d_model d, batch B): parameters, gradients and Adam's two moments
are 4 × 2·W·d floats (150 MB for W=8192, d=576); a step holds the (B, W) pre-activations once
(134 MB at B=4096) for TopK, about four such tensors for ``relu``. ``memory_estimate`` says it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

from sae_core.inputs import distributed
from sae_core.saes.checkpoint import CHECKPOINT, comparable, trained_with
from sae_core.saes.sae import SAE
from sae_core.saes.train_config import TrainConfig, TrainError, memory_estimate
from sae_core.saes.train_loop import fit


def with_metadata(sae: SAE, **fields) -> SAE:
    """A copy of ``sae`` whose config carries model/hook/layer/saescope fields."""
    cfg = dataclasses.replace(sae.cfg, **fields)
    return SAE.from_tensors(cfg, dict(sae.named_parameters()), origin="training")


class Split(NamedTuple):
    train: object  # sae_core.inputs.corpus.Contexts: the contexts training may read
    held_out: object  # the last contexts of the corpus, never trained on


def held_out_split(contexts, n_eval: int) -> Split:
    """The last min(n_eval, 20%) contexts are held out; training and `evaluate` agree on them."""
    n_eval = min(n_eval, len(contexts) // 5)
    if n_eval == 0:
        raise TrainError(f"the corpus {contexts.spec!r} has only {len(contexts)} contexts; it needs at least 5")
    n_train = len(contexts) - n_eval

    def rows(begin, end, tag):
        return dataclasses.replace(
            contexts,
            tokens=contexts.tokens[begin:end],
            special_mask=contexts.special_mask[begin:end],
            fingerprint=f"{contexts.fingerprint}-{tag}{begin}-{end}",
        )

    return Split(rows(0, n_train, "train"), rows(n_train, len(contexts), "heldout"))


def train_sae(cfg: TrainConfig, out: str | Path, *, resume: bool = False, progress: bool = True) -> Path:
    """Build (or reuse) the activation cache, train, save the SAE and its metrics.json into ``out``."""
    from sae_core.inputs.activations import ActivationCache
    from sae_core.inputs.corpus import build_contexts
    from sae_core.inputs.subject import hook_name, load_subject
    from sae_core.saes.metrics import evaluate, save_metrics

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file; name a folder (new or holding this run)")
    if (out / "metrics.json").is_file() and not (out / CHECKPOINT).is_file():
        if trained_with(out) == comparable(cfg):
            print(f"saescope: {out} already holds this SAE, trained with the same settings; nothing to do")
            return out
        raise TrainError(f"{out} already holds an SAE trained with other settings; choose another --out")
    subject = load_subject(cfg.model, device=cfg.device)
    subject.check_layer(cfg.layer)
    with distributed.main_first("building the corpus and activation caches"):  # rank 0 builds, the rest reuse
        contexts = build_contexts(
            cfg.corpus, subject.tokenizer, text_field=cfg.text_field, ctx_len=cfg.ctx_len, seed=cfg.seed
        )
        split = held_out_split(contexts, cfg.eval_contexts)
        cache = ActivationCache.build(
            subject,
            cfg.layer,
            split.train,
            ActivationCache.default_folder(subject, cfg.layer, split.train),
            max_tokens=cfg.cache_tokens or cfg.tokens,
        )
    print(f"saescope: training needs about {memory_estimate(cfg, subject.d_model) / 2**20:.0f} MiB")
    result = fit(cache, cfg, out, resume=resume, progress=progress)
    if not distributed.is_main():
        return out
    sae = with_metadata(
        result.sae,
        model_name=cfg.model,
        hook_name=hook_name(cfg.layer),
        layer=cfg.layer,
        saescope={
            "training": asdict(cfg),
            "input_scale": result.scale,
            "tokens_trained": result.tokens,
            "steps": result.steps,
            "train_dead_fraction": result.dead_fraction,
            "dead_window_tokens": cfg.resolved_dead_tokens(),
            "cached_tokens": cache.n_tokens,
            "corpus": split.train.describe(),
        },
    )
    sae.save(out)
    metrics = evaluate(
        subject, sae, cfg.layer, split.held_out.tokens, split.held_out.special_mask, progress=progress
    )
    save_metrics(out, metrics)
    for line in metrics.lines():
        print(line)
    (out / CHECKPOINT).unlink(missing_ok=True)
    return out
