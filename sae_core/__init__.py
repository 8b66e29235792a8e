"""saescope's science: subject models, corpora, SAEs, training, metrics, precompute, live probes.

Importable without FastAPI. Heavy modules (torch, transformers) load on first use, so the
browse-only server can read the store without importing them.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_subject": "sae_core.inputs.subject",
    "Subject": "sae_core.inputs.subject",
    "load_sae": "sae_core.saes.formats",
    "SAE": "sae_core.saes.sae",
    "SAEConfig": "sae_core.saes.sae",
    "SaescopeError": "sae_core.errors",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sae_core' has no attribute {name!r}")
