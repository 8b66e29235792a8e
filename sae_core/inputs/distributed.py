"""torch.distributed for saescope: one process per rank, launched by torchrun.

    torchrun --nproc-per-node N -m sae_core precompute ...   (or train)

``session()`` joins the process group that torchrun describes in the environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and leaves it at the end; without torchrun it
does nothing, and every helper here degrades to the identity for a world of one process, so the
single-process path and the sharded one are the same code.

Backends: gloo on the CPU; with CUDA, "cpu:gloo,cuda:nccl", so CPU tensors (precompute's
statistics) travel over gloo and CUDA tensors (gradients) over NCCL. A peer that dies makes the
next collective fail at once (gloo sees the closed connection; torchrun also stops the other
ranks), and a peer that hangs makes it fail after ``SAESCOPE_DIST_TIMEOUT_S``; either way the
error is a ``DistributedError`` naming the step, and rerunning the command resumes.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
from collections.abc import Callable, Iterator
from typing import NamedTuple, TypeVar

import torch
import torch.distributed as dist

from sae_core.errors import SaescopeError

T = TypeVar("T")

# Seconds a rank waits in a collective for a peer that neither answers nor disconnects. Generous,
# because ranks wait for rank 0 while it writes the store; a dead peer is noticed at once anyway.
DEFAULT_TIMEOUT_S = 3600
# Seconds the other ranks wait while rank 0 builds something they then reuse (an activation cache
# of a large corpus takes hours).
MAIN_FIRST_TIMEOUT_S = 7 * 24 * 3600


# A gloo group for host-side waits (monitored_barrier is gloo-only), when the default group also
# runs NCCL; None: the default group is gloo already, or there is no group.
_host_group: dist.ProcessGroup | None = None


class DistributedError(SaescopeError):
    """A rank lost its peers; the message says which step failed and how to resume."""


class World(NamedTuple):
    rank: int  # this process, 0..size-1
    size: int  # processes in the job
    local_rank: int  # this process on its machine: which GPU it drives

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """This process's place in the job; (0, 1, 0) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return World(0, 1, 0)


def is_main() -> bool:
    return world().is_main


def launched_world() -> World:
    """The world torchrun's environment asks for (before or without joining it)."""
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def backend() -> str:
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


