"""SAE quality metrics, defined exactly as REFERENCE §2 (and SAELens' ``run_evals``), on held-out contexts.

Headline first: ΔCE and KL say what splicing the SAE in costs the model; EV, L0 and the CE scores
are ratios that can flatter.

- ΔCE = CE_sae - CE_clean: next-token cross-entropy with x̂ spliced in for x after block L at
  non-special positions only (BOS keeps its clean activation), over predictions made from
  non-special positions (BOS -> first token is not counted).
- KL = KL(p_clean || p_sae) averaged over every non-special position, the last one included, as
  SAELens' ``get_recons_loss`` counts it (it needs no target token).
- CE loss recovered, against two baselines: zero ablation (every position zeroed; for SmolLM2 that
  gives a uniform next-token distribution, CE = ln |V|, an easy bar) and mean ablation (x replaced
  by the mean of x over the evaluated tokens at the same positions the SAE is spliced):
  (CE_ablated - CE_sae) / (CE_ablated - CE_clean).
- Explained variance = 1 - Σ||x - x̂||² / Σ||x - mean(x)||², both sums accumulated separately over
  the whole eval set (not a per-token average of ratios; variance about the mean, not zero); also
  without the massive-activation tokens (residual norm over 10× the median norm), whose few
  tokens can hold most of the variance; how many were excluded is reported.
- L0: mean number of active latents per token; MSE: SAELens' convention, the mean over tokens of
  the sum over dimensions.
- Dead fraction: latents that never fired on the eval tokens; dense fraction: firing on > 10% of
  them; the histogram of log10 firing rates of the latents that fired.

A report card is these metrics on two token sets side by side: the held-out contexts of the
training corpus, and a second, different corpus.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from sae_core.saes.sae import SAE

DENSE_RATE = 0.1  # "dense": fires on more than 10% of tokens (REFERENCE §2)
HISTOGRAM_BINS = 40  # of log10 firing rate, from -log10(n_tokens) to 0
# "Massive activations" (Sun et al. 2024): a handful of tokens (BOS-like delimiters, first
# newlines) whose residual norm is orders of magnitude above the rest. 10× the median separates
# them in SmolLM2 (4–8 tokens in 8k) and leaves the ordinary tokens' norm spread alone.
MASSIVE_FACTOR = 10.0
METRICS_FORMAT = 2  # 2: a report card, {"held_out": Metrics, "other_corpus": Metrics, "how": ...}
HELD_OUT, OTHER = "held_out", "other_corpus"  # the report card's columns


class ReconstructionStats:
    """L0, explained variance (with and without massive tokens), MSE and firing counts.

    Keeps each token's x (float32) and squared error: excluding the massive tokens needs the
    median norm, known only at the end. 16k tokens of d 576 are 38 MB."""

    def __init__(self, d_in: int, d_sae: int):
        self.rows: list[torch.Tensor] = []  # (n, d_in) float32 per batch
        self.sq_errors: list[torch.Tensor] = []  # (n,) float64 ||x - x̂||² per batch
        self.n_active = 0  # Σ over tokens of active latents
        self.fire_counts = torch.zeros(d_sae, dtype=torch.long)

    def update(self, x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor) -> None:
        """x, x_hat: (n, d_in); f: (n, d_sae) feature activations of the same n tokens."""
        x = x.detach().float().cpu()
        self.rows.append(x)
        self.sq_errors.append((x.double() - x_hat.detach().double().cpu()).pow(2).sum(dim=-1))
        active = (f.detach() > 0).cpu()
        self.n_active += int(active.sum())
        self.fire_counts += active.sum(dim=0)

    @property
    def n_tokens(self) -> int:
        return sum(row.shape[0] for row in self.rows)

    def mean(self) -> torch.Tensor:
        """(d_in,) mean of x over the tokens seen: the mean-ablation value."""
        return torch.cat(self.rows).double().mean(dim=0).float()

    def summary(self) -> dict:
        x = torch.cat(self.rows).double()  # (n, d_in)
        sq_error = torch.cat(self.sq_errors)  # (n,)
        norms = x.norm(dim=-1)
        massive = norms > MASSIVE_FACTOR * norms.median()
        n = x.shape[0]
        rates = self.fire_counts.double() / n
        return {
            "n_tokens": n,
            "l0": self.n_active / n,
            "explained_variance": explained_variance(x, sq_error),
            "explained_variance_without_massive": explained_variance(x[~massive], sq_error[~massive]),
            "n_massive_tokens": int(massive.sum()),
            "massive_norm_threshold": float(MASSIVE_FACTOR * norms.median()),
            "mse": float(sq_error.sum()) / n,
            "dead_fraction": float((self.fire_counts == 0).double().mean()),
            "dense_fraction": float((rates > DENSE_RATE).double().mean()),
            "density_histogram": density_histogram(self.fire_counts, n),
        }


def explained_variance(x: torch.Tensor, sq_error: torch.Tensor) -> float:
    """1 - Σ||x - x̂||² / Σ||x - mean(x)||² for x (n, d) and its per-token squared errors (n,)."""
    return 1.0 - float(sq_error.sum()) / float((x - x.mean(dim=0)).pow(2).sum())


def density_histogram(fire_counts: torch.Tensor, n_tokens: int, bins: int = HISTOGRAM_BINS) -> dict:
    """Histogram of log10(firing rate) over latents that fired; dead latents counted apart."""
    fired = fire_counts[fire_counts > 0].double()
    low = -math.log10(n_tokens)
    edges = torch.linspace(low, 0.0, bins + 1, dtype=torch.float64)
    counts = torch.histc(torch.log10(fired / n_tokens), bins=bins, min=low, max=0.0) if fired.numel() else torch.zeros(bins)
    return {  # the same keys as the precompute's histogram, so pages read either
        "edges": [round(float(e), 4) for e in edges],
        "counts": [int(c) for c in counts],
        "dead": int((fire_counts == 0).sum()),
        "measured_over_tokens": int(n_tokens),
    }


def reconstruction_stats(sae: SAE, batches: Iterable[torch.Tensor]) -> ReconstructionStats:
    """Stats over batches of raw activations (n, d_in), e.g. synthetic data or a cache."""
    stats = ReconstructionStats(sae.d_in, sae.d_sae)
    with torch.no_grad():
        for x in batches:
            out = sae(x)
            stats.update(x, out.sae_out, out.feature_acts)
    return stats


def _predictions(ids: torch.Tensor, special: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The next tokens (B, T-1) of contexts ``ids`` (B, T), and which of those predictions count:
    the ones made from non-special positions."""
    return ids[:, 1:], ~special[:, :-1]


