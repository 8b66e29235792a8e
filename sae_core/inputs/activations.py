"""Activations: the subject's residual stream over a corpus, streamed or cached on disk.

``iter_activations`` streams (context ids, tokens, activations, special mask) batches in context
order, running the subject only up to the hooked block; precompute and evaluation use it.
``iter_layer_activations`` does the same for several layers from one forward per batch.

``ActivationCache`` is what training reads: the non-special tokens' activations of one
(model, layer, corpus) as fp16 ``.npy`` shards, memory-mapped when read. A shard holds the tokens
of a run of consecutive contexts (already in the corpus' shuffled order), permuted within the
shard, so reading the cache front to back gives batches that mix thousands of contexts.
``ActivationCache.build_layers`` fills the caches of several layers (each its own folder, reused
or refused on its own) from one forward per batch, to the deepest layer still missing.

Building is resumable: each shard is written to a temporary file and renamed, and only then is
``meta.json`` (also written atomically) told about it, so a killed build loses at most the shard
in progress. Shards cover fixed runs of contexts and their permutation is seeded by the shard's
index, so a resumed (or extended) build has exactly the contents of an uninterrupted one.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from sae_core.errors import SaescopeError
from sae_core.inputs.corpus import Contexts
from sae_core.inputs.paths import cache_dir
from sae_core.inputs.subject import Subject, hook_name

CACHE_FORMAT = 1  # bump when the shard layout or meta.json changes meaning
# fp16 bytes per shard: about 110k tokens (1,800 contexts) of a 576-wide model, so every batch
# read in order mixes many contexts, while the shard being built fits comfortably in memory.
DEFAULT_SHARD_BYTES = 128 << 20


class ActivationCacheError(SaescopeError):
    """An activation cache folder that cannot be used as asked; the message says what to do."""


class ActivationBatch(NamedTuple):
    """One batch of contexts and their residual stream, all on the subject's device."""

    context_ids: torch.Tensor  # (batch,) int64 row indices into Contexts.tokens
    tokens: torch.Tensor  # (batch, seq) int64
    acts: torch.Tensor  # (batch, seq, d_model) float32, residual stream after the hooked block
    special_mask: torch.Tensor  # (batch, seq) bool; True at tokens that never count


def iter_activations(
    subject: Subject,
    layer: int,
    contexts: Contexts,
    *,
    batch_size: int = 32,
    start: int = 0,
    stop: int | None = None,
    progress: bool = True,
) -> Iterator[ActivationBatch]:
    """Residual-stream activations of contexts[start:stop], in order, ``batch_size`` contexts at a time."""
    for batches in iter_layer_activations(
        subject, [layer], contexts, batch_size=batch_size, start=start, stop=stop, progress=progress
    ):
        yield batches[layer]


def iter_layer_activations(
    subject: Subject,
    layers: Sequence[int],
    contexts: Contexts,
    *,
    batch_size: int = 32,
    start: int = 0,
    stop: int | None = None,
    progress: bool = True,
    caches: Mapping[int, ActivationCache] | None = None,
) -> Iterator[dict[int, ActivationBatch]]:
    """Like ``iter_activations`` for several layers at once: each batch runs the subject once, to
    the deepest of ``layers``, and comes back as one ``ActivationBatch`` per layer (sharing ids,
    tokens and mask).

    ``caches``: layers read from an activation cache of these contexts instead (``find_cache``),
    at the fp16 precision training read them, special tokens zero; the subject runs only for the
    other layers, if any."""
    for layer in layers:
        subject.check_layer(layer)
    caches = {layer: caches[layer] for layer in layers if caches and layer in caches}
    computed = sorted(set(layers) - set(caches))
    stop = len(contexts) if stop is None else min(stop, len(contexts))
    seq = contexts.tokens.shape[1]
    device = subject.device
    counts = (~contexts.special_mask).sum(dim=1).numpy() if caches else None  # (n_contexts,) rows per context in a cache
    with tqdm(
        total=max(stop - start, 0) * seq,
        unit="tok",
        unit_scale=True,
        desc=f"activations {', '.join(hook_name(layer) for layer in sorted(set(layers)))}",
        disable=not progress,
    ) as bar:
        for lo in range(start, stop, batch_size):
            hi = min(lo + batch_size, stop)
            tokens = contexts.tokens[lo:hi].to(device)  # (batch, seq)
            resid = subject.forward_to_layers(tokens, computed) if computed else {}  # {layer: (batch, seq, d_model)}
            for layer, cache in caches.items():
                resid[layer] = cache.context_acts(lo, hi, counts, contexts.special_mask[lo:hi]).to(device)
            context_ids = torch.arange(lo, hi, device=device)
            special = contexts.special_mask[lo:hi].to(device)
            yield {layer: ActivationBatch(context_ids, tokens, acts, special) for layer, acts in resid.items()}
            bar.update((hi - lo) * seq)


