"""Where saescope keeps what it makes once and reuses: a module of its own so that readers of the
cache (labels) need not import torch, as ``sae_core.inputs.subject`` does."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where converted models, corpora and activation caches live (``SAESCOPE_CACHE`` moves it)."""
    root = os.environ.get("SAESCOPE_CACHE") or Path.home() / ".cache" / "saescope"
    return Path(root)
