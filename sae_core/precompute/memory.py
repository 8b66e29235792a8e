"""How precompute's process gives memory back to the system between its phases."""

from __future__ import annotations

import ctypes
import functools


def give_back_freed() -> None:
    """Return the pages of freed C-heap blocks to the system (glibc's ``malloc_trim(0)``), at a
    phase boundary: glibc raises its mmap threshold as large blocks are freed, so the pass's
    temporaries end up in the heap, where tensors that live on keep the space freed around them
    from going back on its own. A call costs milliseconds; nothing where there is no
    malloc_trim (not glibc). (Fixing the mmap threshold instead, so every large block is mapped
    and unmapped on its own, kept the memory low but cost the model's forward ~25% more CPU in
    page faults.)"""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    return getattr(ctypes.CDLL(None), "malloc_trim", None)
