"""The request parameter types every route shares, bounded to what the store can hold.

A number a request passes reaches a query, so each one is capped at ``INT_MAX`` (the widest
integer column on both backends): a larger one is a 422 here, not a database overflow. Text that
reaches the store refuses NUL, which PostgreSQL text cannot hold. NUL in a URL's path or query
string is refused before routing by ``app.guards``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Query
from pydantic import BeforeValidator, Field

from sae_core.store.db import INT_MAX

# A string without NUL, as a JSON Schema pattern (app.errors adds it to every string parameter).
NO_NUL = r"^[^\x00]*$"


def _integral(value):
    """JSON Schema counts 3.0 as an integer; request models are strict, so say so here."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# In request models (pydantic fields): a count, index or offset the store can hold.
StoreInt = Annotated[int, BeforeValidator(_integral), Field(ge=0, le=INT_MAX)]
# In request models: text a write stores (labels, authors).
StoreText = Annotated[str, Field(pattern=NO_NUL)]

FeatureIndex = Annotated[int, Path(ge=0, le=INT_MAX, description="Feature index within the SAE.")]
Offset = Annotated[int, Query(ge=0, le=INT_MAX, description="Rows to skip.")]
Bin = Annotated[int | None, Query(ge=0, le=INT_MAX, description="Only this interval bin.")]
