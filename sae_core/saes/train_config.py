"""What a training run is asked to do: ``TrainConfig`` (every default explained) and the
architectures it knows, with the SAELens architecture each is saved as."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from sae_core.errors import SaescopeError
from sae_core.saes.sae import default_width

ARCHITECTURES = ("topk", "batchtopk", "matryoshka", "relu")


SAVED_ARCHITECTURE = {"topk": "topk", "batchtopk": "jumprelu", "matryoshka": "jumprelu", "relu": "standard"}

# Architectures whose selection is a threshold over the whole batch: saved as JumpReLU with one
# global threshold, measured after training.
BATCH_THRESHOLD = ("batchtopk", "matryoshka")


class TrainError(SaescopeError):
    """A training run that cannot start or resume as asked."""


@dataclass
class TrainConfig:
    # -- what to read -----------------------------------------------------------------------
    model: str = "smollm2-135m"  # the embedded default subject runs offline
    layer: int = 15  # the middle of SmolLM2's 30 blocks, where Scaling Monosemanticity looks
    corpus: str = "default"  # stdlib sources + pydoc topics: on disk, no network needed
    text_field: str = "text"  # JSONL / datasets field, the common name
    ctx_len: int = 64  # short windows keep the subject's forward cheap; enough context mid-model
    # -- the SAE ----------------------------------------------------------------------------
    architecture: str = "topk"  # TopK needs no sparsity tuning and shows no shrinkage
    width: int | None = None  # None: power of two nearest 16·d_model (8192 for SmolLM2)
    k: int = 32  # REFERENCE sweeps 16–128; 32 balances reconstruction and interpretability
    # Matryoshka: the nested dictionary sizes, ascending, the last the whole width (e.g.
    # 1024, 4096, 16384); each prefix of latents is trained to reconstruct on its own.
    prefixes: list[int] | None = None
    l1_coeff: float = 5.0  # λ of the relu recipe; Anthropic's value for inputs scaled to sqrt(d)
    # -- optimisation -----------------------------------------------------------------------
    tokens: int = 2_000_000  # about 25 minutes of training on two CPU cores
    cache_tokens: int | None = None  # activations cached and cycled; None: `tokens` (one epoch).
    # Fewer tokens = several epochs: the subject's forward pass is the slow part on a CPU.
    batch_size: int = 4096  # the recipe's batch: large enough for stable TopK statistics
    lr: float | None = None  # None: 2e-4/sqrt(width/16384) (TopK), 5e-5 (relu), per the papers
    warmup_steps: int = 1000  # linear lr warm-up; capped at 5% of the steps for short runs
    decay_fraction: float = 0.2  # lr decays linearly to 0 over this last part of the run
    grad_clip: float = 1.0  # Anthropic clips at norm 1; harmless for TopK's O(1) FVU loss
    aux_k: int | None = None  # None: d_model // 2 dead latents reconstruct the residual (OpenAI)
    aux_coeff: float = 1 / 32  # OpenAI's AuxK weight: revives dead latents, barely moves the MSE
    dead_tokens: int | None = None  # None: min(10M, tokens/10): OpenAI's window, scaled to the run
    # BatchTopK's θ averages this many batches' smallest selected value after training; the
    # per-batch value varies by ~1%. (A running mean kept during training lags the weights: after
    # a 300-step run it sat 13% high and cut SmolLM2's inference L0 from 32 to 19.)
    threshold_batches: int = 16
    seed: int = 0  # initialisation and corpus shuffling
    checkpoint_every: int = 50  # steps; ~1 minute of CPU work lost at most on a kill
    # -- evaluation -------------------------------------------------------------------------
    eval_contexts: int = 256  # held-out contexts (16k tokens at ctx_len 64): CE within ~0.01
    device: str = "cpu"  # where the subject and SAE run

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise TrainError(
                f"unknown architecture {self.architecture!r}; choose one of {', '.join(ARCHITECTURES)}"
            )
        for name in ("tokens", "batch_size", "k", "checkpoint_every", "eval_contexts"):
            if getattr(self, name) <= 0:
                raise TrainError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        self._check_prefixes()

    def _check_prefixes(self) -> None:
        if self.architecture != "matryoshka":
            if self.prefixes is not None:
                raise TrainError("--prefixes is for --arch matryoshka only")
            return
        prefixes = self.prefixes
        if not prefixes:
            raise TrainError("--arch matryoshka needs --prefixes, e.g. --prefixes 1024,4096,16384")
        if prefixes[0] <= 0 or any(b <= a for a, b in itertools.pairwise(prefixes)):
            raise TrainError(f"--prefixes must be positive and ascending, got {','.join(map(str, prefixes))}")
        if self.width is not None and prefixes[-1] != self.width:
            raise TrainError(f"the last prefix ({prefixes[-1]}) must be the whole --width ({self.width})")

    @property
    def total_steps(self) -> int:
        return max(1, self.tokens // self.batch_size)

    def resolved_width(self, d_model: int) -> int:
        if self.width:
            return self.width
        return self.prefixes[-1] if self.prefixes else default_width(d_model)

    def resolved_lr(self, width: int) -> float:
        if self.lr is not None:
            return self.lr
        if self.architecture == "relu":
            return 5e-5
        return 2e-4 / math.sqrt(width / 16384)

    def resolved_aux_k(self, d_model: int) -> int:
        return self.aux_k if self.aux_k is not None else max(1, d_model // 2)

    def resolved_dead_tokens(self) -> int:
        return self.dead_tokens if self.dead_tokens is not None else min(10_000_000, self.tokens // 10)


def memory_estimate(cfg: TrainConfig, d_model: int) -> int:
    """Bytes a training step needs: weights + grads + Adam moments, and the per-step tensors."""
    width = cfg.resolved_width(d_model)
    state = 4 * 2 * width * d_model * 4
    per_step = (4 if cfg.architecture == "relu" else 1) * cfg.batch_size * width * 4
    return state + per_step
