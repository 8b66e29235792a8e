"""Streaming activations and the on-disk activation cache: contents, shuffling, resume, refusal."""

from __future__ import annotations

import dataclasses
import fcntl
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_core.inputs.activations import (
    ActivationBatch,
    ActivationCache,
    ActivationCacheError,
    find_cache,
    iter_activations,
    iter_layer_activations,
)
from sae_core.inputs.corpus import build_contexts, context_rows, held_out_split
from sae_core.inputs.subject import SubjectError
from tests.tiny import TRAIN_TEXT

CTX_LEN = 16
LAYER = 2
CONTEXTS_PER_SHARD = 40


@pytest.fixture(scope="module")
def contexts(llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    path = folder / "docs.jsonl"
    path.write_text(
        "\n".join(json.dumps({"text": f"{i}: {t}"}) for i in range(30) for t in TRAIN_TEXT)
    )
    with pytest.MonkeyPatch.context() as patch:  # module fixtures run before the per-test cache
        patch.setenv("SAESCOPE_CACHE", str(folder / "cache"))
        return build_contexts(str(path), llama.tokenizer, ctx_len=CTX_LEN)


@pytest.fixture(scope="module")
def reference(llama, contexts) -> np.ndarray:
    """Every non-special token's activation, in context order, as fp16: (n_tokens, d_model)."""
    with torch.no_grad():
        acts = llama.forward_to_layer(contexts.tokens, LAYER)  # (n_contexts, seq, d_model)
    return acts[~contexts.special_mask].to(torch.float16).numpy()


def shard_bytes(llama, contexts) -> int:
    """The shard size that puts CONTEXTS_PER_SHARD contexts in each shard."""
    return CONTEXTS_PER_SHARD * 2 * llama.d_model * contexts.tokens.shape[1]


def build(llama, contexts, folder, **kwargs) -> ActivationCache:
    return ActivationCache.build(
        llama,
        LAYER,
        contexts,
        folder,
        batch_size=16,
        shard_bytes=shard_bytes(llama, contexts),
        progress=False,
        **kwargs,
    )


def sorted_rows(rows: np.ndarray) -> np.ndarray:
    """Rows in a canonical order, to compare caches as multisets of token activations."""
    return rows[np.lexsort(rows.T[::-1])]


def all_rows(cache: ActivationCache) -> np.ndarray:
    return torch.cat(list(cache.token_batches(1000))).to(torch.float16).numpy()


class CountingForward:
    """Stands in for Subject.forward_to_layers: counts calls and can fail on the n-th one."""

    def __init__(self, forward, fail_on: int | None = None):
        self.forward = forward
        self.fail_on = fail_on
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_on:
            raise KeyboardInterrupt
        return self.forward(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# iter_activations


def test_iter_activations_streams_contexts_in_order(llama, contexts):
    batches = list(
        iter_activations(llama, LAYER, contexts, batch_size=7, start=3, stop=20, progress=False)
    )
    assert [len(b.context_ids) for b in batches] == [7, 7, 3]
    batch = batches[1]
    assert isinstance(batch, ActivationBatch)
    assert batch.context_ids.tolist() == list(range(10, 17))
    assert torch.equal(batch.tokens, contexts.tokens[10:17])
    assert torch.equal(batch.special_mask, contexts.special_mask[10:17])
    assert batch.acts.dtype == torch.float32
    assert batch.acts.shape == (7, CTX_LEN + 1, llama.d_model)
    torch.testing.assert_close(
        batch.acts, llama.forward_to_layer(contexts.tokens[10:17], LAYER), rtol=0, atol=0
    )


def test_iter_layer_activations_runs_once_per_batch_for_every_layer(llama, contexts, monkeypatch):
    forward = CountingForward(llama.forward_to_layers)
    monkeypatch.setattr(llama, "forward_to_layers", forward)
    together = list(
        iter_layer_activations(llama, [LAYER, 0], contexts, batch_size=7, stop=20, progress=False)
    )
    assert forward.calls == 3
    for layer in (0, LAYER):
        alone = list(iter_activations(llama, layer, contexts, batch_size=7, stop=20, progress=False))
        for a, b in zip((batches[layer] for batches in together), alone, strict=True):
            assert torch.equal(a.context_ids, b.context_ids)
            assert torch.equal(a.special_mask, b.special_mask)
            torch.testing.assert_close(a.acts, b.acts, rtol=0, atol=1e-6)


def test_iter_activations_checks_the_layer(llama, contexts):
    with pytest.raises(SubjectError, match="layer 9 is outside"):
        next(iter_activations(llama, 9, contexts))


# ---------------------------------------------------------------------------------------------
# ActivationCache


def test_cache_holds_every_non_special_token_shuffled_across_contexts(
    llama, contexts, reference, tmp_path
):
    cache = build(llama, contexts, tmp_path / "cache")
    assert cache.n_tokens == len(reference) == contexts.n_tokens
    assert cache.d_model == llama.d_model
    rows = all_rows(cache)
    np.testing.assert_array_equal(sorted_rows(rows), sorted_rows(reference))

    # where each cached row came from: the first shard's first rows span many contexts
    owner = {row.tobytes(): i for i, row in enumerate(reference)}
    token_context = np.repeat(np.arange(len(contexts)), (~contexts.special_mask).sum(1).numpy())
    first = {int(token_context[owner[row.tobytes()]]) for row in rows[: CTX_LEN * 2]}
    assert len(first) > 10

    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta["complete"] and meta["n_tokens"] == cache.n_tokens
    assert meta["corpus_fingerprint"] == contexts.fingerprint
    assert meta["hook_name"] == "blocks.2.hook_resid_post" and meta["dtype"] == "float16"
    assert len(meta["shards"]) == -(-len(contexts) // CONTEXTS_PER_SHARD)
    opened = ActivationCache.open(tmp_path / "cache")
    assert isinstance(opened._shards[0], np.memmap)
    np.testing.assert_array_equal(all_rows(opened), rows)


def test_token_batches_cross_shard_borders(llama, contexts, tmp_path):
    cache = build(llama, contexts, tmp_path / "cache")
    rows = all_rows(cache)
    batches = list(cache.token_batches(333, start=100, stop=1100))
    assert [len(b) for b in batches] == [333, 333, 333, 1]
    assert all(b.dtype == torch.float32 and b.shape[1] == llama.d_model for b in batches)
    np.testing.assert_array_equal(torch.cat(batches).to(torch.float16).numpy(), rows[100:1100])
    with pytest.raises(ActivationCacheError, match="start 5000000 is outside"):
        next(cache.token_batches(10, start=5_000_000))


def test_interrupted_build_resumes_to_identical_contents(llama, contexts, tmp_path, monkeypatch):
    whole = build(llama, contexts, tmp_path / "whole")
    n_batches = -(-CONTEXTS_PER_SHARD // 16)  # forward calls per shard

    interrupted = CountingForward(llama.forward_to_layers, fail_on=3 * n_batches + 2)
    monkeypatch.setattr(llama, "forward_to_layers", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(llama, contexts, tmp_path / "resumed")
    meta = json.loads((tmp_path / "resumed" / "meta.json").read_text())
    assert len(meta["shards"]) == 3 and not meta["complete"]
    with pytest.raises(ActivationCacheError, match="unfinished.*build it again to resume"):
        ActivationCache.open(tmp_path / "resumed")

    resumed_forward = CountingForward(interrupted.forward)
    monkeypatch.setattr(llama, "forward_to_layers", resumed_forward)
    resumed = build(llama, contexts, tmp_path / "resumed")
    remaining = range(
        3 * CONTEXTS_PER_SHARD, len(contexts), CONTEXTS_PER_SHARD
    )  # unfinished shards
    n = len(contexts)
    assert resumed_forward.calls == sum(
        -(-(min(s + CONTEXTS_PER_SHARD, n) - s) // 16) for s in remaining
    )
    assert resumed.n_tokens == whole.n_tokens
    for a, b in zip(whole._shards, resumed._shards, strict=True):
        np.testing.assert_array_equal(a, b)


def test_finished_cache_is_reused_and_a_small_one_extended(llama, contexts, tmp_path, monkeypatch):
    small = build(llama, contexts, tmp_path / "cache", max_tokens=1000)
    assert 1000 <= small.n_tokens < 1000 + CTX_LEN + 1
    forward = CountingForward(llama.forward_to_layers)
    monkeypatch.setattr(llama, "forward_to_layers", forward)
    assert build(llama, contexts, tmp_path / "cache", max_tokens=500).n_tokens == small.n_tokens
    assert forward.calls == 0

    extended = build(llama, contexts, tmp_path / "cache")
    fresh = build(llama, contexts, tmp_path / "fresh")
    assert extended.n_tokens == fresh.n_tokens == contexts.n_tokens
    np.testing.assert_array_equal(all_rows(extended), all_rows(fresh))
    assert sorted(p.name for p in (tmp_path / "cache").glob("shard_*")) == sorted(
        p.name for p in (tmp_path / "fresh").glob("shard_*")
    )


def test_cache_for_another_layer_or_corpus_is_refused(llama, contexts, tmp_path):
    build(llama, contexts, tmp_path / "cache", max_tokens=200)
    with pytest.raises(
        ActivationCacheError,
        match=r"caches .* blocks\.2\.hook_resid_post .*, not .* blocks\.1\.hook_resid_post",
    ):
        ActivationCache.build(llama, 1, contexts, tmp_path / "cache")
    other_corpus = build_contexts(contexts.spec, llama.tokenizer, ctx_len=CTX_LEN, seed=1)
    with pytest.raises(ActivationCacheError, match="pass another folder or delete this one"):
        ActivationCache.build(llama, LAYER, other_corpus, tmp_path / "cache")


def test_open_and_build_errors(llama, contexts, tmp_path):
    with pytest.raises(ActivationCacheError, match="holds no activation cache"):
        ActivationCache.open(tmp_path)
    with pytest.raises(ActivationCacheError, match="max_tokens must be at least 1"):
        build(llama, contexts, tmp_path / "cache", max_tokens=0)
    folder = tmp_path / "busy"
    folder.mkdir()
    with open(folder / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ActivationCacheError, match="another process is building"):
            build(llama, contexts, folder)


def test_default_folder_names_model_layer_and_corpus(llama, contexts):
    folder = ActivationCache.default_folder(llama, LAYER, contexts)
    assert folder.parent.name == "activations"
    assert Path(llama.name).name in folder.name and f"-L{LAYER}-" in folder.name
    split = dataclasses.replace(contexts, fingerprint=f"{contexts.fingerprint}-train0-100")
    others = {
        ActivationCache.default_folder(llama, LAYER, split),
        ActivationCache.default_folder(llama, LAYER + 1, contexts),
    }
    assert folder not in others and len(others) == 2


def build_layers(llama, contexts, folders, **kwargs) -> dict[int, ActivationCache]:
    return ActivationCache.build_layers(
        llama,
        folders,
        contexts,
        batch_size=16,
        shard_bytes=shard_bytes(llama, contexts),
        progress=False,
        **kwargs,
    )


def test_caches_of_several_layers_fill_from_one_pass(llama, contexts, tmp_path, monkeypatch):
    singles = {
        layer: build_layers(llama, contexts, {layer: tmp_path / f"single{layer}"}, max_tokens=1500)[layer]
        for layer in (0, 1, LAYER)
    }
    forward = CountingForward(llama.forward_to_layers)
    monkeypatch.setattr(llama, "forward_to_layers", forward)
    # layer 1's cache is already there and complete: it is reused, the other two are built together
    folders = {0: tmp_path / "l0", 1: tmp_path / "single1", LAYER: tmp_path / f"l{LAYER}"}
    together = build_layers(llama, contexts, folders, max_tokens=1500)
    n_contexts = together[0].meta["n_contexts"]
    shards = range(0, n_contexts, CONTEXTS_PER_SHARD)
    assert forward.calls == sum(-(-(min(s + CONTEXTS_PER_SHARD, n_contexts) - s) // 16) for s in shards)
    for layer, cache in together.items():
        assert cache.meta["layer"] == layer and cache.meta["complete"]
        np.testing.assert_array_equal(all_rows(cache), all_rows(singles[layer]))
    assert not np.array_equal(all_rows(together[0]), all_rows(together[LAYER]))

    # killed part-way, the same call resumes each layer where it stopped
    interrupted = CountingForward(forward.forward, fail_on=n_batches_per_shard() + 1)
    monkeypatch.setattr(llama, "forward_to_layers", interrupted)
    folders = {0: tmp_path / "r0", LAYER: tmp_path / f"r{LAYER}"}
    with pytest.raises(KeyboardInterrupt):
        build_layers(llama, contexts, folders, max_tokens=1500)
    assert [len(json.loads((f / "meta.json").read_text())["shards"]) for f in folders.values()] == [1, 1]
    monkeypatch.setattr(llama, "forward_to_layers", forward.forward)
    resumed = build_layers(llama, contexts, folders, max_tokens=1500)
    for layer in folders:
        np.testing.assert_array_equal(all_rows(resumed[layer]), all_rows(together[layer]))


def test_several_layers_refuse_a_foreign_cache_before_building(llama, contexts, tmp_path):
    build(llama, contexts, tmp_path / "cache", max_tokens=200)  # a layer-2 cache
    with pytest.raises(ActivationCacheError, match=r"blocks\.2\.hook_resid_post .*, not .* blocks\.1"):
        build_layers(llama, contexts, {0: tmp_path / "l0", 1: tmp_path / "cache"})
    assert not (tmp_path / "l0" / "meta.json").exists()


def n_batches_per_shard() -> int:
    return -(-CONTEXTS_PER_SHARD // 16)


# ---------------------------------------------------------------------------------------------
# A cache read back in context order (precompute --reuse-activations)


def test_a_training_cache_serves_a_prefix_of_its_corpus_as_the_forward_gives_it(llama, contexts, monkeypatch):
    train = held_out_split(contexts, 20).train  # what `saescope train` caches
    cache = build(llama, train, ActivationCache.default_folder(llama, LAYER, train), max_tokens=1500)
    n_cached = cache.meta["n_contexts"]
    assert n_cached > 2 * CONTEXTS_PER_SHARD  # the prefix below crosses shard borders
    prefix = dataclasses.replace(contexts, tokens=contexts.tokens[: n_cached - 3], special_mask=contexts.special_mask[: n_cached - 3])
    assert find_cache(llama, LAYER, prefix).folder == cache.folder

    forward = CountingForward(llama.forward_to_layers)
    monkeypatch.setattr(llama, "forward_to_layers", forward)
    read = list(iter_layer_activations(llama, [LAYER], prefix, batch_size=7, progress=False, caches={LAYER: cache}))
    assert forward.calls == 0
    with torch.no_grad():  # in the batches the cache was built in (16 at a time within each shard):
        computed = torch.cat([  # the batch shape can change an fp32 sum in its last bit, and so its fp16
            forward.forward(contexts.tokens[lo : min(lo + 16, start + CONTEXTS_PER_SHARD, n_cached)], [LAYER])[LAYER]
            for start in range(0, n_cached, CONTEXTS_PER_SHARD)
            for lo in range(start, min(start + CONTEXTS_PER_SHARD, n_cached), 16)
        ])[: len(prefix)]
    acts = torch.cat([batches[LAYER].acts for batches in read])
    assert torch.equal(torch.cat([batches[LAYER].context_ids for batches in read]), torch.arange(len(prefix)))
    assert torch.equal(acts[~prefix.special_mask], computed[~prefix.special_mask].half().float())
    assert not acts[prefix.special_mask].any()

    # a layer with no cache is computed, in the same pass
    both = next(iter_layer_activations(llama, [0, LAYER], prefix, batch_size=7, progress=False, caches={LAYER: cache}))
    assert forward.calls == 1
    torch.testing.assert_close(both[0].acts, forward.forward(prefix.tokens[:7], [0])[0], rtol=0, atol=0)
    assert torch.equal(both[LAYER].acts, read[0][LAYER].acts)


def test_find_cache_wants_the_same_model_layer_and_rows(llama, contexts):
    train = held_out_split(contexts, 20).train
    build(llama, train, ActivationCache.default_folder(llama, LAYER, train), max_tokens=600)
    n_cached = json.loads((ActivationCache.default_folder(llama, LAYER, train) / "meta.json").read_text())["n_contexts"]
    rows = lambda lo, hi: context_rows(contexts, lo, hi, "part")  # noqa: E731
    assert find_cache(llama, LAYER, rows(0, n_cached)) is not None
    assert find_cache(llama, LAYER, rows(0, n_cached + 1)) is None  # more than it holds
    assert find_cache(llama, LAYER, rows(1, n_cached)) is None  # other rows
    assert find_cache(llama, 1, rows(0, 5)) is None  # another layer
    assert find_cache(llama, LAYER, dataclasses.replace(rows(0, 5), source="another corpus")) is None

    meta_file = ActivationCache.default_folder(llama, LAYER, train) / "meta.json"
    meta = json.loads(meta_file.read_text())
    del meta["rows"]  # as saescope wrote caches before it recorded their rows
    meta_file.write_text(json.dumps(meta))
    assert find_cache(llama, LAYER, rows(0, n_cached)) is not None  # a training split's are read off its fingerprint
    assert find_cache(llama, LAYER, rows(1, n_cached)) is None


def test_a_cache_refuses_contexts_that_are_not_its_own(llama, contexts):
    cache = build(llama, contexts, ActivationCache.default_folder(llama, LAYER, contexts), max_tokens=1500)
    counts = (~contexts.special_mask).sum(dim=1).numpy()
    with pytest.raises(ActivationCacheError, match="holds other contexts"):
        cache.context_acts(0, CONTEXTS_PER_SHARD, counts + 1, contexts.special_mask[:CONTEXTS_PER_SHARD])
    n_cached = cache.meta["n_contexts"]
    with pytest.raises(ActivationCacheError, match=f"has no contexts {n_cached - 1}..{n_cached}"):
        cache.context_acts(n_cached - 1, n_cached + 1, counts, contexts.special_mask[n_cached - 1 : n_cached + 1])
