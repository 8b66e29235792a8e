"""Precompute over several ranks: ``torchrun --nproc-per-node N -m sae_core precompute ...``.

    every rank   loads model, SAEs and corpus
    every rank   streams its contiguous block of batches (sae_core.inputs.distributed.shard_range)
                 through the model once and every SAE, into each SAE's own accumulators and spill
                 file, checkpointing both next to each other on its local disk
    per SAE      merge: sae_core.precompute.merge.reduce_stats, exact, into rank 0;
                 pass 2: rank 0 chooses the examples and broadcasts their keys; every rank reads
                 its own spill for the ones that fell in its block and sends them to rank 0;
                 write: rank 0 alone touches the store: the staging rows at the start, one
                 transaction per SAE at the end (sae_core.precompute.writer), as a single process

The batches, and so everything computed from them, are those of a single-process run with the
same settings, and every statistic merges exactly, so the store is row for row the one a single
process writes. A killed rank makes the job fail (torchrun stops the others, or the next
collective raises DistributedError); rerunning the same command resumes every rank from its own
last checkpoint. Resuming needs the same number of ranks: checkpoints of another world size are
not looked at, and that run starts over.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from pathlib import Path

import numpy as np
import torch

from sae_core.inputs import distributed
from sae_core.precompute.checkpoint import ResumeFiles
from sae_core.precompute.merge import reduce_stats
from sae_core.precompute.results import density_histogram
from sae_core.precompute.rows import store_rows
from sae_core.precompute.run import (
    Inputs,
    PrecomputeConfig,
    PrecomputeResult,
    Release,
    Run,
    Stream,
    Target,
    claim,
    collect_results,
    file_skipped,
    first_pass,
    in_given_order,
    load_checked_subject,
    open_run,
    resolve_release,
    resume_stream,
    run_identity,
    sae_row_values,
    say,
    vocab_rows,
)
from sae_core.precompute.spill import PackedActs, example_activations
from sae_core.precompute.stats import StreamingStats
from sae_core.precompute.writer import (
    complete_sae_id,
    ensure_model,
    open_staging,
    publish,
    reclaim_space,
)
from sae_core.store.db import StoreError, create_engine_for, migrate, writer_lock


def run_sharded(cfg: PrecomputeConfig) -> list[PrecomputeResult]:
    """``run_precompute`` for this rank of a torchrun job (see the module docstring)."""
    me = distributed.world()
    cfg = dataclasses.replace(cfg, progress=cfg.progress and me.is_main)
    release = resolve_release(cfg)
    subject = load_checked_subject(cfg, release.model, release.saes)
    engine = open_store(cfg) if me.is_main else None
    done = [me.is_main and not cfg.force and complete_sae_id(engine, i.name) is not None for i in release.saes]
    done = distributed.broadcast_object(done, step="checking the store")
    todo = [inputs for inputs, complete in zip(release.saes, done, strict=True) if not complete]
    refusal, lock = None, contextlib.ExitStack()
    if me.is_main:
        try:  # rank 0 holds the store's lock for the job: a second identical job refuses in one line
            lock.enter_context(writer_lock(engine, release.name))
            claim(engine, cfg, release)
        except StoreError as err:
            lock.close()
            refusal = str(err)
    if (refusal := distributed.broadcast_object(refusal, step="claiming the release")) is not None:
        raise StoreError(refusal)  # on every rank, so none waits for the others
    with lock:
        return precompute_shards(cfg, engine, release, subject, todo, me)


def precompute_shards(
    cfg: PrecomputeConfig, engine, release: Release, subject, todo: list[Inputs], me: distributed.World
) -> list[PrecomputeResult]:
    """This rank's part of the pass over the SAEs still to do; rank 0 writes them."""
    if me.is_main:
        file_skipped(engine, cfg, release, todo)
    if not todo:
        return in_given_order(release, [])
    run = open_run(cfg, engine, subject, todo)  # ranks building the corpus cache at once is safe (atomic rename)
    contexts = run.contexts
    sae_ids = open_staging_rows(run, todo) if me.is_main else None
    sae_ids = distributed.broadcast_object(sae_ids, step="opening the staging rows")
    block = distributed.shard_range(math.ceil(len(contexts) / cfg.batch_size), me)
    streams = []
    for inputs, sae_id in zip(todo, sae_ids, strict=True):
        inputs = inputs._replace(sae=inputs.sae.to(subject.device))
        files = ResumeFiles.of(cfg.db_url, sae_id, run_identity(run, inputs), me)
        streams.append(open_rank_stream(run, Target(inputs, sae_id, files), block, me))
    first_pass(run, streams, block=block)
    results = [finish_sae(run, stream, block, release.name, me) for stream in streams]
    if me.is_main:
        reclaim_space(engine)
    layers = [inputs.layer for inputs in release.saes]
    if me.is_main and cfg.families and len(set(layers)) < len(layers):  # co-firing is not sharded yet
        say(f"for the links and map of {release.name}, run `saescope families --release {release.name}`")
    return in_given_order(release, results)


