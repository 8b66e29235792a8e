"""Precompute over several ranks: ``torchrun --nproc-per-node N -m sae_core precompute ...``.

    every rank   loads model, SAE and corpus
    every rank   streams its contiguous block of batches (sae_core.distributed.shard_range) into
                 its own accumulators and spill file, checkpointing both next to each other on
                 its local disk
    merge        sae_core.stats_merge.reduce_stats: exact, into rank 0
    pass 2       rank 0 chooses the examples and broadcasts their keys; every rank reads its own
                 spill for the ones that fell in its block and sends them to rank 0
    write        rank 0 alone touches the store: the staging row at the start, one transaction
                 at the end (sae_core.precompute_store), exactly as a single process does

The batches, and so everything computed from them, are those of a single-process run with the
same settings, and every statistic merges exactly, so the store is row for row the one a single
process writes. A killed rank makes the job fail (torchrun stops the others, or the next
collective raises DistributedError); rerunning the same command resumes every rank from its own
last checkpoint. Resuming needs the same number of ranks: checkpoints of another world size are
not looked at, and that run starts over.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sae_core import distributed
from sae_core.precompute import (
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
from sae_core.precompute_results import density_histogram
from sae_core.precompute_rows import store_rows
from sae_core.precompute_spill import PackedActs, example_activations
from sae_core.precompute_store import (
    Checkpoint,
    complete_sae_id,
    ensure_model,
    open_staging,
    publish,
)
from sae_core.stats_merge import reduce_stats
from sae_core.store import create_engine_for, migrate
from sae_core.subject import cache_dir


class RankFiles(NamedTuple):
    """One rank's resumable state on its local disk."""

    spill: Path  # sae_core.precompute_spill records of this rank's batches
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
    engine = create_engine_for(cfg.db_url) if me.is_main else None
    if me.is_main:
        migrate(engine)
    skip = distributed.broadcast_object(
        me.is_main and complete_sae_id(engine, inputs.name) is not None and not cfg.force, step="checking the store"
    )
    if skip:
        if me.is_main:
            say(f"{inputs.name} is already complete in {cfg.db_url}; pass --force to recompute it")
        return PrecomputeResult(inputs.name, 0, inputs.sae.d_sae, True, 0)
    loaded = load_run_inputs(cfg, inputs)  # ranks building the corpus cache at once is safe (atomic rename)
    sae_id = distributed.broadcast_object(open_staging_row(cfg, inputs, engine, loaded) if me.is_main else None, step="opening the staging row")
    files = RankFiles.of(cfg, sae_id, run_identity(cfg, inputs, loaded.contexts), me)
    run = Run(cfg, engine, sae_id, loaded.subject, loaded.sae, inputs.layer, loaded.contexts, files.spill)
    stats, checkpoint = new_stats(cfg, run.sae, run.subject), files.load()
    if checkpoint is not None:
        stats.load_state_dict(checkpoint.state)
        say(f"rank {me.rank}: resuming {inputs.name} after batch {checkpoint.batches_done}")
    n_batches = -(-len(run.contexts) // cfg.batch_size)
    batches = distributed.shard_range(n_batches)
    first_pass(run, stats, checkpoint, block=batches, save=files.save)
    recovered = torch.tensor(checkpoint.batches_done - batches.start if checkpoint else 0)
    resumed = int(distributed.all_reduce(recovered, step="counting resumed batches"))  # batches not redone
    merged = reduce_stats(stats)
    if me.is_main:
        rows = store_rows(collect_results(run, merged, examples=lambda wanted: gather_examples(files.spill, wanted, run.sae.d_sae)))
        n_tokens = int(merged.n_tokens)
        summary = {"n_tokens": n_tokens, "density_hist": density_histogram(merged.features.count, n_tokens)}
        publish(engine, sae_id, inputs.name, summary, rows)
    else:
        serve_examples(files.spill, run.sae.d_sae)
    distributed.barrier("rank 0 writing the store")
    files.remove()
    n_tokens = int(stats.n_tokens)  # merged into rank 0's; the other ranks hold their share
    if me.is_main:
        say(f"{inputs.name}: {run.sae.d_sae} features over {n_tokens} tokens from {me.size} ranks written to {cfg.db_url}")
    return PrecomputeResult(inputs.name, n_tokens, run.sae.d_sae, False, resumed)


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
