"""Precompute every feature of a set of SAEs (a release) into the store, in one corpus pass.

    pass 1   corpus -> subject (once per batch, to the deepest layer any SAE reads) -> every SAE
             on its layer, sparse -> its streaming accumulators (all features at once;
             sae_core.precompute.stats) + its sparse activations appended to its spill file;
             a checkpoint of every SAE every ``checkpoint_every`` batches
    results  per SAE: intervals, co-activation neighbours, token index (precompute_results);
             logit effects and decoder neighbours from the weights (precompute_weights)
    pass 2   per SAE: its spill streamed once for the per-token activations of the chosen examples
    write    per SAE, one transaction: rows under its staging row, then the swap into its release
             (sae_core.precompute.writer)

``run_precompute(PrecomputeConfig(...))`` (sae_core.precompute.job) is the whole job; ``saescope precompute`` and
``saescope demo`` call it. Each SAE is skipped when complete, resumed from its own last checkpoint,
or replaced with ``force``, exactly as when it is precomputed alone, and its store rows are the
same. Under ``torchrun --nproc-per-node N -m sae_core precompute ...`` each rank streams a block of
the corpus and rank 0 writes the same store (sae_core.precompute.sharded).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from sqlalchemy.engine import Engine

from sae_core.families.feed import Feed, open_feeds, publish_feeds, start_maps
from sae_core.families.layout import LayoutsBeside
from sae_core.families.run import FamiliesConfig, run_families
from sae_core.inputs import distributed
from sae_core.inputs.activations import ActivationCache, find_cache, iter_layer_activations
from sae_core.inputs.corpus import Contexts, build_contexts
from sae_core.inputs.device import pick_device
from sae_core.inputs.subject import Subject, hook_name, load_subject
from sae_core.inputs.token_bytes import is_partial, token_bytes
from sae_core.precompute.checkpoint import Checkpoint, ResumeFiles
from sae_core.precompute.config import PrecomputeConfig, PrecomputeError
from sae_core.precompute.encode import DictionaryCodes, sae_fingerprint
from sae_core.precompute.memory import give_back_freed
from sae_core.precompute.results import (
    coactivation_neighbours,
    density_histogram,
    feature_words,
    final_intervals,
    ordered_samples,
    token_index,
)
from sae_core.precompute.rows import RowInputs, store_rows
from sae_core.precompute.spill import PackedActs, SpillWriter, example_activations
from sae_core.precompute.stats import StreamingStats, one_thread
from sae_core.precompute.weights import decoder_neighbours, logit_effects
from sae_core.precompute.writer import (
    complete_sae_id,
    ensure_model,
    file_complete,
    open_staging,
    publish,
    reclaim_space,
)
from sae_core.saes.formats import find_saes, load_sae, nested_prefixes, stored_prefix
from sae_core.saes.sae import SAE
from sae_core.store.db import create_engine_for, migrate, writer_lock
from sae_core.store.releases import claim_release

TRIM_EVERY = 8  # batches between giving freed heap pages back (a malloc_trim: milliseconds)
URL_ID = re.compile(r"[A-Za-z0-9._-]{1,150}")  # SAE and release names are URL path segments


class PrecomputeResult(NamedTuple):
    name: str
    n_tokens: int
    n_features: int
    skipped: bool  # already complete, nothing done
    resumed_from_batch: int  # 0 for a fresh run


class Inputs(NamedTuple):
    """One SAE of a precompute call, and the model, layer and store name it is precomputed under."""

    sae: SAE
    model: str
    layer: int
    name: str
    path: Path  # what it was loaded from
    # a Matryoshka dictionary's nested SAE (or the whole): the dictionary, whose codes cut at
    # sae.d_sae are its codes (sae_core.precompute.encode.DictionaryCodes); None for other SAEs
    dictionary: SAE | None = None


class Release(NamedTuple):
    """What one precompute call is asked to do: its SAEs, all of one model, and their release."""

    saes: list[Inputs]
    model: str
    name: str


class Run(NamedTuple):
    """A precompute in progress: what it reads and where it writes."""

    cfg: PrecomputeConfig
    engine: Engine
    subject: Subject
    contexts: Contexts
    caches: Mapping[int, ActivationCache]  # layers read from an activation cache, not computed


def open_run(cfg: PrecomputeConfig, engine: Engine, subject: Subject, todo: list[Inputs]) -> Run:
    """The corpus of the run, and the caches that serve its layers when asked to reuse them."""
    contexts = load_contexts(cfg, subject)
    caches = {}
    layers = sorted({inputs.layer for inputs in todo}) if cfg.reuse_activations else []
    for layer in layers:
        cache = find_cache(subject, layer, contexts)
        if cache is None:
            say(f"no activation cache of {hook_name(layer)} holds these {len(contexts):,} contexts; running the model for it")
        else:
            say(f"{hook_name(layer)}: activations read from {cache.folder}, not computed")
            caches[layer] = cache
    return Run(cfg, engine, subject, contexts, caches)


class Target(NamedTuple):
    """One SAE being precomputed: its inputs (SAE on the subject's device), staging row, and spill
    and checkpoint files."""

    inputs: Inputs
    sae_id: int
    files: ResumeFiles

    @property
    def sae(self) -> SAE:
        return self.inputs.sae


class Stream(NamedTuple):
    """One SAE's side of pass 1: its accumulators, its last checkpoint, where checkpoints go."""

    target: Target
    stats: StreamingStats
    checkpoint: Checkpoint | None
    save: Callable[[Checkpoint], None]

    @property
    def batches_done(self) -> int | None:
        return self.checkpoint.batches_done if self.checkpoint else None


def run_in_process(cfg: PrecomputeConfig) -> list[PrecomputeResult]:
    """Every SAE of ``cfg`` precomputed into the store by this process alone (or skipped when
    complete), in order."""
    release = resolve_release(cfg)
    subject = load_checked_subject(cfg, release.model, release.saes)
    engine = create_engine_for(cfg.db_url)
    migrate(engine)
    try:
        with writer_lock(engine, release.name):  # a second identical run refuses, in one line
            return precompute_into(engine, cfg, release, subject)
    finally:
        engine.dispose()


def precompute_into(engine: Engine, cfg: PrecomputeConfig, release: Release, subject: Subject) -> list[PrecomputeResult]:
    """The single-process run on an open, migrated engine: skip, resume or start, then publish."""
    todo = [inputs for inputs in release.saes if cfg.force or complete_sae_id(engine, inputs.name) is None]
    claim(engine, cfg, release)
    file_skipped(engine, cfg, release, todo)
    if not todo:
        return in_given_order(release, [])
    run = open_run(cfg, engine, subject, todo)
    model_id = ensure_model(engine, subject.describe(), subject.bos_token_id, lambda: vocab_rows(subject))
    streams = [open_stream(run, inputs, model_id) for inputs in todo]
    kept = {inputs.layer for inputs in release.saes if inputs.name not in {other.name for other in todo}}
    feeds, unfed = (
        open_feeds(cfg.db_url, streams, kept, max_active=cfg.max_active, memory_budget=cfg.memory_budget) if cfg.families else ([], [])
    )
    first_pass(run, streams, feeds=feeds)
    with LayoutsBeside() as layouts:  # the large maps, beside the tail
        maps = start_maps(streams, feeds, layouts, memory_budget=cfg.memory_budget, seed=cfg.seed)
        results = [finish(run, stream.target, stream.stats, release.name, stream.batches_done or 0) for stream in streams]
        publish_feeds(engine, streams, feeds, memory_budget=cfg.memory_budget, seed=cfg.seed, maps=maps)
    if unfed:  # links need co-firing over the same tokens: a pass of their own for these layers
        say(f"layers {', '.join(map(str, unfed))}: counting co-firing in a pass of its own (some SAEs were not in this one)")
        families = FamiliesConfig(
            cfg.db_url, release.name, memory_budget_mb=cfg.memory_budget_mb, max_active=cfg.max_active, device=cfg.device, progress=cfg.progress
        )
        run_families(families, unfed)
    reclaim_space(engine)
    return in_given_order(release, results)


def finish(run: Run, target: Target, stats: StreamingStats, release: str, resumed: int) -> PrecomputeResult:
    """Results and pass 2 of one SAE, published into its release; its spill goes."""
    rows = store_rows(collect_results(run, target, stats))
    n_tokens = int(stats.n_tokens)
    summary = {"n_tokens": n_tokens, "density_hist": density_histogram(stats.features.count, n_tokens)}
    publish(run.engine, target.sae_id, target.inputs.name, release, summary, rows)
    target.files.remove()
    say(f"{target.inputs.name}: {target.sae.d_sae} features over {n_tokens} tokens written to {run.cfg.db_url}")
    return PrecomputeResult(target.inputs.name, n_tokens, target.sae.d_sae, False, resumed)


def in_given_order(release: Release, results: list[PrecomputeResult]) -> list[PrecomputeResult]:
    """A result per SAE, in the order given; those without one were skipped as complete."""
    by_name = {result.name: result for result in results}
    skipped = {inputs.name: PrecomputeResult(inputs.name, 0, inputs.sae.d_sae, True, 0) for inputs in release.saes}
    return [by_name.get(inputs.name, skipped[inputs.name]) for inputs in release.saes]


def open_stream(run: Run, inputs: Inputs, model_id: int) -> Stream:
    """Open (or reopen) the SAE's staging row, and its spill and last checkpoint."""
    sae = inputs.sae.to(run.subject.device)
    inputs = inputs._replace(sae=sae)
    values = sae_row_values(run, inputs, model_id)
    sae_id = open_staging(run.engine, inputs.name, values)
    files = ResumeFiles.of(run.cfg.db_url, sae_id, values["precompute_cfg"], distributed.world())
    stream = resume_stream(run, Target(inputs, sae_id, files))
    if stream.checkpoint is not None:
        say(f"resuming {inputs.name} after {stream.checkpoint.batches_done} batches")
    return stream


def resume_stream(run: Run, target: Target) -> Stream:
    """The SAE's accumulators, from its last checkpoint on the local disk if it has a usable one."""
    files = target.files
    stats, checkpoint = new_stats(run.cfg, target.sae, run.subject), files.load()
    if checkpoint is None and files.checkpoint.is_file():
        say(f"the checkpoint {files.checkpoint} is unreadable or its spill is missing or short; starting {target.inputs.name} again")
    if checkpoint is not None:
        stats.load_state_dict(checkpoint.state)
        checkpoint = checkpoint._replace(state={})  # held by the accumulators now
    return Stream(target, stats, checkpoint, files.save)


def say(message: str) -> None:
    print(f"saescope: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Inputs: everything a user can get wrong is refused here, before any work


def resolve_release(cfg: PrecomputeConfig) -> Release:
    """The SAEs (folders of several expanded, a Matryoshka dictionary into its nested SAEs), each
    with its model, layer and store name, and the release they go into; SAEs of different models,
    or two under one name, are refused."""
    paths = [found for given in cfg.sae_paths for found in find_saes(Path(given))]
    if not paths:
        raise PrecomputeError("no SAE given; pass --sae")
    for flag, value in (("--name", cfg.name), ("--layer", cfg.layer)):
        if value is not None and len(paths) > 1:
            raise PrecomputeError(f"{flag} applies to one SAE, and {len(paths)} are given; leave it out")
    saes = [inputs for path in paths for inputs in resolve_inputs(cfg, path)]
    first = saes[0]
    for inputs in saes[1:]:
        if inputs.model != first.model:
            raise PrecomputeError(
                f"{inputs.path} is an SAE of {inputs.model}, not {first.model} like {first.path}; "
                "precompute the SAEs of one model per call"
            )
    names: dict[str, Path] = {}
    for inputs in saes:
        if inputs.name in names:
            raise PrecomputeError(f"{names[inputs.name]} and {inputs.path} would both be stored as {inputs.name}")
        names[inputs.name] = inputs.path
    name = cfg.release or (saes[-1].name if len(paths) == 1 else default_release_name(saes))  # one folder: its (full) SAE's name
    if not URL_ID.fullmatch(name) or not name.strip("."):
        raise PrecomputeError(f"--release {name!r} must be 1-150 letters, digits, '.', '_' or '-', not only dots (it is a URL id)")
    return Release(saes, first.model, name)


def resolve_inputs(cfg: PrecomputeConfig, path: Path) -> list[Inputs]:
    """The SAE at ``path``, and the model, layer and store name it is precomputed under. A
    Matryoshka dictionary (with ``cfg.nested``) comes as its nested SAEs, narrowest first, each
    named after the dictionary with ``-p<width>``, and the full dictionary last: to every later
    stage they are SAEs like any other, so the release grid, links and map show the split."""
    sae = load_sae(path)
    model = cfg.model or sae.cfg.model_name
    if not model:
        raise PrecomputeError(f"{path} does not name its model; pass --model")
    layer = cfg.layer if cfg.layer is not None else sae.cfg.layer  # read from cfg or hook name
    if layer is None:
        raise PrecomputeError(f"cannot tell which layer {path} reads; pass --layer")
    name = cfg.name or default_name(model, layer, sae)
    prefixes = nested_prefixes(sae) if cfg.nested else []
    dictionary = sae if prefixes else None
    saes = [Inputs(sae.nested(m), model, layer, f"{name}-p{m}", path, dictionary) for m in prefixes]
    saes.append(Inputs(sae, model, layer, name, path, dictionary))
    for inputs in saes:
        if not URL_ID.fullmatch(inputs.name) or not inputs.name.strip("."):
            raise PrecomputeError(
                f"--name {inputs.name!r} must be 1-150 letters, digits, '.', '_' or '-', not only dots (it is a URL id)"
            )
    return saes


def model_slug(model: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", Path(model).name.lower().removesuffix(".gguf")).strip("-")


def default_name(model: str, layer: int, sae: SAE) -> str:
    """<model>-l<layer>-<architecture>-<width>; a Matryoshka dictionary (saved as JumpReLU) says "matryoshka"."""
    architecture = "matryoshka" if sae.cfg.saescope.get("matryoshka_prefixes") else sae.cfg.architecture
    return f"{model_slug(model)}-l{layer}-{architecture}-{sae.d_sae}"


def default_release_name(saes: list[Inputs]) -> str:
    """<model>-l<layers>-w<widths>, e.g. smollm2-135m-l15-w1024-4096-16384; hashed when too long."""
    layers = "-".join(str(layer) for layer in sorted({inputs.layer for inputs in saes}))
    widths = "-".join(str(width) for width in sorted({inputs.sae.d_sae for inputs in saes}))
    name = f"{model_slug(saes[0].model)}-l{layers}-w{widths}"
    if len(name) > 150:
        name = f"{name[:130]}-{hashlib.sha256(name.encode()).hexdigest()[:12]}"
    return name


def load_checked_subject(cfg: PrecomputeConfig, model: str, saes: list[Inputs]) -> Subject:
    """The subject model, once every SAE is checked against it (width, layer), with the blocks
    after the deepest SAE's layer freed."""
    subject = load_subject(model, device=pick_device(cfg.device))
    for inputs in saes:
        if subject.d_model != inputs.sae.d_in:
            raise PrecomputeError(
                f"{inputs.path} reads d_in={inputs.sae.d_in} but {model} has d_model={subject.d_model}; "
                "pass the right --model"
            )
        if not 0 <= inputs.layer < subject.n_layers:
            raise PrecomputeError(f"{inputs.path} reads layer {inputs.layer}, but {model} has layers 0..{subject.n_layers - 1}")
    subject.drop_blocks_after(max(inputs.layer for inputs in saes))
    return subject


def claim(engine: Engine, cfg: PrecomputeConfig, release: Release) -> None:
    """Refuse a release name held by other SAEs (unless --force) or by another model."""
    with engine.begin() as conn:
        claim_release(conn, release.name, release.model, [inputs.name for inputs in release.saes], force=cfg.force)


def file_skipped(engine: Engine, cfg: PrecomputeConfig, release: Release, todo: list[Inputs]) -> None:
    """The SAEs already complete (kept, unless --force) are filed into the release as they are."""
    for inputs in release.saes:
        if any(inputs.name == other.name for other in todo):
            continue
        file_complete(engine, complete_sae_id(engine, inputs.name), release.name)
        say(f"{inputs.name} is already complete in {cfg.db_url}; pass --force to recompute it")


def load_contexts(cfg: PrecomputeConfig, subject: Subject) -> Contexts:
    max_contexts = None if cfg.tokens is None else max(1, math.ceil(cfg.tokens / cfg.ctx_len))
    return build_contexts(
        cfg.corpus, subject.tokenizer, text_field=cfg.text_field, ctx_len=cfg.ctx_len, seed=cfg.seed, max_contexts=max_contexts
    )


def run_identity(run: Run, inputs: Inputs) -> dict:
    """Everything the result depends on; a staging run with a different identity starts over."""
    cfg, contexts = run.cfg, run.contexts
    cached = {"activations": "fp16 cache"} if inputs.layer in run.caches else {}
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
        "feature_words_size": cfg.feature_words_size,
        **cached,
    }


def sae_row_values(run: Run, inputs: Inputs, model_id: int) -> dict:
    sae = inputs.sae
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
        "path": str(inputs.path.resolve()),
        "train_cfg": meta,
        "metrics": {} if stored_prefix(meta, sae.d_sae) else read_metrics(inputs.path),  # metrics.json is the full dictionary's
        "corpus": run.contexts.describe(),
        "precompute_cfg": run_identity(run, inputs),
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


def vocab_rows(subject: Subject) -> list[dict]:
    """Every token id's display text (decoded alone, e.g. 'Ġfoo' -> ' foo'; NUL, which PostgreSQL
    text cannot hold, as its control picture '␀') and, for a token that is part of a character,
    its bytes."""
    ids = list(range(subject.vocab_size))
    texts = subject.tokenizer.batch_decode([[i] for i in ids])
    pieces = token_bytes(subject.tokenizer, ids)
    return [
        {"token_id": i, "text": text.replace("\x00", "\u2400"), "raw": piece if is_partial(piece) else None}
        for i, text, piece in zip(ids, texts, pieces, strict=True)
    ]


def new_stats(cfg: PrecomputeConfig, sae: SAE, subject: Subject) -> StreamingStats:
    return StreamingStats(
        sae.d_sae,
        subject.vocab_size,
        top_k=cfg.top_k,
        per_bin=cfg.per_bin,
        max_active=cfg.max_active,
        seed=cfg.seed,
        memory_budget=cfg.memory_budget,
    )


# ---------------------------------------------------------------------------------------------
# Pass 1


def first_pass(run: Run, streams: list[Stream], *, block: range | None = None, feeds: Sequence[Feed] = ()) -> None:
    """Stream the corpus through the model once, and every batch through each SAE into its
    accumulators and spill, checkpointing each. A stream resumes after its own checkpoint: the
    pass starts at the earliest, and a stream joins when the pass reaches its first batch.

    ``block``: the batch indices to stream (default all; a rank streams its block of them);
    ``feeds``: co-firing of SAEs on one layer, fed their codes of every batch (feature families)."""
    cfg = run.cfg
    block = block if block is not None else range(math.ceil(len(run.contexts) / cfg.batch_size))
    first = [block.start if stream.batches_done is None else stream.batches_done for stream in streams]
    live = [i for i, start in enumerate(first) if start < block.stop]
    if not live:
        return
    start = min(first[i] for i in live)
    layers = sorted({streams[i].target.inputs.layer for i in live})
    seq = run.contexts.tokens.shape[1]
    spills = {
        i: SpillWriter(streams[i].target.files.spill, streams[i].checkpoint.spill_bytes if streams[i].checkpoint else 0)
        for i in live
    }
    try:
        batches = iter_layer_activations(
            run.subject,
            layers,
            run.contexts,
            batch_size=cfg.batch_size,
            start=start * cfg.batch_size,
            stop=block.stop * cfg.batch_size,
            progress=cfg.progress,
            caches=run.caches,
        )
        for index, by_layer in enumerate(batches, start=start):
            checkpoint = (index + 1 - block.start) % cfg.checkpoint_every == 0 or index + 1 == block.stop
            codes, dictionaries = {}, DictionaryCodes(cfg.memory_budget)
            for i, spill in spills.items():
                if index < first[i]:
                    continue
                stream = streams[i]
                inputs = stream.target.inputs
                encoded = dictionaries.encode(inputs.sae, inputs.dictionary, by_layer[inputs.layer])
                codes[i] = encoded.acts
                with one_thread():
                    stream.stats.update(encoded.acts)
                spill.append(encoded.acts.context_ids, seq, encoded.grid, encoded.acts.feature, encoded.acts.value)
                if checkpoint:
                    stream.save(Checkpoint(index + 1, spill.sync(), stream.stats.state_dict()))
            for feed in feeds:
                with one_thread():
                    feed.update(codes)
                if checkpoint:
                    feed.save(index + 1)
            if index % TRIM_EVERY == 0:
                give_back_freed()  # what the last batches freed, so that the heap does not grow with the pass
    finally:
        for spill in spills.values():
            spill.close()


# ---------------------------------------------------------------------------------------------
# Results and pass 2


def collect_results(
    run: Run,
    target: Target,
    stats: StreamingStats,
    examples: Callable[[np.ndarray], dict[int, PackedActs]] | None = None,
) -> RowInputs:
    """Finish the statistics, read the chosen examples' per-token activations from the spill
    (``examples``: from keys to activations; default this process's spill), and compute the
    weight-based effects."""
    cfg, sae, subject = run.cfg, target.sae, run.subject
    give_back_freed()  # the pass's temporaries, before the tail's own
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
        sae_id=target.sae_id,
        n_tokens=int(stats.n_tokens),
        bins=cfg.bins,
        features=stats.features,
        top=top,
        intervals=intervals,
        sample_context=sample_context.view(n_features, cfg.bins, -1),
        sample_value=sample_value.view(n_features, cfg.bins, -1),
        sample_filled=sample_filled.view(n_features, cfg.bins, -1),
        packed=examples(wanted) if examples else example_activations(target.files.spill, wanted, n_features),
        context_tokens={int(c): run.contexts.tokens[int(c)] for c in np.unique(wanted // n_features)},
        logits=logit_effects(
            W_dec,
            subject.final_norm_scale().float(),
            subject.unembed.detach().float(),
            n=cfg.logit_tokens,
            bins=cfg.hist_bins,
        ),
        decoder=decoder_neighbours(W_dec, n=cfg.neighbours, memory_budget=cfg.memory_budget),
        coact=coactivation_neighbours(stats, cfg.neighbours, memory_budget=cfg.memory_budget),
        token_features=token_index(stats, cfg.token_index_size),
        feature_words=feature_words(stats, cfg.feature_words_size),
    )


def example_keys(context: torch.Tensor, filled: torch.Tensor, n_features: int, per_row: int) -> np.ndarray:
    """Keys context * F + feature of the filled slots of a (F * per_row, slots) context table."""
    feature = (torch.arange(context.shape[0]) // per_row).unsqueeze(1).expand_as(context)
    return (context[filled] * n_features + feature[filled]).numpy()
