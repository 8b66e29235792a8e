"""Reading SAEs saved by saescope and by other tools into the one inference ``SAE``.

Layouts (REFERENCE §3):

- ours / SAELens: ``cfg.json`` + ``sae_weights.safetensors``; architecture "standard", "topk" or
  "jumprelu"; SAELens 6 nests ``model_name``/``hook_name`` under ``metadata``, older versions keep
  them at the top level, and pre-6 TopK SAEs say "standard" with ``activation_fn_str`` "topk".
- sparsify: a folder per hook point (e.g. ``layers.6``) with ``cfg.json`` and ``sae.safetensors``
  holding encoder.weight [d_sae, d_in], encoder.bias, W_dec [d_sae, d_in], b_dec.
- Gemma Scope: ``params.npz`` with W_enc, W_dec, b_enc, b_dec, threshold (JumpReLU, no b_dec
  subtracted before encoding).

Every refusal raises ``SAEError`` naming the file and the problem.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from sae_core.saes.sae import ARCHITECTURES, SAE, SAEConfig, SAEError

SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
GEMMA_SCOPE_PARAMS = "params.npz"
# Input normalisations that need no extra state: the SAE takes raw activations.
RAW_INPUT = (None, "none")


def read_any(path: Path) -> SAE:
    """Recognise the layout at ``path`` (a folder or one of its files) and read it."""
    path = Path(path)
    if not path.exists():
        raise SAEError(f"{path}: no such SAE file or folder")
    if path.is_file():
        if path.name == GEMMA_SCOPE_PARAMS or path.suffix == ".npz":
            return read_gemma_scope(path)
        path = path.parent
    if (path / SAELENS_WEIGHTS).is_file():
        return read_saelens(path)
    if (path / SPARSIFY_WEIGHTS).is_file():
        return read_sparsify(path)
    if (path / GEMMA_SCOPE_PARAMS).is_file():
        return read_gemma_scope(path / GEMMA_SCOPE_PARAMS)
    hooks = sorted(p.name for p in path.iterdir() if (p / SPARSIFY_WEIGHTS).is_file()) if path.is_dir() else []
    if len(hooks) == 1:
        return read_sparsify(path / hooks[0])
    if hooks:
        raise SAEError(f"{path} holds sparsify SAEs for several hook points ({', '.join(hooks)}); pass one of those folders")
    raise SAEError(
        f"{path} holds no SAE: expected {SAELENS_WEIGHTS} + cfg.json (saescope/SAELens), "
        f"{SPARSIFY_WEIGHTS} + cfg.json (sparsify) or {GEMMA_SCOPE_PARAMS} (Gemma Scope)"
    )


def find_saes(path: Path) -> list[Path]:
    """The SAEs at ``path``: itself when it is one (a file, or a folder holding an SAE's weights),
    else every folder below it that holds one, in path order (a release: a SAELens repository
    with a folder per hook, sparsify's folder per hook point, Gemma Scope's layer/width/L0 tree)."""
    path = Path(path)
    if not path.exists():
        raise SAEError(f"{path}: no such SAE file or folder")
    if path.is_file() or _holds_weights(path):
        return [path]
    found = sorted(folder for folder in path.rglob("*") if folder.is_dir() and _holds_weights(folder))
    if not found:
        read_any(path)  # raises the message that says which layouts were looked for
    return found


def _holds_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for name in (SAELENS_WEIGHTS, SPARSIFY_WEIGHTS, GEMMA_SCOPE_PARAMS))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise SAEError(f"{path}: missing (the SAE's config)")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SAEError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(cfg, dict):
        raise SAEError(f"{path}: expected a JSON object")
    return cfg


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise SAEError(f"{path}: not a readable safetensors file ({err})") from err


def _int(cfg: dict, key: str, origin: Path) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or value <= 0:
        raise SAEError(f"{origin}: {key!r} must be a positive integer, found {value!r}")
    return value


def layer_of_hook(hook_name: str | None) -> int | None:
    """Block whose output a hook reads: blocks.L.hook_resid_post -> L, blocks.L.hook_resid_pre -> L-1,
    sparsify's layers.L -> L; None for anything else (the SAE still loads)."""
    if not hook_name:
        return None
    if match := re.fullmatch(r"blocks\.(\d+)\.hook_resid_post", hook_name):
        return int(match.group(1))
    if match := re.fullmatch(r"blocks\.(\d+)\.hook_resid_pre", hook_name):
        return int(match.group(1)) - 1 if int(match.group(1)) > 0 else None
    if match := re.fullmatch(r"(?:model\.)?layers\.(\d+)", hook_name):
        return int(match.group(1))
    return None


def read_saelens(folder: Path) -> SAE:
    """Ours or SAELens (any version): cfg.json + sae_weights.safetensors."""
    cfg_path, weights_path = folder / "cfg.json", folder / SAELENS_WEIGHTS
    raw = _read_json(cfg_path)
    metadata = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
    architecture = raw.get("architecture", "standard")
    k = raw.get("k")
    if architecture == "standard" and raw.get("activation_fn_str") == "topk":  # SAELens < 6 TopK
        architecture, k = "topk", (raw.get("activation_fn_kwargs") or {}).get("k")
    if architecture not in ARCHITECTURES:
        raise SAEError(f"{cfg_path}: unknown SAE architecture {architecture!r}; saescope reads {', '.join(ARCHITECTURES)}")
    if architecture == "topk" and not (isinstance(k, int) and k > 0):
        raise SAEError(f"{cfg_path}: a topk SAE needs a positive integer 'k', found {k!r}")
    if raw.get("normalize_activations") not in RAW_INPUT:
        raise SAEError(
            f"{cfg_path}: normalize_activations={raw['normalize_activations']!r} needs a scaling the weights "
            "do not hold; fold it into the weights (SAELens: fold_activation_norm_scaling_factor) and save again"
        )
    if raw.get("rescale_acts_by_decoder_norm"):
        raise SAEError(f"{cfg_path}: rescale_acts_by_decoder_norm=true is not supported; save it with the norm folded in")
    hook = metadata.get("hook_name") or raw.get("hook_name")
    cfg = SAEConfig(
        d_in=_int(raw, "d_in", cfg_path),
        d_sae=_int(raw, "d_sae", cfg_path),
        architecture=architecture,
        k=k,
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
        model_name=metadata.get("model_name") or raw.get("model_name"),
        hook_name=hook,
        layer=raw["layer"] if isinstance(raw.get("layer"), int) else layer_of_hook(hook),
        saescope=raw.get("saescope") or {},
    )
    if not weights_path.is_file():
        raise SAEError(f"{weights_path}: missing (the SAE's weights)")
    return SAE.from_tensors(cfg, _read_safetensors(weights_path), origin=str(weights_path))


def read_sparsify(folder: Path) -> SAE:
    """sparsify: cfg.json (k, num_latents or expansion_factor, d_in) + sae.safetensors."""
    cfg_path, weights_path = folder / "cfg.json", folder / SPARSIFY_WEIGHTS
    raw = _read_json(cfg_path)
    tensors = _read_safetensors(weights_path)
    if "W_skip" in tensors or raw.get("skip_connection"):
        raise SAEError(f"{weights_path}: sparsify transcoders/skip connections are not supported; pass a plain SAE")
    for name in ("encoder.weight", "encoder.bias", "W_dec", "b_dec"):
        if name not in tensors:
            raise SAEError(f"{weights_path}: missing tensor {name!r}")
    d_in = raw.get("d_in") or int(tensors["b_dec"].shape[0])
    d_sae = raw.get("num_latents") or d_in * _int(raw, "expansion_factor", cfg_path)
    layer = layer_of_hook(folder.name)  # sparsify names the folder after its hook point
    cfg = SAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        architecture="topk",
        k=_int(raw, "k", cfg_path),
        layer=layer,
        hook_name=f"blocks.{layer}.hook_resid_post" if layer is not None else folder.name,
    )
    encoder = tensors["encoder.weight"]
    if tuple(encoder.shape) != (d_sae, d_in):
        raise SAEError(f"{weights_path}: tensor 'encoder.weight' has shape {tuple(encoder.shape)}, expected {(d_sae, d_in)}")
    ours = {"W_enc": encoder.t(), "b_enc": tensors["encoder.bias"], "W_dec": tensors["W_dec"], "b_dec": tensors["b_dec"]}
    return SAE.from_tensors(cfg, ours, origin=str(weights_path))


def read_gemma_scope(path: Path) -> SAE:
    """Gemma Scope params.npz: JumpReLU on x @ W_enc + b_enc (b_dec is not subtracted first)."""
    import numpy as np

    try:
        with np.load(path) as npz:
            tensors = {name: torch.from_numpy(npz[name].astype("float32")) for name in npz.files}
    except (OSError, ValueError) as err:
        raise SAEError(f"{path}: not a readable .npz file ({err})") from err
    if "W_enc" not in tensors or tensors["W_enc"].ndim != 2:
        raise SAEError(f"{path}: missing tensor 'W_enc' (a 2-d [d_in, d_sae] array)")
    d_in, d_sae = tensors["W_enc"].shape
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture="jumprelu", apply_b_dec_to_input=False)
    return SAE.from_tensors(cfg, tensors, origin=str(path))