def _nll(logp: torch.Tensor, targets: torch.Tensor, counted: torch.Tensor) -> float:
    """Σ -log p(target) of log-probabilities (B, T, V) over the counted (B, T-1) predictions."""
    return float(-logp[:, :-1].gather(-1, targets[..., None]).squeeze(-1)[counted].sum())


class CleanBatch(NamedTuple):
    """What every SAE's CE terms on one batch compare against, computed once for all of them."""

    targets: torch.Tensor  # (B, T-1) the next tokens
    counted: torch.Tensor  # (B, T-1) predictions made from non-special positions
    kl_positions: torch.Tensor  # (B, T) non-special positions, the last one included
    logp: torch.Tensor  # (B, T, V) clean log-probabilities
    p: torch.Tensor  # (B, T, V) clean probabilities
    nll: float  # Σ clean -log p(target) over the counted predictions

    @classmethod
    def of(cls, logits: torch.Tensor, ids: torch.Tensor, special: torch.Tensor) -> CleanBatch:
        """From the clean logits (B, T, V) of contexts ``ids`` (B, T) with ``special`` (B, T) bool."""
        targets, counted = _predictions(ids, special)
        logp = logits.log_softmax(-1)
        return cls(targets, counted, ~special, logp, logp.exp(), _nll(logp, targets, counted))

    def nll_of(self, logp: torch.Tensor) -> float:
        """Σ -log p(target) of another run's log-probabilities (B, T, V) over the same predictions."""
        return _nll(logp, self.targets, self.counted)