def open_store(cfg: PrecomputeConfig):
    """Rank 0: the store's engine, its schema created or upgraded."""
    engine = create_engine_for(cfg.db_url)
    migrate(engine)
    return engine


def open_rank_stream(run: Run, target: Target, block: range, me: distributed.World) -> Stream:
    """This rank's side of pass 1 for one SAE, from its last checkpoint on the local disk."""
    stream = resume_stream(run, target)
    if stream.checkpoint is not None:
        say(f"rank {me.rank}: resuming {target.inputs.name} after batch {stream.checkpoint.batches_done} of {block.start}..{block.stop - 1}")
    return stream


def finish_sae(run: Run, stream: Stream, block: range, release: str, me: distributed.World) -> PrecomputeResult:
    """Merge one SAE's accumulators into rank 0, which writes it (examples from every rank's spill)."""
    target = stream.target
    resumed = stream.batches_done - block.start if stream.batches_done is not None else 0
    resumed = int(distributed.all_reduce(torch.tensor(resumed), step="counting resumed batches"))
    merged = reduce_stats(stream.stats)  # every rank holds the merged token count; rank 0 everything
    if me.is_main:
        write_store(run, target, merged, release)
    else:
        serve_examples(target.files.spill, target.sae.d_sae)
    distributed.barrier("rank 0 writing the store")  # until then a rerun still needs these files
    target.files.remove()
    n_tokens = int(stream.stats.n_tokens)
    if me.is_main:
        say(f"{target.inputs.name}: {target.sae.d_sae} features over {n_tokens} tokens from {me.size} ranks written to {run.cfg.db_url}")
    return PrecomputeResult(target.inputs.name, n_tokens, target.sae.d_sae, False, resumed)


def write_store(run: Run, target: Target, merged: StreamingStats, release: str) -> None:
    """Rank 0: the results (examples read from every rank's spill) in one transaction."""
    examples = functools.partial(gather_examples, target.files.spill, n_features=target.sae.d_sae)
    rows = store_rows(collect_results(run, target, merged, examples=examples))
    n_tokens = int(merged.n_tokens)
    summary = {"n_tokens": n_tokens, "density_hist": density_histogram(merged.features.count, n_tokens)}
    publish(run.engine, target.sae_id, target.inputs.name, release, summary, rows)


def open_staging_rows(run: Run, saes: list[Inputs]) -> list[int]:
    """Rank 0: the subject's rows and a staging row per SAE."""
    subject = run.subject
    model_id = ensure_model(run.engine, subject.describe(), subject.bos_token_id, lambda: vocab_rows(subject))
    return [
        open_staging(run.engine, inputs.name, sae_row_values(run, inputs, model_id))
        for inputs in saes
    ]


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
