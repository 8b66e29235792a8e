"""What the live model process holds for each SAE it serves: the SAE and its subject model,
loaded. Shared by the live operations (``app.live.host``) and the graph jobs (``app.live.jobs``);
the types alone are named here, so importing this module loads no torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sae_core.inputs.subject import Subject
    from sae_core.saes.sae import SAE


@dataclass(frozen=True)
class LiveSae:
    """One SAE ready for live prompts: its subject model (shared by SAEs of the same model)."""

    name: str
    layer: int
    subject: Subject
    sae: SAE

    @property
    def model(self) -> tuple[Subject, SAE, int]:
        """What every live computation takes first: ``fn(subject, sae, layer, ...)``."""
        return self.subject, self.sae, self.layer
