"""The inference SAE: one module for every architecture saescope trains or loads.

    f = act(W_enc (x - b_dec) + b_enc)         (apply_b_dec_to_input, the default)
    x̂ = W_dec f + b_dec

``act`` is ReLU ("standard", Anthropic's recipe), TopK (keep the k largest pre-activations,
then ReLU) or JumpReLU (ReLU(z) · [z > θ], as SAELens and Gemma Scope define it; also what
BatchTopK and Matryoshka become after training). ``SAE.activate`` and ``SAE.encode_topk`` are
the one definition of each: ``encode`` and the chunked ``sparse_acts.sparse_encode`` both call them.

On disk an SAE is a folder in SAELens' layout: ``cfg.json`` + ``sae_weights.safetensors`` with
W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in] and, for JumpReLU,
threshold [d_sae]. cfg.json has exactly the keys SAELens 6 writes (the model as its hub id); ours adds
``saescope``: format version, saescope's model spec and layer, training config, held-out split.
Loading any folder (``load_sae``: ours, SAELens, sparsify, Gemma Scope) is in ``sae_core.saes.formats``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import save_file
from torch import nn

from sae_core.errors import SaescopeError

FORMAT_VERSION = 2  # 2: cfg.json has exactly SAELens 6's keys; model spec and layer under "saescope"
ARCHITECTURES = ("standard", "topk", "jumprelu")


class SAEError(SaescopeError):
    """An SAE folder or file that cannot be used; the message names the file and the problem."""


@dataclass
class SAEConfig:
    d_in: int  # width of the residual stream it reads
    d_sae: int  # number of latents (features)
    architecture: str = "topk"  # one of ARCHITECTURES
    k: int | None = None  # active latents per token, for "topk"
    apply_b_dec_to_input: bool = True  # subtract b_dec before encoding (Anthropic, OpenAI)
    model_name: str | None = None  # subject model spec, e.g. "smollm2-135m"
    hook_name: str | None = None  # e.g. "blocks.15.hook_resid_post"
    layer: int | None = None  # block index whose output it reads
    dtype: str = "float32"
    # Our own metadata (training config, format version). Foreign SAEs leave it empty.
    saescope: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise SAEError(
                f"unknown SAE architecture {self.architecture!r}; expected one of {', '.join(ARCHITECTURES)}"
            )
        if self.architecture == "topk" and not self.k:
            raise SAEError("a topk SAE needs k > 0 in its config")
        if self.k is not None and self.k > self.d_sae:
            raise SAEError(f"k={self.k} in its config is more than the SAE's {self.d_sae} latents")


class SAEOutput(NamedTuple):
    feature_acts: torch.Tensor  # (..., d_sae) sparse activations f
    sae_out: torch.Tensor  # (..., d_in) reconstruction x̂


class SAE(nn.Module):
    """Inference SAE. Training-only concerns (losses, schedules) live in ``sae_core.saes.train``."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        d_in, d_sae = cfg.d_in, cfg.d_sae
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        if cfg.architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(d_sae))
        else:
            self.threshold = None

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    def pre_acts(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """(..., d_in) -> (..., d_sae) encoder pre-activations, b_enc added inside the matmul
        (one pass over the (tokens, d_sae) result instead of two); written into ``out``
        (tokens, d_sae) when given (no autograd then)."""
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        z = torch.addmm(self.b_enc, x.reshape(-1, self.d_in), self.W_enc, out=out)  # (tokens, d_sae)
        return z.reshape(*x.shape[:-1], self.d_sae)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_in) -> (..., d_sae) feature activations."""
        z = self.pre_acts(x)
        if self.cfg.architecture == "topk":
            values, indices = self.encode_topk(z)
            return torch.zeros_like(z).scatter_(-1, indices, values)
        return self.activate(z)

    def activate(self, z: torch.Tensor, features: slice = slice(None)) -> torch.Tensor:
        """The per-latent activation of an elementwise architecture: pre-activations z (..., n) of
        the latents ``features`` -> their activations. TopK is not elementwise: see encode_topk."""
        arch = self.cfg.architecture
        if arch == "standard":
            return torch.relu(z)
        if arch == "jumprelu":
            return torch.relu(z) * (z > self.threshold[features])
        raise SAEError(f"{arch!r} SAEs have no per-latent activation")

    def encode_topk(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """TopK of pre-activations as (values, indices), each (..., k), values ReLU'd."""
        values, indices = z.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.relu(values), indices

    def nested(self, m: int) -> SAE:
        """The SAE of the first m latents (a Matryoshka prefix). For an elementwise activation its
        activations are exactly the first m of the full SAE's. Its ``saescope`` metadata keeps the
        prefixes up to m and records ``prefix_of``, the dictionary's width, so a store row says
        which latents it holds (``sae_core.saes.formats.stored_prefix`` loads it again)."""
        if self.cfg.architecture == "topk":
            raise SAEError("a topk SAE has no nested SAEs: its first m latents select among themselves differently")
        meta = self.cfg.saescope
        prefixes = [p for p in meta.get("matryoshka_prefixes", []) if p <= m]
        cfg = replace(
            self.cfg, d_sae=m, saescope={**meta, "matryoshka_prefixes": prefixes, "prefix_of": meta.get("prefix_of", self.d_sae)}
        )
        tensors = {"W_enc": self.W_enc[:, :m], "b_enc": self.b_enc[:m], "W_dec": self.W_dec[:m], "b_dec": self.b_dec}
        if self.threshold is not None:
            tensors["threshold"] = self.threshold[:m]
        return SAE.from_tensors(cfg, {name: t.detach() for name, t in tensors.items()}, origin=f"the first {m} latents")

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """(..., d_sae) -> (..., d_in)."""
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> SAEOutput:
        f = self.encode(x)
        return SAEOutput(feature_acts=f, sae_out=self.decode(f))

    # -- persistence ------------------------------------------------------------------------

    def save(self, folder: str | Path, *, extra: dict | None = None) -> Path:
        """Write ``cfg.json`` + ``sae_weights.safetensors`` (SAELens layout) atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = saelens_cfg(self.cfg)
        cfg["saescope"] = {
            **self.cfg.saescope,
            **(extra or {}),
            "model": self.cfg.model_name,  # saescope's spec, e.g. "smollm2-135m"
            "layer": self.cfg.layer,
            "format_version": FORMAT_VERSION,
        }
        tensors = {name: p.detach().contiguous().cpu() for name, p in self.named_parameters()}
        _atomic_write(folder / "sae_weights.safetensors", lambda p: save_file(tensors, p))
        _atomic_write(folder / "cfg.json", lambda p: Path(p).write_text(json.dumps(cfg, indent=2)))
        return folder

    @classmethod
    def from_tensors(cls, cfg: SAEConfig, tensors: dict[str, torch.Tensor], origin: str) -> SAE:
        """Build an SAE from named tensors, checking names, shapes and finiteness before anything
        is allocated (a config claiming d_sae = 10^12 is refused, not attempted)."""
        expected = {
            "W_enc": (cfg.d_in, cfg.d_sae),
            "b_enc": (cfg.d_sae,),
            "W_dec": (cfg.d_sae, cfg.d_in),
            "b_dec": (cfg.d_in,),
        }
        if cfg.architecture == "jumprelu":
            expected["threshold"] = (cfg.d_sae,)
        unused = sorted(set(tensors) - set(expected))
        if unused:  # a tensor the maths below never reads means a variant saescope does not implement
            raise SAEError(f"{origin}: tensor {unused[0]!r} is not part of a {cfg.architecture} SAE; saescope cannot read this variant")
        for name, shape in expected.items():
            if name not in tensors:
                raise SAEError(f"{origin}: missing tensor {name!r}")
            tensor = tensors[name]
            if tuple(tensor.shape) != shape:
                raise SAEError(f"{origin}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape}")
            if not torch.isfinite(tensor).all():
                raise SAEError(f"{origin}: tensor {name!r} contains NaN or infinite values")
        sae = cls(cfg)
        for name in expected:
            getattr(sae, name).data.copy_(tensors[name].float())
        return sae


# The SAELens config format our cfg.json follows (SAELens reads a config without a version as
# pre-6 and converts it); we write exactly the keys SAELens 6 writes for the same architecture.
SAELENS_FORMAT = "6.0.0"


def saelens_cfg(cfg: SAEConfig) -> dict:
    """Our config as SAELens 6 writes it: the model as its hub id, hook and model under
    ``metadata``. saescope's own names (model spec, layer) go in the ``saescope`` field."""
    from sae_core.inputs.subject import hub_id

    out = {
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": "none",  # input scaling is folded into the weights
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT,
            "sae_lens_training_version": None,  # not trained by SAELens
            "model_name": hub_id(cfg.model_name) if cfg.model_name else None,
            "hook_name": cfg.hook_name,
        },
        "architecture": cfg.architecture,
    }
    if cfg.architecture == "topk":
        out |= {"k": cfg.k, "rescale_acts_by_decoder_norm": False}
    return out


def _file_mode() -> int:
    """The mode a plain ``open`` gives a new file under the current umask (safetensors makes 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    tmp.chmod(_file_mode())
    tmp.replace(path)


def default_width(d_model: int, expansion: int = 16) -> int:
    """The power of two nearest ``expansion * d_model`` (8192 for SmolLM2's 576), in REFERENCE's
    8–16× range; powers of two keep the matmuls aligned."""
    return 2 ** round(math.log2(expansion * d_model))
