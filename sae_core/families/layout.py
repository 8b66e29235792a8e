"""The feature map: every feature of the SAEs on one hook placed in 2D by UMAP on their decoder
directions (cosine metric), so that features of different widths that write the same direction
land together."""

from __future__ import annotations

import multiprocessing
import warnings
from multiprocessing.pool import AsyncResult

import numpy as np
import torch

from sae_core.precompute.results import rows_per_chunk

N_NEIGHBORS = 15  # umap-learn's default: local structure, which is what splitting is about
MIN_DIST = 0.05  # tighter than the default 0.1: families sit as visible clumps
# From this many points on, umap-learn looks for neighbours approximately (pynndescent), which
# costs ~150 CPU-seconds of numba compilation in every fresh process (uncached), more than the
# search; below it, umap-learn computes every distance itself.
APPROXIMATE_FROM = 4096
# From this many points on, precompute makes the map in a process of its own beside its tail
# (``LayoutsBeside``); below it, the map takes a few seconds and a fresh process more.
BESIDE_FROM = 4096


def feature_layout(units: list[torch.Tensor], *, seed: int = 0, memory_budget: int = 256 << 20) -> list[np.ndarray]:
    """Unit decoder rows of each SAE (n_s, d) -> their (n_s, 2) positions in [0, 1]^2, one UMAP
    over all of them together (float32, seeded; umap-learn is imported only here). From
    APPROXIMATE_FROM points on, UMAP is given each point's exact nearest neighbours (chunked
    matrix products within ``memory_budget``) in place of its approximate search."""
    import umap

    data = torch.cat(units).numpy().astype(np.float32)  # (sum n_s, d)
    if data.shape[0] < 4:  # UMAP needs a neighbourhood; a handful of points go on a line
        points = np.stack([np.linspace(0, 1, data.shape[0]), np.full(data.shape[0], 0.5)], axis=1)
    else:
        n_neighbors = min(N_NEIGHBORS, data.shape[0] - 1)
        knn = cosine_neighbours(torch.cat(units), n_neighbors, memory_budget) if data.shape[0] >= APPROXIMATE_FROM else (None, None, None)
        reducer = umap.UMAP(
            n_neighbors=n_neighbors,
            min_dist=MIN_DIST,
            metric="cosine",
            random_state=seed,
            n_jobs=1,  # random_state makes UMAP single-threaded anyway; say so rather than warn
            precomputed_knn=knn,
        )
        with warnings.catch_warnings():  # no search index comes with the neighbours: we never transform
            warnings.filterwarnings("ignore", message="precomputed_knn")
            points = reducer.fit_transform(data)
        lo, hi = points.min(axis=0), points.max(axis=0)
        points = (points - lo) / np.maximum(hi - lo, 1e-12)
    sizes = np.cumsum([u.shape[0] for u in units])[:-1]
    return [p.astype(np.float32) for p in np.split(points, sizes)]


@torch.no_grad()
def cosine_neighbours(unit: torch.Tensor, k: int, memory_budget: int) -> tuple[np.ndarray, np.ndarray, None]:
    """(n, d) unit rows -> each row's k nearest rows by cosine distance 1 - cos, itself first (at
    0), as umap-learn's ``precomputed_knn`` takes them: (n, k) int32 indices and float32 distances
    ascending, and no search index. Exact, a chunk of rows of the (n, n) similarities at a time."""
    n = unit.shape[0]
    chunk = rows_per_chunk(4 * n, memory_budget)
    indices, distances = [], []
    for start in range(0, n, chunk):
        cos = unit[start : start + chunk] @ unit.T  # (chunk, n)
        rows = torch.arange(cos.shape[0])
        cos[rows, rows + start] = 2.0  # itself first, even beside a duplicate direction
        top = cos.topk(k, dim=1)
        indices.append(top.indices.int())
        distances.append((1 - top.values).clamp_(min=0))
    return torch.cat(indices).numpy(), torch.cat(distances).numpy(), None


class LayoutsBeside:
    """A process that makes feature maps while this one does other work: UMAP runs on one core
    (``random_state`` makes it single-threaded), and most of precompute's tail after the pass
    (co-activation neighbours, rows, writes) runs on one core too, leaving the other idle.
    Spawned, not forked: the parent's torch threads do not survive a fork. Nothing starts before
    the first map; leaving the ``with`` block ends the process, on an error in the parent too."""

    def __init__(self):
        self.pool = None

    def submit(self, units: list[torch.Tensor], *, seed: int, memory_budget: int) -> AsyncResult:
        """``feature_layout(units, ...)`` in the background; ``.get()`` waits for its positions."""
        if self.pool is None:
            self.pool = multiprocessing.get_context("spawn").Pool(1)
        return self.pool.apply_async(_layout_alone, ([u.numpy() for u in units], seed, memory_budget))

    def __enter__(self) -> LayoutsBeside:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if self.pool is None:
            return
        if exc_type is None:  # let it end on its own: killed, it leaves a semaphore umap's imports made
            self.pool.close()
            self.pool.join()
        else:
            self.pool.terminate()


def _layout_alone(units: list[np.ndarray], seed: int, memory_budget: int) -> list[np.ndarray]:
    torch.set_num_threads(1)  # the parent's tail has the other core
    return feature_layout([torch.from_numpy(u) for u in units], seed=seed, memory_budget=memory_budget)
