"""Precompute over several ranks: ``torchrun --nproc-per-node N -m sae_core precompute ...``.

    every rank   loads model, SAE and corpus
    every rank   streams its contiguous block of batches (sae_core.inputs.distributed.shard_range) into
                 its own accumulators and spill file, checkpointing both next to each other on
                 its local disk
    merge        sae_core.precompute.merge.reduce_stats: exact, into rank 0
    pass 2       rank 0 chooses the examples and broadcasts their keys; every rank reads its own
                 spill for the ones that fell in its block and sends them to rank 0
    write        rank 0 alone touches the store: the staging row at the start, one transaction
                 at the end (sae_core.precompute.writer), exactly as a single process does

The batches, and so everything computed from them, are those of a single-process run with the
same settings, and every statistic merges exactly, so the store is row for row the one a single
process writes. A killed rank makes the job fail (torchrun stops the others, or the next
collective raises DistributedError); rerunning the same command resumes every rank from its own
last checkpoint. Resuming needs the same number of ranks: checkpoints of another world size are
not looked at, and that run starts over.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sae_core.inputs import distributed
from sae_core.inputs.subject import cache_dir
from sae_core.precompute.merge import reduce_stats
from sae_core.precompute.results import density_histogram
from sae_core.precompute.rows import store_rows
from sae_core.precompute.run import (
    Inputs,
    PrecomputeConfig,
    PrecomputeResult,
    Run,
    collect_results,
    first_pass,
    load_run_inputs,
    new_stats,
    resolve_inputs,
    run_identity,
    sae_row_values,
    say,
    vocab_strings,
)
from sae_core.precompute.spill import PackedActs, example_activations
from sae_core.precompute.stats import StreamingStats
from sae_core.precompute.writer import (
    Checkpoint,
    complete_sae_id,
    ensure_model,
    open_staging,
    publish,
)
from sae_core.store.db import create_engine_for, migrate


class RankFiles(NamedTuple):
    """One rank's resumable state on its local disk."""

    spill: Path  # sae_core.precompute.spill records of this rank's batches
    checkpoint: Path  # safetensors of the accumulators; metadata: batches_done, spill_bytes

    @classmethod
    def of(cls, cfg: PrecomputeConfig, sae_id: int, identity: dict, me: distributed.World) -> RankFiles:
        """Named by store, staging row and run identity, so a file never outlives what it is for."""
        key = hashlib.sha256(f"{cfg.db_url}|{sae_id}|{json.dumps(identity, sort_keys=True)}".encode()).hexdigest()[:20]
        stem = cache_dir() / "precompute" / f"{key}-rank{me.rank}of{me.size}"
        return cls(stem.with_suffix(".spill"), stem.with_suffix(".ckpt"))

    def load(self) -> Checkpoint | None:
        """The last checkpoint, or None if there is none or its spill is missing or short."""
        if not self.checkpoint.is_file():
            return None
        with safe_open(self.checkpoint, framework="pt") as fh:
            meta = fh.metadata()
        spill_bytes = int(meta["spill_bytes"])
        if not self.spill.is_file() or self.spill.stat().st_size < spill_bytes:
            return None
        return Checkpoint(int(meta["batches_done"]), spill_bytes, load_file(self.checkpoint))

    def save(self, checkpoint: Checkpoint) -> None:
        """Write atomically: a kill leaves the previous checkpoint intact."""
        tmp = self.checkpoint.with_suffix(".tmp")
        meta = {"batches_done": str(checkpoint.batches_done), "spill_bytes": str(checkpoint.spill_bytes)}
        save_file({name: t.contiguous() for name, t in checkpoint.state.items()}, tmp, metadata=meta)
        os.replace(tmp, self.checkpoint)

    def remove(self) -> None:
        self.spill.unlink(missing_ok=True)
        self.checkpoint.unlink(missing_ok=True)


