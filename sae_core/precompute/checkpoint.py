"""Checkpoints of precompute's first pass: each SAE's accumulators, next to its activation spill.

A checkpoint is a safetensors file of the streaming accumulators whose metadata says how many
batches they hold and how long the spill was then. It is written beside the spill on the local
disk, by a single process and by every rank of a torchrun job alike, and renamed into place once
synced, so a kill leaves the previous one whole. The files are named by the store, the staging
row and the run's identity (and the rank), so a file is never read by a run it was not made for,
even when a store hands a staging row's id out again.

The accumulators of one 4,096-wide SAE are ~50 MB at 100k tokens. The file is written straight
from their memory: ``safetensors.torch.save_file`` first copies every tensor into one bytes
object, and a database row took a second copy on its way in, which made each checkpoint the
peak of the whole precompute (+85 to +130 MB for 40 MB of accumulators).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from sae_core.inputs import distributed
from sae_core.inputs.paths import cache_dir

# safetensors' names for the dtypes accumulators hold
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class Checkpoint(NamedTuple):
    batches_done: int  # batches of this run's range folded into ``state``
    spill_bytes: int  # valid length of the activation spill then
    state: dict[str, torch.Tensor]  # the accumulators' state_dict


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A safetensors file of ``tensors`` (CPU, contiguous), each written from its own memory,
    through a temporary file that is synced and renamed over ``path``."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(encoded)))
        fh.write(encoded)
        for tensor in tensors.values():
            fh.write(tensor.reshape(-1).view(torch.uint8).numpy())  # a view: no copy of the data
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class ResumeFiles(NamedTuple):
    """One SAE's resumable state on this process's local disk: its spill and last checkpoint."""

    spill: Path  # sae_core.precompute.spill records of the batches done
    checkpoint: Path  # safetensors of the accumulators; metadata: batches_done, spill_bytes

    @classmethod
    def of(cls, db_url: str, sae_id: int, identity: dict, me: distributed.World) -> ResumeFiles:
        """Named by store, staging row, run identity and rank, so a file never outlives what it
        is for (a single process is rank 0 of 1)."""
        key = hashlib.sha256(f"{db_url}|{sae_id}|{json.dumps(identity, sort_keys=True)}".encode()).hexdigest()[:20]
        stem = cache_dir() / "precompute" / f"{key}-rank{me.rank}of{me.size}"
        return cls(stem.with_suffix(".spill"), stem.with_suffix(".ckpt"))

    def load(self) -> Checkpoint | None:
        """The last checkpoint, or None if there is none, it cannot be read (damaged on disk), or
        its spill is missing or short."""
        if not self.checkpoint.is_file():
            return None
        try:
            with safe_open(self.checkpoint, framework="pt") as fh:
                meta = fh.metadata()
            batches_done, spill_bytes = int(meta["batches_done"]), int(meta["spill_bytes"])
            if not self.spill.is_file() or self.spill.stat().st_size < spill_bytes:
                return None
            return Checkpoint(batches_done, spill_bytes, load_file(self.checkpoint))
        except (SafetensorError, KeyError, TypeError, ValueError):
            return None

    def save(self, checkpoint: Checkpoint) -> None:
        """Written atomically: a kill leaves the previous checkpoint whole."""
        meta = {"batches_done": str(checkpoint.batches_done), "spill_bytes": str(checkpoint.spill_bytes)}
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        write_safetensors(self.checkpoint, {name: t.detach().cpu().contiguous() for name, t in checkpoint.state.items()}, meta)

    def remove(self) -> None:
        self.spill.unlink(missing_ok=True)
        self.checkpoint.unlink(missing_ok=True)
