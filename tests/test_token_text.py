"""Text the way people wrote it: characters that byte-level BPE splits across tokens (emoji,
accented letters, RTL marks) are one glyph in heatmaps and JSON, each token keeping its
activation; control characters show as their control pictures. The tokenizer is the tests'
own byte-level BPE (tests/tiny.py), built offline."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from app.rendering import heatmap
from app.vocab import Vocabulary
from sae_core.inputs.token_bytes import joined_texts, token_bytes
from sae_core.live.probe import encode_prompt
from sae_core.precompute.run import vocab_rows
from tests.tiny import make_tokenizer

TEXTS = ["Café au lait", "launch 🚀 now", "שלום\u200f עולם", "naïve façade", "end 😀"]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def vocabulary(tokenizer) -> Vocabulary:
    """The vocabulary as precompute stores it and the server reads it back."""
    rows = vocab_rows(SimpleNamespace(tokenizer=tokenizer, vocab_size=len(tokenizer)))
    return Vocabulary.from_texts(
        {row["token_id"]: row["text"] for row in rows},
        {row["token_id"]: row["raw"] for row in rows if row["raw"] is not None},
    )


@pytest.mark.parametrize("text", TEXTS)
def test_a_run_of_tokens_reads_as_the_text(tokenizer, vocabulary, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    alone = [tokenizer.decode([i]) for i in ids]
    assert "\ufffd" in "".join(alone)  # the tokenizer does split these characters
    for shares in (joined_texts(token_bytes(tokenizer, ids)), vocabulary.texts_of(ids)):
        assert len(shares) == len(ids)
        assert "".join(shares) == text and "\ufffd" not in "".join(shares)


def test_a_split_character_belongs_to_its_first_token(tokenizer, vocabulary):
    ids = tokenizer("🚀", add_special_tokens=False)["input_ids"]
    assert len(ids) == 4  # one token per byte in this small vocabulary
    assert vocabulary.texts_of(ids) == ["🚀", "", "", ""]


def test_a_run_cut_mid_character_shows_one_replacement(tokenizer):
    ids = tokenizer("a🚀", add_special_tokens=False)["input_ids"][:-1]  # the last byte is cut
    assert joined_texts(token_bytes(tokenizer, ids)) == ["a", "\ufffd", "", ""]


def test_the_heatmap_shows_one_glyph_with_every_activation(tokenizer, vocabulary):
    ids = tokenizer("go 🚀", add_special_tokens=False)["input_ids"]
    texts = vocabulary.texts_of(ids)
    values = [0.0] * (len(ids) - 4) + [0.2, 0.9, 0.0, 0.4]
    html = str(heatmap([{"text": t, "value": v} for t, v in zip(texts, values, strict=True)], 1.0))
    assert html.count("🚀") == 2 and "\ufffd" not in html  # the glyph and its title
    assert 'data-act="0.9"' in html and "0.2 / 0.9 / 0 / 0.4" in html
    assert html.count('class="t') == len(ids) - 3


def test_control_characters_show_as_pictures_not_raw(tokenizer, vocabulary):
    ids = tokenizer("a\x1b[31mred\x07\x7f", add_special_tokens=False)["input_ids"]
    html = str(heatmap([{"text": t, "value": 1.0} for t in vocabulary.texts_of(ids)], 1.0))
    assert "␛" in html and "␇" in html and "␡" in html
    assert not any(chr(c) in html for c in [*range(0x20), 0x7F] if chr(c) != "\n")


def test_live_prompt_tokens_join_too(llama):
    prompt = encode_prompt(llama, "ok 🚀")
    texts = [t.text for t in prompt.tokens if not t.special]
    assert "".join(texts) == "ok 🚀" and "\ufffd" not in "".join(texts)