def run_sharded(cfg: PrecomputeConfig) -> PrecomputeResult:
    """``run_precompute`` for this rank of a torchrun job (see the module docstring)."""
    me = distributed.world()
    cfg = dataclasses.replace(cfg, progress=cfg.progress and me.is_main)
    inputs = resolve_inputs(cfg)
    engine = open_store(cfg) if me.is_main else None
    skip = me.is_main and complete_sae_id(engine, inputs.name) is not None and not cfg.force
    if distributed.broadcast_object(skip, step="checking the store"):
        if me.is_main:
            say(f"{inputs.name} is already complete in {cfg.db_url}; pass --force to recompute it")
        return PrecomputeResult(inputs.name, 0, inputs.sae.d_sae, True, 0)
    loaded = load_run_inputs(cfg, inputs)  # ranks building the corpus cache at once is safe (atomic rename)
    sae_id = open_staging_row(cfg, inputs, engine, loaded) if me.is_main else None
    sae_id = distributed.broadcast_object(sae_id, step="opening the staging row")
    files = RankFiles.of(cfg, sae_id, run_identity(cfg, inputs, loaded.contexts), me)
    run = Run(cfg, engine, sae_id, loaded.subject, loaded.sae, inputs.layer, loaded.contexts, files.spill)
    stats, recovered = stream_block(run, files, me)
    resumed = int(distributed.all_reduce(torch.tensor(recovered), step="counting resumed batches"))
    merged = reduce_stats(stats)  # every rank holds the merged token count; rank 0 everything
    if me.is_main:
        write_store(run, merged, inputs.name, files)
    else:
        serve_examples(files.spill, run.sae.d_sae)
    distributed.barrier("rank 0 writing the store")  # until then a rerun still needs these files
    files.remove()
    n_tokens = int(stats.n_tokens)
    if me.is_main:
        say(f"{inputs.name}: {run.sae.d_sae} features over {n_tokens} tokens from {me.size} ranks written to {cfg.db_url}")
    return PrecomputeResult(inputs.name, n_tokens, run.sae.d_sae, False, resumed)


def open_store(cfg: PrecomputeConfig):
    """Rank 0: the store's engine, its schema created or upgraded."""
    engine = create_engine_for(cfg.db_url)
    migrate(engine)
    return engine


def stream_block(run: Run, files: RankFiles, me: distributed.World) -> tuple[StreamingStats, int]:
    """Pass 1 over this rank's block of batches, from its last checkpoint; returns the
    accumulators and how many batches the checkpoint saved from being redone."""
    stats, checkpoint = new_stats(run.cfg, run.sae, run.subject), files.load()
    block = distributed.shard_range(math.ceil(len(run.contexts) / run.cfg.batch_size), me)
    if checkpoint is not None:
        stats.load_state_dict(checkpoint.state)
        say(f"rank {me.rank}: resuming after batch {checkpoint.batches_done} of {block.start}..{block.stop - 1}")
    first_pass(run, stats, checkpoint, block=block, save=files.save)
    return stats, checkpoint.batches_done - block.start if checkpoint else 0


def write_store(run: Run, merged: StreamingStats, name: str, files: RankFiles) -> None:
    """Rank 0: the results (examples read from every rank's spill) in one transaction."""
    examples = functools.partial(gather_examples, files.spill, n_features=run.sae.d_sae)
    rows = store_rows(collect_results(run, merged, examples=examples))
    n_tokens = int(merged.n_tokens)
    summary = {"n_tokens": n_tokens, "density_hist": density_histogram(merged.features.count, n_tokens)}
    publish(run.engine, run.sae_id, name, name, summary, rows)


def open_staging_row(cfg: PrecomputeConfig, inputs: Inputs, engine, loaded) -> int:
    """Rank 0: the subject's rows and the staging SAE row (its single-process checkpoint, if
    any, is not used: the ranks keep their own)."""
    subject = loaded.subject
    model_id = ensure_model(engine, subject.describe(), subject.bos_token_id, lambda: vocab_strings(subject))
    sae_id, _ = open_staging(engine, inputs.name, sae_row_values(cfg, inputs, loaded.sae, model_id, loaded.contexts))
    return sae_id


def gather_examples(spill: Path, wanted: np.ndarray, n_features: int) -> dict[int, PackedActs]:
    """Rank 0: the per-token activations of the ``wanted`` examples from every rank's spill."""
    distributed.broadcast_object(wanted, step="choosing examples")
    found: dict[int, PackedActs] = {}
    for part in distributed.gather_objects(own_examples(spill, wanted, n_features), step="collecting examples"):
        found.update(part)
    return found


def serve_examples(spill: Path, n_features: int) -> None:
    """Other ranks: answer rank 0's ``gather_examples`` from this rank's spill."""
    wanted = distributed.broadcast_object(None, step="choosing examples")
    distributed.gather_objects(own_examples(spill, wanted, n_features), step="collecting examples")


def own_examples(spill: Path, wanted: np.ndarray, n_features: int) -> dict[int, PackedActs]:
    """The wanted examples in this rank's spill (none if its block of the corpus was empty)."""
    return example_activations(spill, wanted, n_features) if spill.is_file() and len(wanted) else {}
