"""Reading SAEs saved by saescope and by other tools into the one inference ``SAE``.

Layouts (REFERENCE §3):

- ours / SAELens: ``cfg.json`` + ``sae_weights.safetensors``; architecture "standard", "topk" or
  "jumprelu" (SAELens saves BatchTopK and Matryoshka SAEs as "jumprelu"); SAELens 6 nests
  ``model_name``/``hook_name`` under ``metadata``, older versions keep them at the top level, and
  pre-6 TopK SAEs say "standard" with ``activation_fn_str`` "topk". Refused, naming the field:
  transcoders, gated, abstopk and other architectures, rescaled TopK, activation normalisation
  the weights do not hold, hook_z reshaping, a fine-tuning scale.
- sparsify: a folder per hook point (e.g. ``layers.6``) with ``cfg.json`` and ``sae.safetensors``
  holding encoder.weight [d_sae, d_in], encoder.bias, W_dec [d_sae, d_in], b_dec. Refused when
  ``activation`` is "groupmax", and with ``transcode`` or ``skip_connection``.
- Gemma Scope: ``params.npz`` with W_enc, W_dec, b_enc, b_dec, threshold (JumpReLU, no b_dec
  subtracted before encoding).

Every refusal raises ``SAEError`` naming the file and the problem.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from sae_core.saes.sae import ARCHITECTURES, SAE, SAEConfig, SAEError

SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
GEMMA_SCOPE_PARAMS = "params.npz"
# Input normalisations that need no extra state: the SAE takes raw activations.
RAW_INPUT = (None, "none")


def load_sae(path: str | Path, *, d_in: int | None = None, prefix: int | None = None) -> SAE:
    """Load any SAE saescope understands: ours/SAELens, sparsify, or Gemma Scope ``params.npz``.

    ``d_in``, when given, is the subject model's width; a mismatch is refused. ``prefix`` = m
    gives a Matryoshka SAE's nested SAE of its first m latents (one of its recorded prefixes).
    """
    sae = read_any(Path(path))
    if d_in is not None and sae.d_in != d_in:
        raise SAEError(f"{path}: SAE reads d_in={sae.d_in} but the model's residual stream has d_model={d_in}")
    if prefix is not None:
        prefixes = sae.cfg.saescope.get("matryoshka_prefixes")
        if not prefixes:
            raise SAEError(f"{path}: not a Matryoshka SAE (its cfg.json records no prefixes)")
        if prefix not in prefixes:
            raise SAEError(f"{path}: no nested SAE of {prefix} latents; its prefixes are {', '.join(map(str, prefixes))}")
        sae = sae.nested(prefix)
    return sae.eval()


def nested_prefixes(sae: SAE) -> list[int]:
    """The widths of a Matryoshka dictionary's nested SAEs narrower than itself (its recorded
    prefixes below ``d_sae``), each loadable with ``load_sae(..., prefix=m)``; [] for any other SAE."""
    return [m for m in sae.cfg.saescope.get("matryoshka_prefixes") or [] if m < sae.d_sae]


def stored_prefix(meta: dict, d_sae: int) -> int | None:
    """``load_sae``'s ``prefix`` for an SAE that precompute stored with ``d_sae`` latents and
    ``meta`` (its ``saescope`` metadata, the store's ``train_cfg``): its width when it is a nested
    prefix of a Matryoshka dictionary (``SAE.nested`` recorded ``prefix_of``), else None: the
    folder's SAE as it is."""
    return d_sae if meta.get("prefix_of") else None


def read_any(path: Path) -> SAE:
    """Recognise the layout at ``path`` (a folder or one of its files) and read it."""
    path = _readable(Path(path))
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
    path = _readable(Path(path))
    if path.is_file() or _holds_weights(path):
        return [path]
    found = sorted(folder for folder in path.rglob("*") if folder.is_dir() and _holds_weights(folder))
    if not found:
        read_any(path)  # raises the message that says which layouts were looked for
    return found


def _readable(path: Path) -> Path:
    """``path``, once it is known to exist and to be readable (a folder: listable too)."""
    if not path.exists():
        raise SAEError(f"{path}: no such SAE file or folder")
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0), effective_ids=True):
        raise SAEError(f"{path}: cannot read it (permission denied)")
    return path


def _holds_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for name in (SAELENS_WEIGHTS, SPARSIFY_WEIGHTS, GEMMA_SCOPE_PARAMS))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise SAEError(f"{path}: missing (the SAE's config)")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SAEError(f"{path}: not valid JSON ({err})") from err
    except OSError as err:
        raise SAEError(f"{path}: cannot read it ({err.strerror})") from err
    if not isinstance(cfg, dict):
        raise SAEError(f"{path}: expected a JSON object")
    return cfg


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        path.open("rb").close()  # safetensors says "No such file" for any error opening it
    except OSError as err:
        raise SAEError(f"{path}: cannot read it ({err.strerror})") from err
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


# SAELens architectures that map one hook's activations to another's: not an SAE on one hook.
SAELENS_TRANSCODERS = ("transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder")
# Pre-6 SAELens activation functions (``activation_fn_str``) with the maths saescope implements.
SAELENS_ACTIVATIONS = (None, "relu", "topk")