class _Shard(NamedTuple):
    """A shard on disk: the activations of contexts [start, stop), permuted."""

    file: str  # name inside the cache folder
    start: int  # first context id
    stop: int  # one past the last context id
    n_tokens: int  # rows: the non-special tokens of those contexts


class ActivationCache:
    """A finished on-disk cache, memory-mapped; build or open it with the class methods."""

    def __init__(self, folder: Path, meta: dict, shards: list[np.ndarray]):
        self.folder = folder
        self.meta = meta
        self._shards = shards  # each (n_tokens_i, d_model) float16, memory-mapped
        self._offsets = [0, *np.cumsum([len(shard) for shard in shards]).tolist()]
        self._order: tuple[int, np.ndarray] | None = None  # a shard's rows in context order (context_acts)

    @property
    def n_tokens(self) -> int:
        return self._offsets[-1]

    @property
    def d_model(self) -> int:
        return int(self.meta["d_model"])

    def __len__(self) -> int:
        return self.n_tokens

    @staticmethod
    def default_folder(subject: Subject, layer: int, contexts: Contexts) -> Path:
        """Where commands keep the cache of this model, layer and corpus.

        The corpus part hashes the whole fingerprint, so subsets whose fingerprints share a
        prefix (a training split, say) get folders of their own.
        """
        model = re.sub(r"[^A-Za-z0-9_.-]+", "_", subject.name).strip("_.")[-60:] or "model"
        corpus = hashlib.sha256(contexts.fingerprint.encode()).hexdigest()[:16]
        return cache_dir() / "activations" / f"{model}-L{layer}-{corpus}"

    @classmethod
    def open(cls, folder: str | Path) -> ActivationCache:
        folder = Path(folder)
        meta = _read_meta(folder)
        if meta is None:
            raise ActivationCacheError(
                f"{folder} holds no activation cache (no meta.json); build one first"
            )
        if meta["format"] != CACHE_FORMAT:
            raise ActivationCacheError(
                f"the activation cache in {folder} has format {meta['format']}, this saescope reads "
                f"format {CACHE_FORMAT}; delete it and build again"
            )
        if not meta["complete"]:
            raise ActivationCacheError(
                f"the activation cache in {folder} is unfinished ({meta['n_tokens']:,} tokens so far); "
                "build it again to resume"
            )
        shards = [_map_shard(folder, _Shard(*entry), meta["d_model"]) for entry in meta["shards"]]
        return cls(folder, meta, shards)

    @classmethod
    def build(
        cls,
        subject: Subject,
        layer: int,
        contexts: Contexts,
        folder: str | Path,
        *,
        max_tokens: int | None = None,
        batch_size: int = 32,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        progress: bool = True,
    ) -> ActivationCache:
        """Cache at least ``max_tokens`` non-special tokens' activations (all of the corpus by default).

        Resumes an unfinished build in ``folder`` and extends a finished smaller one; a finished
        cache that is large enough is reused as it is. ``shard_bytes`` applies to a new cache only.
        """
        caches = cls.build_layers(
            subject,
            {layer: folder},
            contexts,
            max_tokens=max_tokens,
            batch_size=batch_size,
            shard_bytes=shard_bytes,
            progress=progress,
        )
        return caches[layer]

    @classmethod
    def build_layers(
        cls,
        subject: Subject,
        folders: Mapping[int, str | Path],
        contexts: Contexts,
        *,
        max_tokens: int | None = None,
        batch_size: int = 32,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        progress: bool = True,
    ) -> dict[int, ActivationCache]:
        """The caches of several layers of one model and corpus (``folders``: layer -> its folder),
        each resumed, extended, reused or refused as ``build`` does, with the missing shards of all
        of them written from one forward per batch, to the deepest layer still missing."""
        for layer in folders:
            subject.check_layer(layer)
        target = _contexts_for(contexts, max_tokens)
        with contextlib.ExitStack() as locks:
            pending = []
            for layer, folder in folders.items():
                folder = Path(folder)
                folder.mkdir(parents=True, exist_ok=True)
                locks.enter_context(_exclusive(folder))
                wanted = _new_meta(subject, layer, contexts, shard_bytes)
                meta = _read_meta(folder)
                if meta is None:
                    meta = wanted
                else:
                    _check_same_source(folder, meta, wanted)
                shards = [_Shard(*entry) for entry in meta["shards"]]
                if not (meta["complete"] and shards and shards[-1].stop >= target):
                    pending.append(_LayerCache(layer, folder, meta, shards))
            if pending:
                _Builder(subject, contexts, batch_size, progress).run(pending, target)
        return {layer: cls.open(folder) for layer, folder in folders.items()}

    def token_batches(
        self, batch_size: int, *, start: int = 0, stop: int | None = None
    ) -> Iterator[torch.Tensor]:
        """Rows [start, stop) in order, as float32 (batch_size, d_model) batches; the last may be shorter.

        The rows were shuffled when the cache was built, so reading in order is random order.
        """
        if batch_size < 1:
            raise ActivationCacheError(f"batch_size must be at least 1, not {batch_size}")
        stop = self.n_tokens if stop is None else min(stop, self.n_tokens)
        if not 0 <= start <= stop:
            raise ActivationCacheError(
                f"start {start} is outside 0..{stop} for a cache of {self.n_tokens:,} tokens"
            )
        for lo in range(start, stop, batch_size):
            yield self._rows(lo, min(lo + batch_size, stop))

    def context_acts(self, start: int, stop: int, counts: np.ndarray, special_mask: torch.Tensor) -> torch.Tensor:
        """The activations of contexts [start, stop) as a forward gives them, (stop - start, seq,
        d_model) float32, from the shards' rows put back in context order (zero at the special
        tokens, which the cache leaves out). ``counts``: non-special tokens of each context from 0
        to at least ``stop``; ``special_mask``: (stop - start, seq) of those contexts. Refuses
        contexts whose tokens are not the cache's, which it can tell by the counts."""
        if not 0 <= start < stop <= int(self.meta["n_contexts"]):
            raise ActivationCacheError(f"the activation cache in {self.folder} has no contexts {start}..{stop - 1}")
        rows = []
        for index, shard in enumerate(_Shard(*entry) for entry in self.meta["shards"]):
            lo, hi = max(start, shard.start), min(stop, shard.stop)
            if lo >= hi:
                continue
            begin = int(counts[shard.start : lo].sum())
            end = begin + int(counts[lo:hi].sum())
            if end > shard.n_tokens or (hi == shard.stop and end != shard.n_tokens):
                raise ActivationCacheError(
                    f"the activation cache in {self.folder} holds other contexts than these "
                    f"({shard.n_tokens:,} tokens in contexts {shard.start}..{shard.stop - 1}); build it again"
                )
            rows.append(self._shards[index][self._context_order(index, shard.n_tokens)[begin:end]])
        acts = torch.zeros(*special_mask.shape, self.d_model)
        acts[~special_mask] = torch.from_numpy(np.concatenate(rows).astype(np.float32))
        return acts

    def _context_order(self, index: int, n_rows: int) -> np.ndarray:
        """Where each of shard ``index``'s rows in context order lies in the shard (the inverse of
        the permutation ``_LayerCache.add`` shuffled it with)."""
        if self._order is None or self._order[0] != index:
            order = np.empty(n_rows, dtype=np.int64)
            order[np.random.default_rng(index).permutation(n_rows)] = np.arange(n_rows)
            self._order = (index, order)
        return self._order[1]

    def _rows(self, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) across shard borders: (hi - lo, d_model) float32."""
        parts = []
        index = bisect.bisect_right(self._offsets, lo) - 1
        while lo < hi:
            base, end = self._offsets[index], self._offsets[index + 1]
            take = min(hi, end)
            parts.append(self._shards[index][lo - base : take - base])
            lo, index = take, index + 1
        return torch.from_numpy(np.concatenate(parts).astype(np.float32))


class _LayerCache:
    """One layer's cache while it is built: its folder, meta.json and the shards it keeps."""

    def __init__(self, layer: int, folder: Path, meta: dict, stored: list[_Shard]):
        self.layer = layer
        self.folder = folder
        self.meta = meta
        self.stored = stored
        self.shards: list[_Shard] = []

    def keep_plan(self, plan: list[tuple[int, int]]) -> None:
        """Keep the stored shards the plan starts with; forget the rest, then delete them."""
        self.shards = _matching_prefix(self.stored, plan)
        self.save(complete=False)  # forget stale shards before deleting them
        for stale in self.stored[len(self.shards) :]:
            (self.folder / stale.file).unlink(missing_ok=True)

    def add(self, index: int, start: int, stop: int, rows: np.ndarray) -> None:
        """Shuffle the rows of contexts [start, stop), write them as shard ``index``, record it."""
        if not np.isfinite(rows).all():
            raise ActivationCacheError(
                f"activations of {hook_name(self.layer)} overflow fp16 in contexts {start}..{stop - 1}; "
                "this layer cannot be cached in fp16"
            )
        rows = rows[np.random.default_rng(index).permutation(len(rows))]
        shard = _Shard(f"shard_{index:05d}.npy", start, stop, len(rows))
        staging = self.folder / f"{shard.file}.tmp"
        with open(staging, "wb") as fh:
            np.save(fh, rows)
        os.replace(staging, self.folder / shard.file)
        self.shards.append(shard)
        self.save(complete=False)

    def save(self, *, complete: bool) -> None:
        self.meta["shards"] = [list(shard) for shard in self.shards]
        self.meta["n_tokens"] = sum(shard.n_tokens for shard in self.shards)
        self.meta["n_contexts"] = self.shards[-1].stop if self.shards else 0
        self.meta["complete"] = complete
        _write_meta(self.folder, self.meta)


