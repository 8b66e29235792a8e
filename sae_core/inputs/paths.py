"""Where saescope keeps what it makes outside the store (no torch import: the server reads it too)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where converted models, corpora, activation caches and logs live (``SAESCOPE_CACHE`` moves it)."""
    root = os.environ.get("SAESCOPE_CACHE") or Path.home() / ".cache" / "saescope"
    return Path(root)
