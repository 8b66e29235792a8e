"""The feature map: every feature of the SAEs on one hook placed in 2D by UMAP on their decoder
directions (cosine metric), so that features of different widths that write the same direction
land together."""

from __future__ import annotations

import numpy as np
import torch

N_NEIGHBORS = 15  # umap-learn's default: local structure, which is what splitting is about
MIN_DIST = 0.05  # tighter than the default 0.1: families sit as visible clumps


def feature_layout(units: list[torch.Tensor], *, seed: int = 0) -> list[np.ndarray]:
    """Unit decoder rows of each SAE (n_s, d) -> their (n_s, 2) positions in [0, 1]^2, one UMAP
    over all of them together (float32, seeded; umap-learn is imported only here)."""
    import umap

    data = torch.cat(units).numpy().astype(np.float32)  # (sum n_s, d)
    if data.shape[0] < 4:  # UMAP needs a neighbourhood; a handful of points go on a line
        points = np.stack([np.linspace(0, 1, data.shape[0]), np.full(data.shape[0], 0.5)], axis=1)
    else:
        reducer = umap.UMAP(
            n_neighbors=min(N_NEIGHBORS, data.shape[0] - 1),
            min_dist=MIN_DIST,
            metric="cosine",
            random_state=seed,
            n_jobs=1,  # random_state makes UMAP single-threaded anyway; say so rather than warn
        )
        points = reducer.fit_transform(data)
        lo, hi = points.min(axis=0), points.max(axis=0)
        points = (points - lo) / np.maximum(hi - lo, 1e-12)
    sizes = np.cumsum([u.shape[0] for u in units])[:-1]
    return [p.astype(np.float32) for p in np.split(points, sizes)]
