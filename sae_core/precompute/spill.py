"""The first pass's sparse activations on disk, so the second pass never runs the model again.

An SAE as wide as 8,192 features picks ~45 contexts per feature, so nearly every context of a
corpus of thousands is someone's example: re-running the model over "only the chosen contexts"
would be a second full forward pass. Instead the first pass appends each batch's nonzero entries
(12 bytes each: position, feature, value; a TopK SAE with k = 32 writes ~400 bytes per token) to
one file, and the second pass streams that file once, keeping only the (context, feature) pairs
that were chosen as examples.

Record: int64[3] header (n_contexts, seq, n_entries), int64[n_contexts] context ids,
int32[n] position in the (n_contexts * seq) grid, int32[n] feature, float32[n] value.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from sae_core.store.db import pack_acts_rows


class SpillRecord(NamedTuple):
    context_ids: np.ndarray  # (B,) int64
    seq: int
    grid: np.ndarray  # (n,) int32 row * seq + position
    feature: np.ndarray  # (n,) int32
    value: np.ndarray  # (n,) float32


class SpillWriter:
    """Appends records; ``sync()`` makes everything written so far durable and returns its length."""

    def __init__(self, path: Path, valid_bytes: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as fh:  # create if missing, then cut off anything past the checkpoint
            fh.truncate(valid_bytes)
        self._fh = open(path, "ab")

    def append(self, context_ids: torch.Tensor, seq: int, grid: torch.Tensor, feature: torch.Tensor, value: torch.Tensor) -> None:
        header = np.asarray([context_ids.numel(), seq, grid.numel()], dtype="<i8")
        for array in (
            header,
            context_ids.numpy().astype("<i8"),
            grid.numpy().astype("<i4"),
            feature.numpy().astype("<i4"),
            value.numpy().astype("<f4"),
        ):
            self._fh.write(array.tobytes())

    def sync(self) -> int:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        return self._fh.tell()

    def close(self) -> None:
        self._fh.close()


def read_spill(path: Path) -> Iterator[SpillRecord]:
    with open(path, "rb") as fh:
        while header := fh.read(24):
            n_contexts, seq, n = np.frombuffer(header, dtype="<i8")
            context_ids = np.frombuffer(fh.read(8 * int(n_contexts)), dtype="<i8")
            grid = np.frombuffer(fh.read(4 * int(n)), dtype="<i4")
            feature = np.frombuffer(fh.read(4 * int(n)), dtype="<i4")
            value = np.frombuffer(fh.read(4 * int(n)), dtype="<f4")
            yield SpillRecord(context_ids, int(seq), grid, feature, value)


class PackedActs(NamedTuple):
    blob: bytes  # store.pack_acts format
    max_act: float
    max_pos: int


def example_activations(path: Path, wanted: np.ndarray, n_features: int) -> dict[int, PackedActs]:
    """Per-token activations of the (context, feature) pairs ``wanted`` (keys context * F + feature,
    sorted, unique), packed for the store."""
    out: dict[int, PackedActs] = {}
    for record in read_spill(path):
        row, position = np.divmod(record.grid.astype(np.int64), record.seq)
        keys = record.context_ids[row] * n_features + record.feature
        slot = np.searchsorted(wanted, keys).clip(max=len(wanted) - 1)
        hit = wanted[slot] == keys
        if not hit.any():
            continue
        example_keys, example_row = np.unique(keys[hit], return_inverse=True)
        dense = np.zeros((len(example_keys), record.seq), dtype=np.float32)  # (examples, seq)
        dense[example_row, position[hit]] = record.value[hit]
        out.update(zip(example_keys.tolist(), (PackedActs(*p) for p in pack_acts_rows(dense)), strict=True))
    return out