class _Builder:
    """Writes the missing shards of several layers' caches, one atomic shard and meta update at a
    time, all the layers that miss a shard filled from the same forward passes."""

    def __init__(self, subject: Subject, contexts: Contexts, batch_size: int, progress: bool):
        self.subject = subject
        self.contexts = contexts
        self.batch_size = batch_size
        self.progress = progress
        self.counts = (~contexts.special_mask).sum(dim=1)  # (n_contexts,) non-special tokens

    def run(self, caches: list[_LayerCache], target: int) -> None:
        # Caches made with other shard sizes have other plans; each plan is its own pass.
        plans: dict[int, list[_LayerCache]] = {}
        for cache in caches:
            cache.keep_plan(_plan(target, cache.meta["contexts_per_shard"]))
            plans.setdefault(cache.meta["contexts_per_shard"], []).append(cache)
        total = int(self.counts[:target].sum()) * len(caches)
        done = sum(cache.meta["n_tokens"] for cache in caches)
        names = ", ".join(cache.folder.name for cache in caches)
        with tqdm(
            total=total, initial=done, unit="tok", unit_scale=True, desc=f"caching {names}", disable=not self.progress
        ) as bar:
            for per_shard, group in plans.items():
                plan = _plan(target, per_shard)
                for index in range(min(len(cache.shards) for cache in group), len(plan)):
                    missing = [cache for cache in group if len(cache.shards) == index]
                    self._write_shard(index, *plan[index], missing, bar)
        for cache in caches:
            cache.save(complete=True)

    def _write_shard(self, index: int, start: int, stop: int, caches: list[_LayerCache], bar: tqdm) -> None:
        n_tokens = int(self.counts[start:stop].sum())
        d_model = self.subject.d_model
        rows = {cache.layer: np.empty((n_tokens, d_model), dtype=np.float16) for cache in caches}
        filled = 0
        for batches in iter_layer_activations(
            self.subject,
            list(rows),
            self.contexts,
            batch_size=self.batch_size,
            start=start,
            stop=stop,
            progress=False,
        ):
            for layer, batch in batches.items():
                keep = batch.acts[~batch.special_mask].to("cpu", torch.float16).numpy()  # (kept, d_model)
                rows[layer][filled : filled + len(keep)] = keep
            filled += len(keep)
            bar.update(len(keep) * len(batches))
        for cache in caches:
            cache.add(index, start, stop, rows[cache.layer])


