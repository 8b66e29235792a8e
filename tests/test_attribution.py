"""sae_core.live.attribution: activation × gradient against finite differences, DLA by hand."""

from __future__ import annotations

import pytest
import torch

from sae_core.inputs.subject import load_subject
from sae_core.live import probe as live
from sae_core.live.attribution import Target, attribution
from tests.live_support import random_sae

LAYER = 1
TEXT = "The quick brown fox jumps"


@pytest.fixture(scope="module")
def llama64(llama_dir):
    """The tiny Llama in float64, so finite differences are accurate to many digits."""
    return load_subject(str(llama_dir), dtype=torch.float64)


@pytest.fixture(scope="module")
def sae64(llama64):
    return random_sae(llama64.d_model, layer=LAYER).double()


def metric_with(subject, ids, position, token, delta=None):
    """The target logit with ``delta`` (seq, d_model) added to the residual after block LAYER."""
    with torch.no_grad(), subject.patch_layer(LAYER, lambda x: x if delta is None else x + delta):
        return float(subject.model(ids[None]).logits[0, position, token])


def test_attribution_matches_finite_differences_along_each_feature(llama64, sae64):
    prompt = live.encode_prompt(llama64, TEXT)
    result = attribution(llama64, sae64, LAYER, prompt, top=10_000)
    position, token = result.position, result.token.token_id
    assert result.metric == pytest.approx(metric_with(llama64, prompt.ids, position, token), abs=1e-12)
    assert len(result.entries) > 20
    # Llama's RMSNorm computes in float32 even in a float64 model, so eps trades that rounding
    # (which grows as 1/eps, ~5e-5 absolute here) against curvature (which grows as eps^2).
    eps = 1e-3
    assert max(abs(e.attribution) for e in result.entries) > 0.1
    for entry in result.entries:
        assert entry.position != 0  # BOS never counts
        delta = torch.zeros(len(prompt), llama64.d_model, dtype=torch.float64)
        delta[entry.position] = eps * entry.activation * sae64.W_dec[entry.feature].detach()
        up = metric_with(llama64, prompt.ids, position, token, delta)
        down = metric_with(llama64, prompt.ids, position, token, -delta)
        assert (up - down) / (2 * eps) == pytest.approx(entry.attribution, rel=1e-3, abs=1e-4)


def test_attribution_sums_to_the_linear_estimate_of_removing_every_feature(llama64, sae64):
    prompt = live.encode_prompt(llama64, TEXT)
    result = attribution(llama64, sae64, LAYER, prompt, top=10_000)
    assert sum(e.attribution for e in result.entries) == pytest.approx(result.total, rel=1e-9)
    assert sum(f.attribution for f in result.features) == pytest.approx(result.total, rel=1e-9)
    with torch.no_grad():
        x = llama64.forward_to_layer(prompt.ids[None], LAYER)[0]
        f = sae64.encode(x)
    f[0] = 0.0
    features_part = f @ sae64.W_dec.detach()  # (seq, d_model): all features' decoder writes
    eps = 1e-4  # the whole feature write is a large step, so a smaller one than above
    args = (llama64, prompt.ids, result.position, result.token.token_id)
    removed = (metric_with(*args, -eps * features_part) - metric_with(*args, eps * features_part)) / (2 * eps)
    assert removed == pytest.approx(-result.total, rel=1e-3)
    # The error term carries the rest of the gradient at non-special positions: x · ∇ = features + error + b_dec.
    assert abs(result.error) > 0


def test_default_target_is_the_top_prediction_at_the_last_position(llama, sae_tiny):
    prompt = live.encode_prompt(llama, TEXT)
    with torch.no_grad():
        logits = llama.model(prompt.ids[None]).logits[0, -1]
    result = attribution(llama, sae_tiny, LAYER, prompt)
    assert result.position == len(prompt) - 1
    assert result.token.token_id == int(logits.argmax()) == result.predictions[0].token_id
    assert result.metric == pytest.approx(float(logits.max()), rel=1e-5)
    assert [p.token_id for p in result.predictions] == logits.topk(5).indices.tolist()


def test_logit_difference_target(llama, sae_tiny):
    prompt = live.encode_prompt(llama, TEXT)
    with torch.no_grad():
        logits = llama.model(prompt.ids[None]).logits[0, 3]
    result = attribution(llama, sae_tiny, LAYER, prompt, Target(position=3, token=10, contrast=20))
    assert result.metric == pytest.approx(float(logits[10] - logits[20]), rel=1e-5)
    assert (result.token.token_id, result.contrast.token_id) == (10, 20)
    assert all(e.position <= 3 for e in result.entries if e.attribution != 0)


@pytest.mark.parametrize(
    ("target", "message"),
    [(Target(position=99), "outside the prompt"), (Target(token=10**6), "outside the vocabulary")],
)
def test_bad_targets_are_refused(llama, sae_tiny, target, message):
    with pytest.raises(live.LiveError, match=message):
        attribution(llama, sae_tiny, LAYER, TEXT, target)


def final_residual(subject, ids) -> torch.Tensor:
    """(seq, d_model) input of the final norm, captured by a hook."""
    seen = []
    handle = subject.final_norm.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0]))
    try:
        with torch.no_grad():
            subject.model(ids[None])
    finally:
        handle.remove()
    return seen[0][0]


def test_dla_equals_hand_computation_through_rmsnorm(llama, sae_tiny):
    prompt = live.encode_prompt(llama, TEXT)
    result = attribution(llama, sae_tiny, LAYER, prompt, Target(token=7, contrast=9), top=10_000)
    r = final_residual(llama, prompt.ids)[-1]
    sigma = torch.sqrt(r.pow(2).mean() + llama.final_norm.variance_epsilon)
    u = llama.unembed[7] - llama.unembed[9]
    at_target = [e for e in result.entries if e.position == result.position]
    assert at_target
    for entry in at_target:
        hand = entry.activation * float((sae_tiny.W_dec[entry.feature].detach() * llama.final_norm.weight) @ u) / float(sigma)
        assert entry.dla == pytest.approx(hand, rel=1e-4, abs=1e-7)
    assert all(e.dla == 0 for e in result.entries if e.position != result.position)


def test_dla_equals_hand_computation_through_layernorm(gpt2_dir):
    gpt2 = load_subject(str(gpt2_dir))
    sae = random_sae(gpt2.d_model, layer=LAYER)
    prompt = live.encode_prompt(gpt2, TEXT)
    result = attribution(gpt2, sae, LAYER, prompt, Target(token=7), top=10_000)
    r = final_residual(gpt2, prompt.ids)[-1]
    sigma = torch.sqrt(r.var(unbiased=False) + gpt2.final_norm.eps)
    at_target = [e for e in result.entries if e.position == result.position]
    assert at_target
    for entry in at_target:
        d = sae.W_dec[entry.feature].detach()
        hand = entry.activation * float(((d - d.mean()) * gpt2.final_norm.weight) @ gpt2.unembed[7]) / float(sigma)
        assert entry.dla == pytest.approx(hand, rel=1e-4, abs=1e-7)


@pytest.fixture(scope="module")
def sae_tiny(llama):
    return random_sae(llama.d_model, layer=LAYER)