def _refuse(origin: Path, field: str, value, why: str) -> SAEError:
    return SAEError(f"{origin}: {field} = {json.dumps(value)} {why}")


def _check_saelens_variant(raw: dict, cfg_path: Path) -> None:
    """Refuse, naming the field, every SAELens setting whose maths saescope does not implement."""
    architecture = raw.get("architecture", "standard")
    if architecture in SAELENS_TRANSCODERS:
        raise _refuse(cfg_path, "architecture", architecture, "is a transcoder (it reads one hook and predicts another); "
                      "saescope reads SAEs, which reconstruct the hook they read")  # fmt: skip
    if architecture not in ARCHITECTURES:
        raise _refuse(cfg_path, "architecture", architecture, f"is not supported; saescope reads {', '.join(ARCHITECTURES)}")
    activation = raw.get("activation_fn_str", raw.get("activation_fn"))
    if activation not in SAELENS_ACTIVATIONS:
        raise _refuse(cfg_path, "activation_fn_str", activation, "is not supported; saescope reads relu and topk")
    if raw.get("normalize_activations") not in RAW_INPUT:
        raise _refuse(cfg_path, "normalize_activations", raw["normalize_activations"],
                      "needs a scaling the weights do not hold; fold it into the weights "
                      "(SAELens: fold_activation_norm_scaling_factor) and save again")  # fmt: skip
    if raw.get("rescale_acts_by_decoder_norm"):
        raise _refuse(cfg_path, "rescale_acts_by_decoder_norm", True, "(rescaled TopK) is not supported; "
                      "save it with the decoder norms folded in (SAELens: fold_W_dec_norm)")  # fmt: skip
    if raw.get("reshape_activations", "none") != "none":
        raise _refuse(cfg_path, "reshape_activations", raw["reshape_activations"],
                      "is an SAE on attention heads; saescope reads residual-stream SAEs")  # fmt: skip
    if raw.get("finetuning_scaling_factor"):
        raise _refuse(cfg_path, "finetuning_scaling_factor", True, "is not supported (a per-latent scale saescope does not apply)")


def read_saelens(folder: Path) -> SAE:
    """Ours or SAELens (any version): cfg.json + sae_weights.safetensors."""
    cfg_path, weights_path = folder / "cfg.json", folder / SAELENS_WEIGHTS
    raw = _read_json(cfg_path)
    metadata = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
    ours = raw.get("saescope") if isinstance(raw.get("saescope"), dict) else {}
    _check_saelens_variant(raw, cfg_path)
    architecture = raw.get("architecture", "standard")
    k = raw.get("k")
    if architecture == "standard" and raw.get("activation_fn_str") == "topk":  # SAELens < 6 TopK
        architecture, k = "topk", (raw.get("activation_fn_kwargs") or {}).get("k")
    if architecture == "topk" and not (isinstance(k, int) and k > 0):
        raise SAEError(f"{cfg_path}: a topk SAE needs a positive integer 'k', found {k!r}")
    hook = metadata.get("hook_name") or raw.get("hook_name")
    layer = next((v for v in (ours.get("layer"), raw.get("layer")) if isinstance(v, int)), layer_of_hook(hook))
    cfg = SAEConfig(
        d_in=_int(raw, "d_in", cfg_path),
        d_sae=_int(raw, "d_sae", cfg_path),
        architecture=architecture,
        k=k,
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
        # saescope's own spec first (cfg.json's model_name is the hub id other tools resolve)
        model_name=ours.get("model") or metadata.get("model_name") or raw.get("model_name"),
        hook_name=hook,
        layer=layer,
        saescope=ours,
    )
    if not weights_path.is_file():
        raise SAEError(f"{weights_path}: missing (the SAE's weights)")
    return SAE.from_tensors(cfg, _read_safetensors(weights_path), origin=str(weights_path))


# sparsify settings whose maths saescope does not implement: (field, the value saescope reads, why)
SPARSIFY_UNSUPPORTED = (
    ("activation", "topk", "is not supported; saescope reads sparsify's \"topk\" activation"),
    ("transcode", False, "makes a transcoder (it predicts a module's output from its input); saescope reads SAEs"),
    ("skip_connection", False, "adds a linear skip connection (W_skip) saescope does not apply"),
)


def read_sparsify(folder: Path) -> SAE:
    """sparsify: cfg.json (k, num_latents or expansion_factor, d_in) + sae.safetensors."""
    cfg_path, weights_path = folder / "cfg.json", folder / SPARSIFY_WEIGHTS
    raw = _read_json(cfg_path)
    for field, supported, why in SPARSIFY_UNSUPPORTED:
        if raw.get(field, supported) != supported:
            raise _refuse(cfg_path, field, raw[field], why)
    tensors = _read_safetensors(weights_path)
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
    encoder = tensors.pop("encoder.weight")
    if tuple(encoder.shape) != (d_sae, d_in):
        raise SAEError(f"{weights_path}: tensor 'encoder.weight' has shape {tuple(encoder.shape)}, expected {(d_sae, d_in)}")
    bias = tensors.pop("encoder.bias")
    return SAE.from_tensors(cfg, {**tensors, "W_enc": encoder.t(), "b_enc": bias}, origin=str(weights_path))


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
