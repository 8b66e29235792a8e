"""Tokens as the bytes they stand for, and runs of tokens as the text people wrote.

Byte-level BPE (GPT-2, SmolLM2, Llama 3) splits an emoji or an accented letter across tokens, and
each such token decoded alone is U+FFFD. ``token_bytes`` gives every token's bytes;
``joined_texts`` decodes a run of them as one string and gives each token its share: a character
split across tokens goes whole to the token where it begins, and the tokens that only continue
it get "" (so the shares still line up with the tokens and their activations, and join to the
decoded text).
"""

from __future__ import annotations

import codecs
import functools
import re
from collections.abc import Sequence

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte tokens


@functools.cache
def _byte_of() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    chars = {byte: byte for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in chars:
            chars[byte] = 256 + extra
            extra += 1
    return {chr(char): byte for byte, char in chars.items()}


def _is_byte_level(tokenizer) -> bool:
    """Whether the tokenizer's decoder (alone, or in a sequence) maps GPT-2's alphabet to bytes."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    return decoder is not None and b'"type":"ByteLevel"' in decoder.__getstate__()


def token_bytes(tokenizer, ids: Sequence[int]) -> list[bytes]:
    """The bytes each token stands for (its text's UTF-8 when the tokenizer does not say)."""
    ids = [int(i) for i in ids]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    byte_of = _byte_of() if _is_byte_level(tokenizer) else {}
    special = set(getattr(tokenizer, "all_special_ids", ()))
    out = []
    for token_id, piece in zip(ids, pieces, strict=True):
        fallback = _BYTE_FALLBACK.fullmatch(piece or "")
        if byte_of and piece and token_id not in special and all(c in byte_of for c in piece):
            out.append(bytes(byte_of[c] for c in piece))
        elif fallback:
            out.append(bytes.fromhex(fallback.group(1)))
        else:
            out.append(tokenizer.decode([token_id]).encode("utf-8"))
    return out


def is_partial(piece: bytes) -> bool:
    """Whether these bytes alone are not UTF-8 text (part of a character split across tokens)."""
    try:
        piece.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def joined_texts(pieces: Sequence[bytes]) -> list[str]:
    """Each token's share of the decoded run (see the module docstring); bytes that never form a
    character (a run cut mid-character) show as U+FFFD."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    texts: list[str] = []
    start = None  # first token of a character still being completed
    for position, piece in enumerate(pieces):
        text = decoder.decode(piece, final=position == len(pieces) - 1)
        texts.append("")
        if start is None:
            start = position
        texts[start] += text
        if decoder.getstate()[0] == b"":  # nothing pending: the next token starts afresh
            start = None
    return texts
