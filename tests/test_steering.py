"""sae_core.live.steering: the intervention's arithmetic and side-by-side generation."""

from __future__ import annotations

import pytest
import torch

from sae_core.live import probe as live
from sae_core.live.steering import Generation, SteerFeature, SteerHook, steer
from tests.live_support import random_sae

LAYER = 1
TEXT = "def add(a, b):"


@pytest.fixture(scope="module")
def sae(llama):
    return random_sae(llama.d_model, layer=LAYER)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_strength_zero_reproduces_the_default_continuation(llama, sae, temperature):
    generation = Generation(max_new_tokens=12, temperature=temperature, seed=3)
    result = steer(llama, sae, LAYER, TEXT, [SteerFeature(5, 0.0)], generation=generation)
    assert len(result.default.token_ids) == 12
    assert result.steered == result.default
    assert result.prompt_text == "<|bos|>" + TEXT


def test_same_seed_same_sample_and_another_seed_differs(llama, sae):
    def sampled(seed):
        generation = Generation(max_new_tokens=12, temperature=1.0, seed=seed)
        return steer(llama, sae, LAYER, TEXT, [SteerFeature(5, 0.0)], generation=generation).default

    assert sampled(1) == sampled(1)
    assert sampled(1) != sampled(2)


def test_a_strong_feature_changes_the_continuation(llama, sae):
    generation = Generation(max_new_tokens=12, temperature=0.0)
    result = steer(llama, sae, LAYER, TEXT, [SteerFeature(5, 20.0)], generation=generation)
    assert result.steered.token_ids != result.default.token_ids


def test_add_hook_writes_the_scaled_decoder_rows_at_kept_positions(sae):
    x = torch.randn(1, 4, sae.d_in)
    hook = SteerHook(sae, "add", [SteerFeature(2, 3.0), SteerFeature(7, -1.5)])
    hook.keep = torch.tensor([[False, True, True, True]])
    out = hook(x)
    expected = x + 3.0 * sae.W_dec[2].detach() - 1.5 * sae.W_dec[7].detach()
    torch.testing.assert_close(out[0, 1:], expected[0, 1:])
    assert torch.equal(out[0, 0], x[0, 0])


def test_clamp_hook_holds_the_feature_and_keeps_the_error_term(sae):
    x = torch.randn(1, 4, sae.d_in)
    hook = SteerHook(sae, "clamp", [SteerFeature(2, 4.0)])
    hook.keep = torch.ones(1, 4, dtype=torch.bool)
    with torch.no_grad():
        f = sae.encode(x)
        clamped = f.clone()
        clamped[..., 2] = 4.0
        expected = sae.decode(clamped) + (x - sae.decode(f))
        torch.testing.assert_close(hook(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("features", "mode", "message"),
    [
        ([], "add", "at least one feature"),
        ([SteerFeature(10_000, 1.0)], "add", "does not exist"),
        ([SteerFeature(1, 1.0)], "scale", "unknown steering mode"),
    ],
)
def test_bad_requests_are_refused(llama, sae, features, mode, message):
    with pytest.raises(live.LiveError, match=message):
        steer(llama, sae, LAYER, TEXT, features, mode=mode)
