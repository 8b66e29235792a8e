"""Co-firing counted inside precompute's one pass over the corpus (sae_core.precompute.run).

For every layer that two or more of the pass's SAEs read, a ``Feed`` takes each batch's sparse
codes of those SAEs (the same tokens) into a ``CoFiring``, checkpoints it beside their spills
when they checkpoint, and resumes with them. When the pass is done and the SAEs published, their
links and map go into the store. A layer whose SAEs cannot all be fed from the same batch (one
was already complete, or a kill fell between their checkpoints) gets its co-firing from a pass of
its own over the same tokens instead (``sae_core.families.run``), after the others.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from multiprocessing.pool import AsyncResult
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from sqlalchemy.engine import Engine

from sae_core.families.build import FamilySae, build_families, map_units
from sae_core.families.cofiring import CoFiring
from sae_core.families.layout import BESIDE_FROM, LayoutsBeside
from sae_core.inputs.paths import cache_dir
from sae_core.precompute.stats import BatchActs


class Feed:
    """The co-firing of one layer's SAEs: ``members`` are their positions in the pass's streams,
    smallest width first."""

    def __init__(self, layer: int, members: list[int], widths: list[int], path: Path, *, max_active: int, memory_budget: int):
        self.layer = layer
        self.members = members
        self.path = path  # checkpoint file: the counts after ``batches_done`` batches
        self.cofiring = CoFiring(widths, max_active=max_active, memory_budget=memory_budget)

    def update(self, encoded: dict[int, BatchActs]) -> None:
        acts = [encoded[i] for i in self.members]
        self.cofiring.update(acts, acts[0].token_ids.numel())

    def save(self, batches_done: int) -> None:
        state = self.cofiring.state_dict("cofiring")
        state["batches_done"] = torch.tensor(batches_done)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        save_file({k: v.contiguous() for k, v in state.items()}, partial)
        partial.replace(self.path)  # a kill mid-write leaves the last whole checkpoint

    def resume(self, batches_done: int) -> bool:
        """Load the counts of the first ``batches_done`` batches; False when none were saved."""
        if not self.path.is_file():
            return False
        state = load_file(self.path)
        if int(state["batches_done"]) != batches_done:
            return False
        self.cofiring.load_state_dict(state, "cofiring")
        return True


def open_feeds(
    db_url: str, streams: Sequence, complete_layers: set[int], *, max_active: int, memory_budget: int
) -> tuple[list[Feed], list[int]]:
    """Feeds for the layers whose streams (precompute's ``Stream``s) all join the pass at one
    batch: fresh counts when that is the first batch, else those saved at it.
    ``complete_layers``: layers with an SAE of the release kept as it was (already complete).
    Returns the feeds, and the layers that need a pass of their own."""
    by_layer: dict[int, list[int]] = defaultdict(list)
    for i, stream in enumerate(streams):
        by_layer[stream.target.inputs.layer].append(i)
    feeds, unfed = [], []
    for layer, members in sorted(by_layer.items()):
        if len(members) + (layer in complete_layers) < 2:
            continue
        members.sort(key=lambda i: streams[i].target.sae.d_sae)
        ids = sorted(streams[i].target.sae_id for i in members)
        key = hashlib.sha256(f"{db_url}|{ids}".encode()).hexdigest()[:20]
        feed = Feed(layer, members, [streams[i].target.sae.d_sae for i in members],
                    cache_dir() / "precompute" / f"{key}.cofiring", max_active=max_active, memory_budget=memory_budget)  # fmt: skip
        joins = {streams[i].batches_done or 0 for i in members}
        join = joins.pop() if len(joins) == 1 else None
        if layer in complete_layers or join is None or (join > 0 and not feed.resume(join)):
            unfed.append(layer)
        else:
            feeds.append(feed)
    return feeds, unfed


def family_saes(streams: Sequence, feed: Feed) -> list[FamilySae]:
    """The feed's SAEs as the families see them: published id and decoder (float32, on the CPU)."""
    targets = [streams[i].target for i in feed.members]
    return [FamilySae(t.sae_id, t.sae.W_dec.detach().float().cpu()) for t in targets]


def start_maps(streams: Sequence, feeds: Sequence[Feed], layouts: LayoutsBeside, *, memory_budget: int, seed: int) -> dict[int, AsyncResult]:
    """The maps of the fed layers with BESIDE_FROM features or more, started in ``layouts``'
    process (the decoders are all they need), by layer."""
    return {
        feed.layer: layouts.submit(map_units(family_saes(streams, feed)), seed=seed, memory_budget=memory_budget)
        for feed in feeds
        if sum(streams[i].target.sae.d_sae for i in feed.members) >= BESIDE_FROM
    }


def publish_feeds(
    engine: Engine, streams: Sequence, feeds: Sequence[Feed], *, memory_budget: int, seed: int, maps: dict[int, AsyncResult] | None = None
) -> None:
    """Links and map of each fed layer, once its SAEs are published; ``maps``: those
    ``start_maps`` started, by layer (the others are made here)."""
    maps = maps or {}
    for feed in feeds:
        positions = maps[feed.layer].get() if feed.layer in maps else None
        build_families(engine, family_saes(streams, feed), feed.cofiring, memory_budget=memory_budget, seed=seed, positions=positions)
        feed.path.unlink(missing_ok=True)