def _plan(target: int, per_shard: int) -> list[tuple[int, int]]:
    """Context ranges of the shards of a cache covering contexts [0, target)."""
    return [(start, min(start + per_shard, target)) for start in range(0, target, per_shard)]


def _matching_prefix(stored: list[_Shard], plan: list[tuple[int, int]]) -> list[_Shard]:
    """The stored shards that are exactly the plan's first shards (a short last shard is not)."""
    kept = []
    for shard, (start, stop) in zip(stored, plan, strict=False):
        if (shard.start, shard.stop) != (start, stop):
            break
        kept.append(shard)
    return kept


def _contexts_for(contexts: Contexts, max_tokens: int | None) -> int:
    """How many leading contexts hold at least ``max_tokens`` non-special tokens (all if None)."""
    if max_tokens is None:
        return len(contexts)
    if max_tokens < 1:
        raise ActivationCacheError(f"max_tokens must be at least 1, not {max_tokens}")
    cumulative = (~contexts.special_mask).sum(dim=1).cumsum(0)  # (n_contexts,)
    return min(int(torch.searchsorted(cumulative, max_tokens)) + 1, len(contexts))


def _new_meta(subject: Subject, layer: int, contexts: Contexts, shard_bytes: int) -> dict:
    per_context = 2 * subject.d_model * contexts.tokens.shape[1]  # fp16 bytes, at most
    return {
        "format": CACHE_FORMAT,
        "model": subject.describe(layer),
        "layer": layer,
        "hook_name": hook_name(layer),
        "corpus": contexts.describe(),
        "corpus_fingerprint": contexts.fingerprint,
        "rows": _rows_of(contexts),
        "d_model": subject.d_model,
        "dtype": "float16",
        "contexts_per_shard": max(1, math.ceil(shard_bytes / per_context)),
        "shards": [],
        "n_tokens": 0,
        "n_contexts": 0,
        "complete": False,
    }


