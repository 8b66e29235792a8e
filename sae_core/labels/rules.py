"""The language of labels: a rule a machine can apply to every token, and its human-readable text.

A rule says "the feature fires on this token" when all of its parts hold:
- ``tokens``: the token's text is one of these (empty: any token);
- ``previous``: the text of the token before it is one of these (empty: any);
- ``context``: the token sits in a context of this kind (see ``CONTEXTS``; None: anywhere).

Token contexts come from the decoded text of the window alone, with a small lexer: Python string
literals, docstrings and comments, the first token of a line, and whether the window reads as
English prose or as code. Windows start mid-file, so the lexer assumes each starts outside any
string; the rule's score measures how much that matters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import numpy as np

# name -> how a label says it. Order is the row order of ``context_masks``.
CONTEXTS: dict[str, str] = {
    "string": "in string literals",
    "docstring": "in docstrings",
    "comment": "in comments",
    "line_start": "at line start",
    "prose": "in English prose",
    "code": "in Python code",
}
CONTEXT_NAMES = tuple(CONTEXTS)

# Lexer states per character.
_CODE, _STRING, _DOCSTRING, _COMMENT = 0, 1, 2, 3
_LEXEMES = re.compile(r'"""|\'\'\'|"|\'|#|\n|\\.')
# Characters that mark code; prose is a window where they are rare.
_LETTERS = re.compile(r"[^\W\d_]")
_CODE_CHARS = re.compile(r"[()\[\]{}=_:#<>*/@\\|`]")
PROSE_MAX_CODE_CHAR_SHARE = (
    0.02  # English text has ~1% of these (a parenthesis, a colon); code 8-15%
)


@dataclass(frozen=True)
class LabelRule:
    tokens: tuple[str, ...] = ()
    previous: tuple[str, ...] = ()
    context: str | None = None

    def __post_init__(self):
        if self.context is not None and self.context not in CONTEXTS:
            raise ValueError(f"unknown context {self.context!r}; one of {', '.join(CONTEXTS)}")

    @property
    def n_parts(self) -> int:
        return bool(self.tokens) + bool(self.previous) + (self.context is not None)

    def to_json(self) -> dict:
        return {
            "tokens": list(self.tokens),
            "previous": list(self.previous),
            "context": self.context,
        }

    @classmethod
    def from_json(cls, data: dict) -> LabelRule:
        return cls(
            tuple(data.get("tokens", ())), tuple(data.get("previous", ())), data.get("context")
        )

    def describe(self, *, max_shown: int = 4) -> str:
        """The label: e.g. ``" Paris" / " Lyon" (in English prose)`` or ``after " def"``."""
        parts = []
        if self.tokens:
            parts.append(_token_list(self.tokens, max_shown))
        if self.previous:
            parts.append(f"after {_token_list(self.previous, max_shown)}")
        if self.context is not None:
            where = CONTEXTS[self.context]
            parts.append(f"({where})" if parts else f"any token {where}")
        return " ".join(parts) if parts else "any token"


_QUOTED = r'"(?:[^"\\]|\\.)*"'
_QUOTED_LIST = rf"{_QUOTED}(?:\s*/\s*{_QUOTED})*"
_LABEL_GRAMMAR = re.compile(
    rf"(?P<tokens>{_QUOTED_LIST})?\s*(?:after\s+(?P<previous>{_QUOTED_LIST}))?\s*"
    rf"(?:\((?P<context>[^)]+)\)|any token (?P<only_context>.+))?"
)
_CONTEXT_BY_PHRASE = {phrase: name for name, phrase in CONTEXTS.items()}
_UNESCAPE = {"n": "\n", "t": "\t", '"': '"', "\\": "\\"}


def _unquote_list(text: str | None) -> tuple[str, ...]:
    if not text:
        return ()
    return tuple(
        re.sub(r"\\(.)", lambda m: _UNESCAPE.get(m.group(1), m.group(1)), q[1:-1])
        for q in re.findall(_QUOTED, text)
    )


def parse_label(text: str) -> LabelRule | None:
    """The rule a label written in the rule language states (``describe``'s output, all tokens
    listed), e.g. ``" Paris" / " Lyon" (in English prose)``; None for free text."""
    match = _LABEL_GRAMMAR.fullmatch(text.strip())
    if not match or not any(match.groupdict().values()):
        return None
    phrase = match.group("context") or match.group("only_context")
    if phrase is not None and phrase.strip() not in _CONTEXT_BY_PHRASE:
        return None
    context = _CONTEXT_BY_PHRASE[phrase.strip()] if phrase else None
    return LabelRule(
        _unquote_list(match.group("tokens")), _unquote_list(match.group("previous")), context
    )


