"""sae_core.live.probe: prompt encoding, which features fire, one feature on custom text."""

from __future__ import annotations

import pytest
import torch

from sae_core.live import probe as live
from tests.live_support import random_sae

LAYER = 1
TEXT = "Paris is the capital of France."


@pytest.fixture(scope="module")
def sae(llama):
    return random_sae(llama.d_model, architecture="topk", k=8, layer=LAYER)


def direct_acts(subject, sae, ids: list[int]) -> torch.Tensor:
    """(seq, d_sae) SAE activations from the full model's hidden states, computed independently."""
    with torch.no_grad():
        hidden = subject.model(torch.tensor([ids]), output_hidden_states=True).hidden_states[LAYER + 1]
        return sae.encode(hidden[0])


def test_encode_prompt_prepends_bos_and_marks_it_special(llama):
    prompt = live.encode_prompt(llama, TEXT)
    plain = llama.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert prompt.ids.tolist() == [llama.bos_token_id, *plain]
    assert prompt.special_mask.tolist() == [True] + [False] * len(plain)
    assert "".join(t.text for t in prompt.tokens[1:]) == TEXT


def test_overlong_prompt_names_the_limit(llama):
    n_tokens = len(live.encode_prompt(llama, TEXT))
    with pytest.raises(live.PromptTooLong, match=rf"is {n_tokens} tokens but at most {n_tokens - 1}"):
        live.encode_prompt(llama, TEXT, max_tokens=n_tokens - 1)
    assert len(live.encode_prompt(llama, TEXT, max_tokens=n_tokens)) == n_tokens


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"text": "   "}, "empty"), ({"text": TEXT, "chat": True}, "no chat template")],
)
def test_unusable_prompts_are_refused(llama, kwargs, message):
    with pytest.raises(live.LiveError, match=message):
        live.encode_prompt(llama, **kwargs)


def test_single_token_id(llama):
    token = llama.tokenizer(" the", add_special_tokens=False)["input_ids"]
    assert len(token) == 1
    assert live.single_token_id(llama, " the") == token[0]
    with pytest.raises(live.LiveError, match="exactly one token"):
        live.single_token_id(llama, " the capital of France")


def test_activations_equal_a_direct_computation(llama, sae):
    prompt = live.encode_prompt(llama, TEXT)
    f = direct_acts(llama, sae, prompt.ids.tolist())
    f[0] = 0.0  # BOS never counts
    result = live.activations(llama, sae, LAYER, TEXT, per_token=3, top=10)

    assert [t.token_id for t in result.tokens] == prompt.ids.tolist()
    assert result.top_per_token[0] == []
    for pos in range(1, len(prompt)):
        values, indices = f[pos].topk(3)
        assert [fv.feature for fv in result.top_per_token[pos]] == indices.tolist()
        torch.testing.assert_close(torch.tensor([fv.value for fv in result.top_per_token[pos]]), values)

    max_values, max_positions = f.max(dim=0)
    best = max_values.topk(10)
    assert [r.feature for r in result.ranked] == best.indices.tolist()
    for ranked in result.ranked:
        assert ranked.max_value == pytest.approx(float(max_values[ranked.feature]), rel=1e-5)
        assert ranked.max_position == int(max_positions[ranked.feature]) != 0
        torch.testing.assert_close(torch.tensor(ranked.values), f[:, ranked.feature])


def test_ranking_stops_at_features_that_fire(llama, sae):
    result = live.activations(llama, sae, LAYER, "Paris", top=sae.d_sae)
    n_firing = int((direct_acts(llama, sae, live.encode_prompt(llama, "Paris").ids.tolist())[1:] > 0).any(0).sum())
    assert len(result.ranked) == n_firing
    assert all(r.max_value > 0 for r in result.ranked)


def test_feature_activations_on_custom_text(llama, sae):
    result = live.activations(llama, sae, LAYER, TEXT, top=1)
    feature = result.ranked[0].feature
    one = live.feature_activations(llama, sae, LAYER, TEXT, feature)
    assert one.values == pytest.approx(result.ranked[0].values)
    assert (one.max_value, one.max_position) == pytest.approx((result.ranked[0].max_value, result.ranked[0].max_position))
    with pytest.raises(live.LiveError, match=f"features 0..{sae.d_sae - 1}"):
        live.feature_activations(llama, sae, LAYER, TEXT, sae.d_sae)


def test_chat_template_wraps_the_prompt_as_a_user_turn(llama, monkeypatch):
    template = "{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    monkeypatch.setattr(llama.tokenizer, "chat_template", template)
    prompt = live.encode_prompt(llama, "hello", chat=True)
    expected = llama.tokenizer("<|bos|>user: hello\nassistant:", add_special_tokens=False)["input_ids"]
    assert prompt.ids.tolist() == expected
    assert prompt.special_mask.tolist() == [t == llama.bos_token_id for t in expected]