class CEStats:
    """Running sums of next-token cross-entropy (clean, spliced, zero- and mean-ablated) and KL."""

    def __init__(self):
        self.n = self.n_kl = 0
        self.clean = self.sae = self.zero = self.mean = self.kl = 0.0

    def update(self, clean: CleanBatch, spliced: torch.Tensor, zero_nll: float) -> None:
        """One batch: its clean terms, the spliced run's logits (B, T, V) and the zero-ablated
        run's Σ -log p(target) (``clean.nll_of``), shared by every SAE on the layer."""
        logp = spliced.log_softmax(-1)
        self.clean += clean.nll
        self.sae += clean.nll_of(logp)
        self.zero += zero_nll
        self.n += int(clean.counted.sum())
        kl = torch.sub(clean.logp, logp, out=logp).mul_(clean.p).sum(-1)  # (B, T), the last position too; in place
        self.kl += float(kl[clean.kl_positions].sum())
        self.n_kl += int(clean.kl_positions.sum())

    def update_mean_ablation(self, nll: float) -> None:
        """One batch's Σ -log p(target) with x mean-ablated (``CleanBatch.nll_of``)."""
        self.mean += nll

    def summary(self) -> dict:
        clean, sae, zero, mean = (total / self.n for total in (self.clean, self.sae, self.zero, self.mean))
        return {
            "delta_ce": sae - clean,
            "kl_div": self.kl / self.n_kl,
            "ce_clean": clean,
            "ce_with_sae": sae,
            "ce_zero_ablation": zero,
            "ce_mean_ablation": mean,
            "ce_loss_recovered": (zero - sae) / (zero - clean),
            "ce_loss_recovered_mean_ablation": (mean - sae) / (mean - clean),
            "n_predictions": self.n,
            "n_kl_positions": self.n_kl,
        }


@dataclass
class Metrics:
    """The metrics of one token set; ``corpus`` says which tokens they were measured on."""

    corpus: dict  # spec, role ("held-out" / "other corpus"), contexts, seq_len, fingerprint, note
    n_contexts: int
    n_tokens: int  # non-special tokens: EV, L0, MSE, dead and dense are over these
    n_predictions: int  # next-token predictions: the CE numbers are over these
    n_kl_positions: int  # positions KL is averaged over (n_predictions + one per context)
    delta_ce: float
    kl_div: float
    ce_clean: float
    ce_with_sae: float
    ce_zero_ablation: float
    ce_mean_ablation: float
    ce_loss_recovered: float
    ce_loss_recovered_mean_ablation: float
    explained_variance: float
    explained_variance_without_massive: float
    n_massive_tokens: int
    massive_norm_threshold: float
    l0: float
    mse: float
    dead_fraction: float
    dense_fraction: float
    density_histogram: dict

    def to_dict(self) -> dict:
        return asdict(self)


# How each number is measured, in metrics.json and on the SAE page.
HOW = {
    "delta_ce": "CE with x_hat spliced in minus clean CE (nats per prediction); x_hat replaces x after the "
    "layer at non-special positions (BOS keeps its clean activation); predictions made from special "
    "positions are not counted",
    "kl_div": "mean KL(p_clean || p_sae) over every non-special position, the last one included "
    "(SAELens' get_recons_loss definition)",
    "ce_loss_recovered": "(CE_zero - CE_sae) / (CE_zero - CE_clean); zero ablation zeroes every position",
    "ce_loss_recovered_mean_ablation": "(CE_mean - CE_sae) / (CE_mean - CE_clean); mean ablation puts the "
    "mean of x over the evaluated tokens at the positions x_hat is spliced",
    "explained_variance": "1 - sum||x - x_hat||^2 / sum||x - mean(x)||^2 over all evaluated non-special tokens",
    "explained_variance_without_massive": f"the same without the massive-activation tokens: residual norm "
    f"over {MASSIVE_FACTOR:g}x the median norm (n_massive_tokens says how many)",
    "l0": "mean number of active latents per non-special token",
    "mse": "mean over tokens of the sum over dimensions of (x - x_hat)^2",
    "dead_fraction": "latents that never fired on the evaluated tokens",
    "dense_fraction": "latents firing on more than 10% of the evaluated tokens",
}