def _rows_of(contexts: Contexts) -> dict:
    """Which rows of which tokenised corpus a cache's contexts are (``Contexts.source``)."""
    return {"source": contexts.source, "first": contexts.first_row}


def _rows_in(meta: dict) -> dict | None:
    """The rows a cache holds: ``meta["rows"]``, or for a cache written before saescope recorded
    them, read off the fingerprint ``held_out_split`` gives a training split (rows 0..)."""
    if "rows" in meta:
        return meta["rows"]
    source, _, end = meta["corpus_fingerprint"].rpartition("-train0-")
    return {"source": source, "first": 0} if source and end.isdigit() else None


def _model_key(meta: dict) -> tuple:
    model = meta["model"]
    return (meta["format"], model["name"], model["architecture"], model["n_layers"], model["vocab_size"], meta["d_model"], meta["layer"])


def _source_key(meta: dict) -> tuple:
    return (*_model_key(meta), meta["corpus_fingerprint"])


def find_cache(subject: Subject, layer: int, contexts: Contexts) -> ActivationCache | None:
    """A finished cache of this model and layer in the saescope cache whose contexts begin with
    all of ``contexts`` (rows 0.. of the same tokenised corpus), or None: the cache training
    built serves a precompute of a prefix of its corpus, with no forward pass."""
    if not contexts.source:
        return None
    wanted = _model_key(_new_meta(subject, layer, contexts, DEFAULT_SHARD_BYTES))
    for path in sorted((cache_dir() / "activations").glob("*/meta.json")):
        try:
            meta = _read_meta(path.parent)
        except ActivationCacheError:
            continue
        if (
            meta is not None
            and meta.get("format") == CACHE_FORMAT
            and meta["complete"]
            and _rows_in(meta) == _rows_of(contexts)
            and meta["n_contexts"] >= len(contexts)
            and _model_key(meta) == wanted
        ):
            return ActivationCache.open(path.parent)
    return None


def _check_same_source(folder: Path, stored: dict, wanted: dict) -> None:
    if _source_key(stored) != _source_key(wanted):
        raise ActivationCacheError(
            f"{folder} caches {_summary(stored)}, not {_summary(wanted)}; pass another folder or delete this one"
        )


def _summary(meta: dict) -> str:
    corpus = meta["corpus"]
    return (
        f"{meta['model']['name']} {meta['hook_name']} on corpus {corpus['spec']!r} "
        f"({meta['corpus_fingerprint'][:12]}, format {meta['format']})"
    )


def _read_meta(folder: Path) -> dict | None:
    path = folder / "meta.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ActivationCacheError(
            f"{path} is not valid JSON ({err.msg}); delete {folder} and build again"
        ) from err


def _write_meta(folder: Path, meta: dict) -> None:
    staging = folder / "meta.json.tmp"
    staging.write_text(json.dumps(meta, indent=1))
    os.replace(staging, folder / "meta.json")


def _map_shard(folder: Path, shard: _Shard, d_model: int) -> np.ndarray:
    path = folder / shard.file
    try:
        rows = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise ActivationCacheError(
            f"cannot read {path} ({err}); delete {folder} and build again"
        ) from err
    if rows.shape != (shard.n_tokens, d_model) or rows.dtype != np.float16:
        raise ActivationCacheError(
            f"{path} holds {rows.dtype} {rows.shape}, expected float16 {(shard.n_tokens, d_model)}; "
            f"delete {folder} and build again"
        )
    return rows


@contextlib.contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on the folder, so two builds never write the same cache."""
    with open(folder / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise ActivationCacheError(
                f"another process is building the activation cache in {folder}; wait for it or use another folder"
            ) from err
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