@contextlib.contextmanager
def session() -> Iterator[World]:
    """Join torchrun's process group for the duration (nothing to do for one process, or when
    already joined)."""
    wanted = launched_world()
    if wanted.size == 1 or dist.is_initialized():
        yield world()
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(wanted.local_rank)
    timeout = datetime.timedelta(seconds=float(os.environ.get("SAESCOPE_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S)))
    _bind_world_defaults_unset()
    try:
        dist.init_process_group(backend(), timeout=timeout)
    except (RuntimeError, ValueError) as err:
        raise DistributedError(
            f"rank {wanted.rank} of {wanted.size} could not join the job ({first_line(err)}); launch it with torchrun"
        ) from err
    global _host_group
    try:
        if backend() != "gloo":
            _host_group = dist.new_group(backend="gloo")
        yield world()
        # every rank done before any leaves (not on the way out of an error, where the other
        # ranks may never come). The aborts at exit this barrier was once meant to stop came
        # from the group outliving destroy_process_group: see _bind_world_defaults_unset.
        dist.barrier()
    finally:
        _host_group = None
        dist.destroy_process_group()


def _bind_world_defaults_unset() -> None:
    """Import ``torch.distributed.nn.functional`` before the process group exists.

    Its functions take ``group=group.WORLD`` as a default argument, bound when the module is
    imported: imported after ``init_process_group`` (as ``torch._dynamo`` does, which the first
    optimizer imports), ten defaults hold the group for good. ``destroy_process_group`` then
    cannot free it, so gloo's worker threads outlive ``session()`` into interpreter shutdown,
    and one that drops the last reference to a finished all-reduce's tensor then takes the
    GIL, which ends the thread by a forced unwind that C++ answers with ``std::terminate``:
    "terminate called without an active exception", SIGABRT, in one run in 20 to 30 of the
    tests' two-rank training. Imported first, the defaults are None, read as the default group
    when called."""
    import torch.distributed.nn.functional  # noqa: F401


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def collective(step: str, fn: Callable[[], T]) -> T:
    """Run a collective; a lost peer becomes one clear DistributedError."""
    try:
        return fn()
    except (RuntimeError, dist.DistBackendError) as err:
        me = world()
        raise DistributedError(
            f"rank {me.rank} of {me.size} lost its peers during {step} ({first_line(err)}); "
            "see the other ranks' output, then rerun the same command to resume"
        ) from err


# ---------------------------------------------------------------------------------------------
# Sharding


def shard_range(n: int, me: World | None = None) -> range:
    """This rank's contiguous block of ``n`` items: rank r gets [r·n/N, (r+1)·n/N)."""
    me = me or world()
    return range(me.rank * n // me.size, (me.rank + 1) * n // me.size)


@contextlib.contextmanager
def main_first(step: str) -> Iterator[None]:
    """Rank 0 runs the body first (e.g. builds a cache), then the others run it (and reuse it).
    The others wait up to MAIN_FIRST_TIMEOUT_S, however long the process group's timeout; a
    rank 0 that dies still fails them at once."""
    if not is_main():
        wait_for_main(step)
    yield
    if is_main():
        wait_for_main(step)


def wait_for_main(step: str) -> None:
    if world().size > 1:
        timeout = datetime.timedelta(seconds=MAIN_FIRST_TIMEOUT_S)
        collective(step, lambda: dist.monitored_barrier(_host_group, timeout=timeout, wait_all_ranks=True))


# ---------------------------------------------------------------------------------------------
# Collectives; each is the identity for one process

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def barrier(step: str) -> None:
    if world().size > 1:
        collective(step, dist.barrier)


def all_reduce(tensor: torch.Tensor, op: str = "sum", *, step: str = "a reduction") -> torch.Tensor:
    """Reduce ``tensor`` over ranks in place (op: sum, max or min) and return it."""
    if world().size > 1:
        collective(step, lambda: dist.all_reduce(tensor, op=_OPS[op]))
    return tensor


def all_gather(tensor: torch.Tensor, *, step: str = "a gather") -> torch.Tensor:
    """Every rank's ``tensor`` (same shape everywhere), concatenated along dim 0 in rank order."""
    size = world().size
    if size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(size)]
    collective(step, lambda: dist.all_gather(parts, tensor.contiguous()))
    return torch.cat(parts)


def gather_ragged(tensor: torch.Tensor, *, step: str = "a gather") -> list[torch.Tensor] | None:
    """Every rank's ``tensor`` (first dimension may differ) on rank 0, in rank order; None elsewhere."""
    me = world()
    if me.size == 1:
        return [tensor]
    lengths = all_gather(torch.tensor([tensor.shape[0]], device=tensor.device), step=step).tolist()
    padded = torch.zeros((max(*lengths, 1), *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(me.size)] if me.is_main else None
    collective(step, lambda: dist.gather(padded, parts, dst=0))
    return [part[:n] for part, n in zip(parts, lengths, strict=True)] if me.is_main else None


def broadcast_object(obj: T, *, step: str = "a broadcast") -> T:
    """Rank 0's ``obj`` on every rank (pickled; small objects only)."""
    if world().size == 1:
        return obj
    box = [obj if is_main() else None]
    collective(step, lambda: dist.broadcast_object_list(box, src=0, device=torch.device("cpu")))
    return box[0]


def gather_objects(obj: T, *, step: str = "a gather") -> list[T] | None:
    """Every rank's ``obj`` on rank 0, in rank order (pickled over CPU tensors); None elsewhere."""
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    parts = gather_ragged(data, step=step)
    return None if parts is None else [pickle.loads(part.numpy().tobytes()) for part in parts]