def evaluate(
    subject,
    sae: SAE,
    layer: int,
    tokens: torch.Tensor,
    special_mask: torch.Tensor,
    *,
    corpus: dict | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> Metrics:
    """All metrics on contexts ``tokens`` (n, seq) with ``special_mask`` (n, seq), via ``subject``."""
    [metrics] = evaluate_many(
        subject, [sae], [layer], tokens, special_mask, corpus=corpus, batch_size=batch_size, progress=progress
    )
    return metrics


def clean_run(subject, ids: torch.Tensor, layers: Iterable[int]) -> tuple[torch.Tensor, dict[int, object]]:
    """The clean logits (B, T, V) of ``ids`` (B, T), and what each block in ``layers`` returned."""
    outputs: dict[int, object] = {}

    def keep(layer: int):
        def hook(_module, _inputs, output):
            outputs[layer] = output

        return hook

    handles = [subject.blocks[layer].register_forward_hook(keep(layer)) for layer in layers]
    try:
        return subject.model(input_ids=ids).logits.float(), outputs
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def resumed_after(subject, layer: int, output) -> Iterator[None]:
    """While active, a forward of the batch that gave ``output`` (what block ``layer`` returned on
    it, from ``clean_run``) starts from there: blocks 0..layer return it without computing (each
    ignores its input, so only the last one's counts). The embedding, the later blocks, the final
    norm and the head run as the model runs them, and a ``patch_layer`` on ``layer`` still applies,
    so the logits are a full forward's, bit for bit, for the blocks after ``layer`` only."""
    skipped = list(subject.blocks[: layer + 1])
    try:
        for block in skipped:
            block.forward = lambda *_args, **_kwargs: output
        yield
    finally:
        for block in skipped:
            block.__dict__.pop("forward", None)


def logits_after(subject, layer: int, output, ids: torch.Tensor, fn) -> torch.Tensor:
    """Logits (B, T, V) of ``ids`` with block ``layer``'s ``output`` (from ``clean_run``) replaced
    by ``fn(residual)``, from the blocks after ``layer`` only."""
    with subject.patch_layer(layer, fn), resumed_after(subject, layer, output):
        return subject.model(input_ids=ids).logits.float()


@torch.no_grad()
def evaluate_many(
    subject,
    saes: list[SAE],
    layers: list[int],
    tokens: torch.Tensor,
    special_mask: torch.Tensor,
    *,
    corpus: dict | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> list[Metrics]:
    """``evaluate`` for several SAEs, ``saes[i]`` spliced after block ``layers[i]``, sharing every
    run and every term that does not depend on the SAE. Per batch: one clean forward for every
    layer, keeping each layer's residual; then, per layer, one spliced run per SAE from that
    residual (the blocks after the layer only). A second pass makes each layer's mean-ablated
    run (the mean of x is known only at the end) from the kept residuals. The zero-ablated run
    reads nothing of its batch but its shape (every residual after the layer is zero), so it is
    made once per layer and batch shape. N SAEs on one layer L of an n-block model cost one full
    forward and N + 1 runs of n - 1 - L blocks per batch, instead of 4N full forwards."""
    device = subject.device
    saes = [sae.to(device) for sae in saes]
    on_layer: dict[int, list[int]] = {}  # layer -> the indices of its SAEs
    for i, layer in enumerate(layers):
        on_layer.setdefault(subject.check_layer(layer), []).append(i)
    recons = [ReconstructionStats(sae.d_in, sae.d_sae) for sae in saes]
    ces = [CEStats() for _ in saes]
    batches = [
        (tokens[begin : begin + batch_size].to(device), special_mask[begin : begin + batch_size].to(device))
        for begin in range(0, tokens.shape[0], batch_size)
    ]  # (B, T) each
    kept: dict[int, list] = {layer: [] for layer in on_layer}  # each batch's block output, per layer
    zero: dict[tuple[int, torch.Size], torch.Tensor] = {}  # (layer, batch shape) -> log-probs (B, T, V)
    for ids, special in tqdm(batches, desc="evaluate", disable=not progress):
        logits, outputs = clean_run(subject, ids, on_layer)
        clean = CleanBatch.of(logits, ids, special)
        for layer, members in on_layer.items():
            kept[layer].append(outputs[layer])
            if (layer, ids.shape) not in zero:
                ablated = logits_after(subject, layer, outputs[layer], ids, torch.zeros_like)
                zero[layer, ids.shape] = ablated.log_softmax(-1)
            zero_nll = clean.nll_of(zero[layer, ids.shape])
            for i in members:

                def splice(resid, sae=saes[i], recon=recons[i], special=special):
                    out = sae(resid)
                    keep = ~special
                    recon.update(resid[keep], out.sae_out[keep], out.feature_acts[keep])
                    return torch.where(special[..., None], resid, out.sae_out.to(resid.dtype))

                ces[i].update(clean, logits_after(subject, layer, outputs[layer], ids, splice), zero_nll)
    for layer, members in tqdm(on_layer.items(), desc="evaluate (mean ablation)", disable=not progress):
        mean = recons[members[0]].mean().to(device)  # every SAE of the layer saw the same x
        for (ids, special), output in zip(batches, kept[layer], strict=True):

            def ablate(resid, special=special, mean=mean):
                return torch.where(special[..., None], resid, mean.to(resid.dtype))

            logp = logits_after(subject, layer, output, ids, ablate).log_softmax(-1)
            nll = _nll(logp, *_predictions(ids, special))
            for i in members:
                ces[i].update_mean_ablation(nll)
    return [
        Metrics(corpus=corpus or {}, n_contexts=int(tokens.shape[0]), **recon.summary(), **ce.summary())
        for recon, ce in zip(recons, ces, strict=True)
    ]


def metric_lines(card: dict[str, Metrics]) -> list[str]:
    """A report card (column name -> Metrics) as a text table, headline metrics first."""
    rows = [
        ("ΔCE (nats)", lambda m: f"{m.delta_ce:+.4f}"),
        ("KL", lambda m: f"{m.kl_div:.4f}"),
        ("CE recovered vs zero", lambda m: f"{m.ce_loss_recovered:.4f}"),
        ("CE recovered vs mean", lambda m: f"{m.ce_loss_recovered_mean_ablation:.4f}"),
        ("EV, all tokens", lambda m: f"{m.explained_variance:.4f}"),
        ("EV, no massive", lambda m: f"{m.explained_variance_without_massive:.4f} ({m.n_massive_tokens} out)"),
        ("L0", lambda m: f"{m.l0:.1f}"),
        ("dead", lambda m: f"{m.dead_fraction:.4f}"),
        ("CE clean/SAE", lambda m: f"{m.ce_clean:.3f}/{m.ce_with_sae:.3f}"),
        ("tokens", lambda m: f"{m.n_tokens} ({m.n_predictions} pred.)"),
    ]
    width = 22
    lines = ["".ljust(width) + "".join(m.corpus.get("role", name).ljust(width) for name, m in card.items())]
    lines += [label.ljust(width) + "".join(cell(m).ljust(width) for m in card.values()) for label, cell in rows]
    lines.append("corpora: " + "; ".join(f"{m.corpus.get('role', name)} = {m.corpus.get('spec')}" for name, m in card.items()))
    return [line.rstrip() for line in lines]


def save_metrics(path, card: dict[str, Metrics]) -> Path:
    """Write a report card as ``metrics.json`` (``path`` a folder) or to ``path`` itself, atomically."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.json"
    payload = {"format_version": METRICS_FORMAT, **{name: m.to_dict() for name, m in card.items()}, "how": HOW}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)
    return path
