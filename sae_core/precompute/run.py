"""Precompute every feature of an SAE into the store.

    pass 1   corpus -> subject (to layer L) -> SAE, sparse -> streaming accumulators (all features
             at once; sae_core.precompute.stats) + the sparse activations appended to a spill file;
             a checkpoint every ``checkpoint_every`` batches
    results  intervals, co-activation neighbours, token index (precompute_results); logit effects
             and decoder neighbours from the weights (precompute_weights)
    pass 2   the spill streamed once for the per-token activations of the chosen examples
    write    one transaction: rows under the staging SAE, then the swap (precompute_store)

``run_precompute(PrecomputeConfig(...))`` is the whole job; ``saescope precompute`` and
``saescope demo`` call it. Killed at any moment, the same call resumes from the last checkpoint and
produces the same store as an uninterrupted run. Under ``torchrun --nproc-per-node N -m sae_core
precompute ...`` each rank streams a block of the corpus and rank 0 writes the same store
(sae_core.precompute.sharded).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from sqlalchemy.engine import Engine

from sae_core.inputs import distributed
from sae_core.inputs.activations import ActivationBatch, iter_activations
from sae_core.inputs.corpus import Contexts, build_contexts
from sae_core.inputs.device import pick_device
from sae_core.inputs.subject import Subject, cache_dir, hook_name, load_subject
from sae_core.precompute.config import PrecomputeConfig, PrecomputeError
from sae_core.precompute.results import (
    coactivation_neighbours,
    density_histogram,
    final_intervals,
    ordered_samples,
    token_index,
)
from sae_core.precompute.rows import RowInputs, store_rows
from sae_core.precompute.spill import PackedActs, SpillWriter, example_activations
from sae_core.precompute.stats import BatchActs, StreamingStats
from sae_core.precompute.weights import decoder_neighbours, logit_effects
from sae_core.precompute.writer import (
    Checkpoint,
    complete_sae_id,
    ensure_model,
    open_staging,
    publish,
    save_checkpoint,
)
from sae_core.saes.sae import SAE, load_sae
from sae_core.saes.sparse_acts import feature_chunk, sparse_encode
from sae_core.store.db import create_engine_for, migrate


class PrecomputeResult(NamedTuple):
    name: str
    n_tokens: int
    n_features: int
    skipped: bool  # already complete, nothing done
    resumed_from_batch: int  # 0 for a fresh run


class Inputs(NamedTuple):
    sae: SAE
    model: str
    layer: int
    name: str


class Run(NamedTuple):
    """One precompute in progress: what it reads and where it writes."""

    cfg: PrecomputeConfig
    engine: Engine
    sae_id: int  # the staging row
    subject: Subject
    sae: SAE
    layer: int
    contexts: Contexts
    spill_path: Path


def run_precompute(cfg: PrecomputeConfig) -> PrecomputeResult:
    if distributed.launched_world().size > 1:  # a rank of a torchrun job
        from sae_core.precompute.sharded import run_sharded

        with distributed.session():
            return run_sharded(cfg)
    inputs = resolve_inputs(cfg)
    engine = create_engine_for(cfg.db_url)
    migrate(engine)
    if complete_sae_id(engine, inputs.name) is not None and not cfg.force:
        say(f"{inputs.name} is already complete in {cfg.db_url}; pass --force to recompute it")
        return PrecomputeResult(inputs.name, 0, inputs.sae.d_sae, True, 0)
    run, checkpoint = start_run(cfg, inputs, engine)
    stats = new_stats(cfg, run.sae, run.subject)
    if checkpoint is not None:
        stats.load_state_dict(checkpoint.state)
        say(f"resuming {inputs.name} after {checkpoint.batches_done} batches")
    first_pass(run, stats, checkpoint)
    rows = store_rows(collect_results(run, stats))
    n_tokens = int(stats.n_tokens)
    summary = {"n_tokens": n_tokens, "density_hist": density_histogram(stats.features.count, n_tokens)}
    publish(engine, run.sae_id, inputs.name, inputs.name, summary, rows)
    run.spill_path.unlink(missing_ok=True)
    say(f"{inputs.name}: {run.sae.d_sae} features over {n_tokens} tokens written to {cfg.db_url}")
    return PrecomputeResult(inputs.name, n_tokens, run.sae.d_sae, False, checkpoint.batches_done if checkpoint else 0)


class Loaded(NamedTuple):
    subject: Subject
    sae: SAE  # on the subject's device
    contexts: Contexts


def load_run_inputs(cfg: PrecomputeConfig, inputs: Inputs) -> Loaded:
    """The subject model, the SAE beside it, and the corpus contexts (nothing touches the store)."""
    device = pick_device(cfg.device)
    subject = load_subject(inputs.model, device=device)
    if subject.d_model != inputs.sae.d_in:
        raise PrecomputeError(
            f"the SAE reads d_in={inputs.sae.d_in} but {inputs.model} has d_model={subject.d_model}; pass the right --model"
        )
    subject.check_layer(inputs.layer)
    sae = inputs.sae.to(device)
    max_contexts = None if cfg.tokens is None else max(1, math.ceil(cfg.tokens / cfg.ctx_len))
    contexts = build_contexts(
        cfg.corpus, subject.tokenizer, text_field=cfg.text_field, ctx_len=cfg.ctx_len, seed=cfg.seed, max_contexts=max_contexts
    )
    return Loaded(subject, sae, contexts)


def start_run(cfg: PrecomputeConfig, inputs: Inputs, engine: Engine) -> tuple[Run, Checkpoint | None]:
    """Load model and corpus, and open (or reopen) the staging row with its last checkpoint."""
    subject, sae, contexts = load_run_inputs(cfg, inputs)
    model_id = ensure_model(engine, subject.describe(), subject.bos_token_id, lambda: vocab_strings(subject))
    sae_id, checkpoint = open_staging(engine, inputs.name, sae_row_values(cfg, inputs, sae, model_id, contexts))
    key = hashlib.sha256(f"{cfg.db_url}|{sae_id}".encode()).hexdigest()[:20]
    spill_path = cache_dir() / "precompute" / f"{key}.spill"
    if checkpoint is not None and (not spill_path.is_file() or spill_path.stat().st_size < checkpoint.spill_bytes):
        say(f"the activation spill {spill_path} is missing or short; starting {inputs.name} again")
        checkpoint = None
    return Run(cfg, engine, sae_id, subject, sae, inputs.layer, contexts, spill_path), checkpoint


def say(message: str) -> None:
    print(f"saescope: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Inputs


def resolve_inputs(cfg: PrecomputeConfig) -> Inputs:
    """The SAE, and the model, layer and store name it is precomputed under."""
    sae = load_sae(cfg.sae_path)
    model = cfg.model or sae.cfg.model_name
    if not model:
        raise PrecomputeError(f"{cfg.sae_path} does not name its model; pass --model")
    layer = cfg.layer if cfg.layer is not None else sae.cfg.layer  # read from cfg or hook name
    if layer is None:
        raise PrecomputeError(f"cannot tell which layer {cfg.sae_path} reads; pass --layer")
    name = cfg.name or default_name(model, layer, sae)
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,150}", name):
        raise PrecomputeError(f"--name {name!r} must be 1-150 letters, digits, '.', '_' or '-' (it is a URL id)")
    return Inputs(sae, model, layer, name)


def default_name(model: str, layer: int, sae: SAE) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", Path(model).name.lower().removesuffix(".gguf")).strip("-")
    return f"{slug}-l{layer}-{sae.cfg.architecture}-{sae.d_sae}"


def sae_fingerprint(sae: SAE) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(sae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def run_identity(cfg: PrecomputeConfig, inputs: Inputs, contexts: Contexts) -> dict:
    """Everything the result depends on; a staging run with a different identity starts over."""
    return {
        "sae": sae_fingerprint(inputs.sae),
        "model": inputs.model,
        "layer": inputs.layer,
        "corpus": contexts.fingerprint,
        "tokens": cfg.tokens,
        "top_k": cfg.top_k,
        "bins": cfg.bins,
        "per_bin": cfg.per_bin,
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,
        "max_active": cfg.max_active,
        "neighbours": cfg.neighbours,
        "logit_tokens": cfg.logit_tokens,
        "hist_bins": cfg.hist_bins,
        "token_index_size": cfg.token_index_size,
    }


def sae_row_values(cfg: PrecomputeConfig, inputs: Inputs, sae: SAE, model_id: int, contexts: Contexts) -> dict:
    meta = dict(sae.cfg.saescope)
    return {
        "model_id": model_id,
        "layer": inputs.layer,
        "hook_name": hook_name(inputs.layer),
        "architecture": sae.cfg.architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "k": sae.cfg.k,
        "l1_coeff": meta.get("train", {}).get("l1_coeff") if isinstance(meta.get("train"), dict) else None,
        "path": str(Path(cfg.sae_path).resolve()),
        "train_cfg": meta,
        "metrics": read_metrics(Path(cfg.sae_path)),
        "corpus": contexts.describe(),
        "precompute_cfg": run_identity(cfg, inputs, contexts),
        "n_tokens": 0,
        "density_hist": {},
    }


def read_metrics(sae_path: Path) -> dict:
    path = sae_path / "metrics.json" if sae_path.is_dir() else sae_path.with_name("metrics.json")
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PrecomputeError(f"{path} is not valid JSON ({err.msg}); fix or remove it") from err


def vocab_strings(subject: Subject) -> list[str]:
    """Display text of every token id (each decoded alone, e.g. 'Ġfoo' -> ' foo'). NUL, which
    PostgreSQL text cannot hold, shows as its control picture '␀'."""
    texts = subject.tokenizer.batch_decode([[i] for i in range(subject.vocab_size)])
    return [text.replace("\x00", "\u2400") for text in texts]


def new_stats(cfg: PrecomputeConfig, sae: SAE, subject: Subject) -> StreamingStats:
    return StreamingStats(
        sae.d_sae,
        subject.vocab_size,
        top_k=cfg.top_k,
        per_bin=cfg.per_bin,
        max_active=cfg.max_active,
        seed=cfg.seed,
    )


# ---------------------------------------------------------------------------------------------
# Pass 1


class EncodedBatch(NamedTuple):
    acts: BatchActs  # on the CPU, what the accumulators take
    grid: torch.Tensor  # (n,) position of each entry in the batch's (B * seq) token grid


@torch.no_grad()
def encode_batch(sae: SAE, batch: ActivationBatch, memory_budget: int) -> EncodedBatch:
    """Non-special tokens of a batch through the SAE, as sparse entries."""
    n_contexts, seq, d_model = batch.acts.shape
    counted = (~batch.special_mask).reshape(-1).nonzero().squeeze(1)  # (N,) grid positions
    x = batch.acts.reshape(-1, d_model)[counted]  # (N, d_model)
    sparse = sparse_encode(sae, x, feature_chunk(counted.numel(), memory_budget))
    counted = counted.cpu()
    token = sparse.token.cpu()
    acts = BatchActs(
        context_ids=batch.context_ids.cpu(),
        token_context=counted // seq,
        token_ids=batch.tokens.reshape(-1)[counted.to(batch.tokens.device)].cpu(),
        token=token,
        feature=sparse.feature.cpu(),
        value=sparse.value.float().cpu(),
    )
    return EncodedBatch(acts, counted[token])


def first_pass(
    run: Run,
    stats: StreamingStats,
    checkpoint: Checkpoint | None,
    *,
    block: range | None = None,
    save: Callable[[Checkpoint], None] | None = None,
) -> None:
    """Stream the corpus through model and SAE into ``stats`` and the spill, checkpointing.

    ``block``: the batch indices to stream (default all; a rank streams its block of them);
    ``save``: where checkpoints go (default the store's staging row)."""
    cfg = run.cfg
    block = block if block is not None else range(math.ceil(len(run.contexts) / cfg.batch_size))
    save = save or (lambda checkpoint: save_checkpoint(run.engine, run.sae_id, checkpoint))
    done = checkpoint.batches_done if checkpoint else block.start
    n_batches = block.stop
    if done >= n_batches:
        return
    spill = SpillWriter(run.spill_path, checkpoint.spill_bytes if checkpoint else 0)
    seq = run.contexts.tokens.shape[1]
    try:
        batches = iter_activations(
            run.subject,
            run.layer,
            run.contexts,
            batch_size=cfg.batch_size,
            start=done * cfg.batch_size,
            stop=n_batches * cfg.batch_size,
            progress=cfg.progress,
        )
        for index, batch in enumerate(batches, start=done):
            encoded = encode_batch(run.sae, batch, cfg.memory_budget)
            stats.update(encoded.acts)
            spill.append(encoded.acts.context_ids, seq, encoded.grid, encoded.acts.feature, encoded.acts.value)
            if (index + 1 - block.start) % cfg.checkpoint_every == 0 or index + 1 == n_batches:
                save(Checkpoint(index + 1, spill.sync(), stats.state_dict()))
    finally:
        spill.close()


# ---------------------------------------------------------------------------------------------
# Results and pass 2


def collect_results(
    run: Run, stats: StreamingStats, examples: Callable[[np.ndarray], dict[int, PackedActs]] | None = None
) -> RowInputs:
    """Finish the statistics, read the chosen examples' per-token activations from the spill
    (``examples``: from keys to activations; default this process's spill), and compute the
    weight-based effects."""
    cfg, sae, subject = run.cfg, run.sae, run.subject
    intervals = final_intervals(stats, cfg.bins, cfg.per_bin)
    sample_context, sample_value, sample_filled = ordered_samples(intervals.samples)
    n_features = sae.d_sae
    top = stats.top
    wanted = np.unique(
        np.concatenate(
            [
                example_keys(top.context, top.value > 0, n_features, per_row=1),
                example_keys(sample_context, sample_filled, n_features, per_row=cfg.bins),
            ]
        )
    )
    W_dec = sae.W_dec.detach().float()
    return RowInputs(
        sae_id=run.sae_id,
        n_tokens=int(stats.n_tokens),
        bins=cfg.bins,
        features=stats.features,
        top=top,
        intervals=intervals,
        sample_context=sample_context.view(n_features, cfg.bins, -1),
        sample_value=sample_value.view(n_features, cfg.bins, -1),
        sample_filled=sample_filled.view(n_features, cfg.bins, -1),
        packed=examples(wanted) if examples else example_activations(run.spill_path, wanted, n_features),
        context_tokens={int(c): run.contexts.tokens[int(c)] for c in np.unique(wanted // n_features)},
        logits=logit_effects(
            W_dec,
            subject.final_norm_scale().float(),
            subject.unembed.detach().float(),
            n=cfg.logit_tokens,
            bins=cfg.hist_bins,
            memory_budget=cfg.memory_budget,
        ),
        decoder=decoder_neighbours(W_dec, n=cfg.neighbours, memory_budget=cfg.memory_budget),
        coact=coactivation_neighbours(stats, cfg.neighbours),
        token_features=token_index(stats, cfg.token_index_size),
    )


def example_keys(context: torch.Tensor, filled: torch.Tensor, n_features: int, per_row: int) -> np.ndarray:
    """Keys context * F + feature of the filled slots of a (F * per_row, slots) context table."""
    feature = (torch.arange(context.shape[0]) // per_row).unsqueeze(1).expand_as(context)
    return (context[filled] * n_features + feature[filled]).numpy()