def _quote(text: str) -> str:
    return (
        '"'
        + text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace('"', '\\"')
        + '"'
    )


def _token_list(texts: tuple[str, ...], max_shown: int) -> str:
    shown = " / ".join(_quote(t) for t in texts[:max_shown])
    more = len(texts) - max_shown
    return f"{shown} / +{more} more" if more > 0 else shown


# ---------------------------------------------------------------------------------------------
# Token contexts


def _char_states(text: str) -> np.ndarray:
    """Lexer state of every character: code, string, docstring or comment. (len(text),) int8."""
    states = np.zeros(len(text), dtype=np.int8)
    state, opener, start = _CODE, "", 0
    for match in _LEXEMES.finditer(text):
        lexeme, pos = match.group(), match.start()
        if state == _CODE:
            if lexeme in ('"""', "'''", '"', "'", "#"):
                state = {"#": _COMMENT}.get(lexeme, _DOCSTRING if len(lexeme) == 3 else _STRING)
                opener, start = lexeme, pos
        elif state == _COMMENT and lexeme == "\n":
            states[start:pos] = _COMMENT
            state = _CODE
        elif state == _STRING and lexeme in (opener, "\n"):
            states[start : match.end()] = _STRING
            state = _CODE
        elif state == _DOCSTRING and lexeme == opener:
            states[start : match.end()] = _DOCSTRING
            state = _CODE
    if state != _CODE:
        states[start:] = state
    return states


def _is_prose(text: str) -> bool:
    if len(_LETTERS.findall(text)) < len(text) / 2:
        return False
    return len(_CODE_CHARS.findall(text)) <= PROSE_MAX_CODE_CHAR_SHARE * len(text)


class _TokenShape(NamedTuple):
    lead: int  # characters of leading whitespace (the whole token when it has no visible one)
    visible: bool  # holds a non-whitespace character
    newline_in_lead: bool  # a line break before its first visible character
    ends_line: bool  # its visible part is followed by a line break and only whitespace after


@lru_cache(maxsize=1 << 17)  # one entry per distinct token text: a vocabulary fits
def _shape(text: str) -> _TokenShape:
    visible = text.lstrip()
    lead = len(text) - len(visible)
    ends_line = "\n" in visible and not visible[visible.rindex("\n") + 1 :].strip()
    return _TokenShape(lead, bool(visible), "\n" in text[:lead], ends_line)


def _line_starts(shapes: list[_TokenShape]) -> np.ndarray:
    """True at the first visible token of each line. (seq,) bool; the window's first line is
    assumed to start before the window, since windows are cut mid-line."""
    out = np.zeros(len(shapes), dtype=bool)
    at_line_start = False
    for i, shape in enumerate(shapes):
        if not shape.visible:
            at_line_start = at_line_start or shape.newline_in_lead
            continue
        out[i] = at_line_start or shape.newline_in_lead
        at_line_start = shape.ends_line
    return out


def context_masks(texts: list[str]) -> np.ndarray:
    """Which contexts hold at each token of a window, from the tokens' decoded texts.

    Returns (len(CONTEXT_NAMES), seq) bool, rows in ``CONTEXT_NAMES`` order.
    """
    text = "".join(texts)
    shapes = [_shape(t) for t in texts]
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))  # (seq,)
    starts = np.cumsum(lengths) - lengths
    # A token's state is that of its first visible character (a leading space belongs to code).
    leads = np.fromiter(
        (sh.lead if sh.visible else 0 for sh in shapes), dtype=np.int64, count=len(texts)
    )
    firsts = starts + leads
    states = _char_states(text)
    token_state = (
        states[np.minimum(firsts, max(len(text) - 1, 0))] if text else np.zeros(len(texts), np.int8)
    )
    line_start = _line_starts(shapes)
    prose = _is_prose(text)
    masks = np.zeros((len(CONTEXT_NAMES), len(texts)), dtype=bool)
    masks[CONTEXT_NAMES.index("string")] = token_state == _STRING
    masks[CONTEXT_NAMES.index("docstring")] = token_state == _DOCSTRING
    masks[CONTEXT_NAMES.index("comment")] = token_state == _COMMENT
    masks[CONTEXT_NAMES.index("line_start")] = line_start
    masks[CONTEXT_NAMES.index("prose")] = prose
    masks[CONTEXT_NAMES.index("code")] = not prose
    return masks
