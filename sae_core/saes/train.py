"""Training sparse autoencoders on cached residual-stream activations (REFERENCE §1).

Four recipes, chosen by ``TrainConfig.architecture``:

- ``topk`` (default; OpenAI 2024): f = TopK(W_enc (x - b_dec) + b_enc), loss = FVU + AuxK/32,
  unit-norm decoder rows. Saved as SAELens ``topk``.
- ``batchtopk`` (Bussmann et al. 2024): the k·batch largest pre-activations over the whole batch;
  saved as ``jumprelu`` with one global threshold: the mean over a few batches of the smallest
  selected value, measured with the final weights.
- ``matryoshka`` (Bussmann et al. 2025; Nabeshima 2024): BatchTopK whose first m latents, for each
  of ``prefixes``, are trained to reconstruct on their own (the loss sums every prefix's FVU).
  Saved once, as BatchTopK is, with the prefixes in cfg.json; ``load_sae(folder, prefix=m)``
  gives the nested SAE of the first m latents.
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
from sae_core.inputs.corpus import Split
from sae_core.saes.checkpoint import CHECKPOINT, comparable, trained_with
from sae_core.saes.sae import SAE
from sae_core.saes.train_config import TrainConfig, TrainError, memory_estimate
from sae_core.saes.train_loop import FitJob, FitResult, fit_all


def with_metadata(sae: SAE, **fields) -> SAE:
    """A copy of ``sae`` whose config carries model/hook/layer/saescope fields."""
    cfg = dataclasses.replace(sae.cfg, **fields)
    return SAE.from_tensors(cfg, dict(sae.named_parameters()), origin="training")


# Settings every SAE of one `saescope train` call shares: one subject, corpus and held-out split.
RUN_SETTINGS = ("model", "corpus", "text_field", "ctx_len", "seed", "eval_contexts", "device")


class TrainJob(NamedTuple):
    cfg: TrainConfig
    out: Path  # the SAE's folder: weights, cfg.json, metrics.json, checkpoint while training


def job_folder(cfg: TrainConfig, *, with_k: bool = False) -> str:
    """Folder name of one SAE of several trained together: l<layer>-<arch>[-<width>][-k<k>]."""
    name = f"l{cfg.layer}-{cfg.architecture}" + (f"-{cfg.width}" if cfg.width else "")
    return name + (f"-k{cfg.k}" if with_k and cfg.architecture != "relu" else "")


def train_sae(cfg: TrainConfig, out: str | Path, *, resume: bool = False, progress: bool = True) -> Path:
    """Build (or reuse) the activation cache, train, save the SAE and its metrics.json into ``out``."""
    return train_saes([TrainJob(cfg, Path(out))], resume=resume, progress=progress)[0]


def train_saes(jobs: list[TrainJob], *, resume: bool = False, progress: bool = True) -> list[Path]:
    """Train several SAEs of one subject and corpus (any layers, widths, architectures) in one
    loop: the caches of all their layers built in one pass, every batch read once for all of them
    (sae_core.saes.train_loop.fit_all), each saved and evaluated into its own folder. SAEs already
    finished with the same settings are left as they are."""
    from sae_core.inputs.activations import ActivationCache
    from sae_core.inputs.corpus import build_contexts, held_out_split
    from sae_core.inputs.subject import load_subject
    from sae_core.saes.metrics import metric_lines, save_metrics
    from sae_core.saes.report_card import (
        held_out_contexts,
        other_contexts,
        other_corpus_for,
        report_cards,
        split_record,
    )

    for job in jobs:
        if job.out.exists() and not job.out.is_dir():
            raise TrainError(f"--out {job.out} is a file; name a folder (new or holding this run)")
    todo = [job for job in jobs if not already_trained(job)]
    if not todo:
        return [job.out for job in jobs]
    cfg = todo[0].cfg
    for job in todo[1:]:
        differ = [name for name in RUN_SETTINGS if getattr(job.cfg, name) != getattr(cfg, name)]
        if differ:
            raise TrainError(f"SAEs trained together must share {', '.join(differ)}")
    subject = load_subject(cfg.model, device=cfg.device)
    layers = sorted({subject.check_layer(job.cfg.layer) for job in todo})
    with distributed.main_first("building the corpus and activation caches"):  # rank 0 builds, the rest reuse
        contexts = build_contexts(
            cfg.corpus, subject.tokenizer, text_field=cfg.text_field, ctx_len=cfg.ctx_len, seed=cfg.seed
        )
        split = held_out_split(contexts, cfg.eval_contexts)
        caches = ActivationCache.build_layers(
            subject,
            {layer: ActivationCache.default_folder(subject, layer, split.train) for layer in layers},
            split.train,
            max_tokens=cfg.cache_tokens or cfg.tokens,
        )
    need = sum(memory_estimate(job.cfg, subject.d_model) for job in todo)
    print(f"saescope: training {len(todo)} SAE{'s' * (len(todo) > 1)} needs about {need / 2**20:.0f} MiB")
    results = fit_all(
        [FitJob(job.cfg, caches[job.cfg.layer], job.out) for job in todo], resume=resume, progress=progress
    )
    if distributed.is_main():
        record = split_record(contexts, len(split.train))  # `evaluate` reads exactly these rows
        saved = [
            save_trained(job, result, caches[job.cfg.layer], split, record)
            for job, result in zip(todo, results, strict=True)
        ]
        held_out = held_out_contexts(saved[0], subject.tokenizer, max_contexts=len(split.held_out))
        other = other_contexts(
            other_corpus_for(cfg.corpus), subject.tokenizer, like=held_out.contexts, text_field=cfg.text_field, training_spec=cfg.corpus
        )  # fmt: skip
        layer_of = [job.cfg.layer for job in todo]  # one clean forward per batch for every layer
        cards = report_cards(subject, saved, layer_of, held_out, other, progress=progress)
        for job, card in zip(todo, cards, strict=True):
            save_metrics(job.out, card)
            print(f"saescope: {job.out}")
            for line in metric_lines(card):
                print(line)
            (job.out / CHECKPOINT).unlink(missing_ok=True)  # last: a kill before this leaves a resumable run
    return [job.out for job in jobs]


def already_trained(job: TrainJob) -> bool:
    """True when ``job.out`` holds this SAE, finished with the same settings; refuses other settings."""
    out = job.out
    if not (out / "metrics.json").is_file() or (out / CHECKPOINT).is_file():
        return False
    if trained_with(out) != comparable(job.cfg):
        raise TrainError(f"{out} already holds an SAE trained with other settings; choose another --out")
    print(f"saescope: {out} already holds this SAE, trained with the same settings; nothing to do")
    return True


def save_trained(job: TrainJob, result: FitResult, cache, split: Split, held_out: dict) -> SAE:
    """The trained SAE with its metadata, saved into ``job.out``."""
    from sae_core.inputs.subject import hook_name

    cfg = job.cfg
    sae = with_metadata(
        result.sae,
        model_name=cfg.model,
        hook_name=hook_name(cfg.layer),
        layer=cfg.layer,
        saescope={
            **result.sae.cfg.saescope,
            "training": asdict(cfg),
            "input_scale": result.scale,
            "tokens_trained": result.tokens,
            "steps": result.steps,
            "train_dead_fraction": result.dead_fraction,
            "dead_window_tokens": cfg.resolved_dead_tokens(),
            "cached_tokens": cache.n_tokens,
            "corpus": split.train.describe(),
            "held_out": held_out,
        },
    )
    sae.save(job.out)
    return sae
