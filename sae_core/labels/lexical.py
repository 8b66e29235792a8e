"""Where each token of a stored window sits, and what kind of token it is: the predicates that
label rules are made of (see ``sae_core.labels.rules``).

Contexts come from the decoded text of the window alone. Code: a small Python lexer (string
literals, docstrings, comments) plus bracket and line tracking (call arguments, def signatures,
subscripts, decorator and import lines, the statement a line makes). Prose: sentence starts,
quotes, list items, headings.
Windows start mid-file, so the lexer assumes each starts outside any string or bracket and that
its first, cut line is of no known kind; a rule's held-out score measures how much that matters.
Token classes (numbers, capitalised words, closing brackets...) come from a token's text alone.
"""

from __future__ import annotations

import keyword
import re
from functools import lru_cache
from typing import NamedTuple

import numpy as np

# name -> how a label says it: where the token sits. Row order of ``context_masks``.
LOCATIONS: dict[str, str] = {
    "string": "in a string",
    "docstring": "in a docstring",
    "comment": "in a comment",
    "line_start": "at the start of a line",
    "decorator": "on a decorator line",
    "signature": "in a def signature",
    "call_args": "inside call arguments",
    "subscript": "inside square brackets",
    "import_line": "on an import line",
    "code": "in Python code",
    "prose": "in English prose",
    "sentence_start": "at the start of a sentence",
    "quoted": "inside quotes or backticks",
    "list_item": "in a list item",
    "heading": "in a heading",
    # code lines by what they do (the window's first, cut line is of no kind)
    "def_line": "on a def or class line",
    "condition": "in an if/elif/while condition",
    "assign_target": "left of `=` in an assignment",
    "return_line": "in a return or yield statement",
    "raise_line": "on a raise or assert line",
    "loop_line": "on a for or with line",
    "except_line": "on a try, except or finally line",
    # the token's neighbours and the text before it
    "line_end": "at the end of a line",
    "inside_word": "inside a word",
    "after_open": "right after an opening bracket",
    "repeated": "seen earlier in the text",
    "repeated_pair": "repeating an earlier pair of tokens",
}
# name -> how a label says it: what kind of token it is (from its text alone).
TOKEN_CLASSES: dict[str, str] = {
    "number": "a number",
    "capitalised": "a capitalised word",
    "upper": "an upper-case word",
    "lower": "a lower-case word",
    "snake": "a name with `_`",
    "keyword": "a Python keyword",
    "open_bracket": "an opening bracket",
    "close_bracket": "a closing bracket",
    "operator": "an operator",
    "punctuation": "punctuation",
    "indent": "a run of spaces",
    "newline": "a line break",
}
CONTEXTS: dict[str, str] = LOCATIONS | TOKEN_CLASSES
CONTEXT_NAMES = tuple(CONTEXTS)
_ROW = {name: i for i, name in enumerate(CONTEXT_NAMES)}

# Lexer states per character.
_CODE, _STRING, _DOCSTRING, _COMMENT = 0, 1, 2, 3
_LEXEMES = re.compile(r'"""|\'\'\'|"|\'|#|\n|\\.')
_BRACKETS = re.compile(r"[()\[\]{}]")
_LINES = re.compile(r"[^\n]*(?:\n|$)")
# Characters that mark code; prose is a window where they are rare.
_LETTERS = re.compile(r"[^\W\d_]")
_CODE_CHARS = re.compile(r"[()\[\]{}=_:#<>*/@\\|`]")
PROSE_MAX_CODE_CHAR_SHARE = (
    0.02  # English text has ~1% of these (a parenthesis, a colon); code 8-15%
)
# A docstring's text names code more often than other prose does (`f(x)`, an e-mail address)
DOCSTRING_MAX_CODE_CHAR_SHARE = 0.05
_LIST_ITEM = re.compile(r"\s*(?:[-*•+]|\d{1,3}[.)])\s")
_HEADING_UNDERLINE = re.compile(r"\s*([=\-~^*#])\1{2,}\s*$")
_QUOTES = re.compile(r'"[^"\n]{1,200}"|`[^`\n]{1,200}`|“[^”\n]{1,200}”')
_SENTENCE_START = re.compile(r"(?:[.!?][\"')\]]?(?:[ \t]+|[ \t]*\n)|\n[ \t]*\n)[ \t]*[A-Z]")


# ---------------------------------------------------------------------------------------------
# Token classes


@lru_cache(maxsize=1 << 17)  # one entry per distinct token text: a vocabulary fits
def token_classes(text: str) -> tuple[str, ...]:
    """The classes of ``TOKEN_CLASSES`` a token's text belongs to."""
    word = text.strip()
    if not word:
        return ("newline",) if "\n" in text else ("indent",)
    out = []
    if "\n" in text:
        out.append("newline")
    if word.isdigit() or re.fullmatch(r"\d[\d._]*", word):
        out.append("number")
    elif word.isidentifier():
        if keyword.iskeyword(word):
            out.append("keyword")
        if "_" in word.strip("_"):
            out.append("snake")
        if word.isupper() and len(word) > 1:
            out.append("upper")
        elif word[0].isupper():
            out.append("capitalised")
        elif word.isalpha() and word.islower():
            out.append("lower")
    elif all(c in "([{" for c in word):
        out.append("open_bracket")
    elif all(c in ")]}" for c in word):
        out.append("close_bracket")
    elif all(c in "=+-*/%<>!&|^~@:" for c in word):
        out.append("operator")
    elif all(not c.isalnum() for c in word):
        out.append("punctuation")
    return tuple(out)


def class_bits(texts: list[str]) -> np.ndarray:
    """(len(texts), len(CONTEXT_NAMES)) bool: the token-class columns of each text."""
    out = np.zeros((len(texts), len(CONTEXT_NAMES)), dtype=bool)
    for i, text in enumerate(texts):
        for name in token_classes(text):
            out[i, _ROW[name]] = True
    return out


# ---------------------------------------------------------------------------------------------
# Code and prose contexts of a window


_TRIPLE_QUOTES = re.compile(r'"""|\'\'\'')


def _docstring_closed_first(text: str) -> str:
    """The quotes that close a docstring the window starts inside of, or "": the text before the
    first triple quotes reads as prose, and they end their line (where a closing quote sits;
    an opening one starts its docstring's text)."""
    match = _TRIPLE_QUOTES.search(text)
    if match is None or not _is_prose(text[: match.start()], DOCSTRING_MAX_CODE_CHAR_SHARE):
        return ""
    rest = text[match.end() :]
    return match.group() if not rest.strip(" \t") or rest.lstrip(" \t")[0] == "\n" else ""


def _char_states(text: str) -> np.ndarray:
    """Lexer state of every character: code, string, docstring or comment. (len(text),) int8."""
    states = np.zeros(len(text), dtype=np.int8)
    opener = _docstring_closed_first(text)
    state, start = (_DOCSTRING if opener else _CODE), 0
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


def _bracket_kinds(text: str, states: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per character (len(text),) bool each: inside call arguments, a def signature, square
    brackets (by the innermost open bracket of code)."""
    call, signature, subscript = (np.zeros(len(text), dtype=bool) for _ in range(3))
    stack: list[tuple[str, int]] = []  # (kind, position after the opener)
    for match in _BRACKETS.finditer(text):
        pos, char = match.start(), match.group()
        if states[pos] != _CODE:
            continue
        if char in "([{":
            before = text[:pos].rstrip()
            named = bool(before) and (before[-1].isalnum() or before[-1] in "_)]")
            kind = "other"
            if char == "(" and named:
                kind = "signature" if re.search(r"\bdef\s+\w+$", before) else "call"
            elif char == "[" and named:
                kind = "subscript"
            stack.append((kind, pos + 1))
        elif stack:
            kind, start = stack.pop()
            target = {"call": call, "signature": signature, "subscript": subscript}.get(kind)
            if target is not None:
                target[start:pos] = True
    for kind, start in stack:  # still open at the window's end
        target = {"call": call, "signature": signature, "subscript": subscript}.get(kind)
        if target is not None:
            target[start:] = True
    return call, signature, subscript


_OPENERS = frozenset("([{")
_DEF_LINE = re.compile(r"(?:async\s+)?(?:def|class)\s")
_CONDITION = re.compile(r"(?:el)?if\b|while\b")
# statements by their first keyword: a line kind each
_STATEMENTS = {
    "return_line": re.compile(r"(?:return|yield)\b"),
    "raise_line": re.compile(r"(?:raise|assert)\b"),
    "loop_line": re.compile(r"(?:async\s+)?(?:for|with)\b"),
    "except_line": re.compile(r"(?:try|except|finally)\b"),
}
_LINE_KINDS = (
    "decorator",
    "import_line",
    "list_item",
    "heading",
    "def_line",
    "condition",
    "assign_target",
    *_STATEMENTS,
)


def _assignment_target(line: str, states: np.ndarray) -> int:
    """Characters of ``line`` (code ``states`` per character) before its assignment's `=` (or
    `+=`...), at bracket depth 0; 0 when the line assigns nothing."""
    depth = 0
    for i, char in enumerate(line):
        if states[i] != _CODE:
            continue
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth = max(depth - 1, 0)
        elif char == "=" and not depth:
            after = line[i + 1 : i + 2]
            before = line[i - 1 : i] if i else ""
            if after == "=" or before in ("=", "!", "<", ">"):
                return 0  # a comparison; an assignment's `=` comes before any `==` on its line
            return len(line[:i].rstrip("+-*/%@&|^<>: "))
    return 0


def _line_kinds(text: str, states: np.ndarray) -> dict[str, np.ndarray]:
    """Per character (len(text),) bool: on a decorator, import, list-item, heading, def,
    condition, return, raise, loop or exception-handling line, or left of an assignment's `=`.
    The window's first line is cut, so it is of no kind."""
    out = {name: np.zeros(len(text), dtype=bool) for name in _LINE_KINDS}
    lines = [(m.start(), m.group()) for m in _LINES.finditer(text) if m.group()]
    for i, (start, line) in enumerate(lines):
        if i == 0:
            continue
        body, end = line.strip(), start + len(line)
        indent = start + len(line) - len(line.lstrip())
        if body.startswith("@"):
            out["decorator"][start:end] = True
        elif re.match(r"(?:import|from)\s+\w", body):
            out["import_line"][start:end] = True
        elif _DEF_LINE.match(body):
            out["def_line"][start:end] = True
        elif _CONDITION.match(body):
            out["condition"][start:end] = True
        elif statement := next((k for k, r in _STATEMENTS.items() if r.match(body)), None):
            out[statement][start:end] = True
        else:
            target = _assignment_target(line[indent - start :], states[indent:end])
            out["assign_target"][indent : indent + target] = True
        if _LIST_ITEM.match(line):
            out["list_item"][start:end] = True
        following = lines[i + 1][1] if i + 1 < len(lines) else ""
        if body.startswith("#") and not body.startswith("#!") and body.lstrip("#").startswith(" "):
            out["heading"][start:end] = body.lstrip("#").strip().istitle()
        if body and not _HEADING_UNDERLINE.match(line) and _HEADING_UNDERLINE.match(following):
            out["heading"][start:end] = True
    return out


def _is_prose(text: str, max_code_share: float = PROSE_MAX_CODE_CHAR_SHARE) -> bool:
    if not text or len(_LETTERS.findall(text)) < len(text) / 2:
        return False
    return len(_CODE_CHARS.findall(text)) <= max_code_share * len(text)


class _TokenShape(NamedTuple):
    lead: int  # characters of leading whitespace (the whole token when it has no visible one)
    visible: bool  # holds a non-whitespace character
    newline_in_lead: bool  # a line break before its first visible character
    ends_line: bool  # its visible part is followed by a line break and only whitespace after


@lru_cache(maxsize=1 << 17)
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


def _sentence_starts(text: str) -> np.ndarray:
    """Per character (len(text),) bool: a capital letter after a sentence's end or a blank line."""
    out = np.zeros(len(text), dtype=bool)
    for match in _SENTENCE_START.finditer(text):
        out[match.end() - 1] = True
    return out


def _line_ends(text: str, ends: np.ndarray, shapes: list[_TokenShape]) -> np.ndarray:
    """True at the last visible token of each line. (seq,) bool; the window's last line is cut,
    so its tokens end no line."""
    newlines = np.array([m.start() for m in re.finditer("\n", text)], dtype=np.int64)
    by_shape = np.fromiter((sh.ends_line for sh in shapes), dtype=bool, count=len(shapes))
    visible = np.fromiter((sh.visible for sh in shapes), dtype=bool, count=len(shapes))
    leads = np.fromiter((sh.lead for sh in shapes), dtype=np.int64, count=len(shapes))
    # The first visible character at or after a token's end is the first of a later token: each
    # visible token's first one is all that need be searched (not every character of the text).
    visibles = (np.r_[0, ends[:-1]] + leads)[visible]
    next_newline = np.append(newlines, len(text) + 1)[np.searchsorted(newlines, ends)]
    next_visible = np.append(visibles, len(text) + 2)[np.searchsorted(visibles, ends)]
    return visible & ((next_newline < next_visible) & (next_newline < len(text)) | by_shape)


def _char_before(text: str, starts: np.ndarray) -> list[str]:
    return [text[s - 1] if s else "" for s in starts]


def _is_word_char(char: str) -> bool:
    return char.isalnum() or char == "_"


def _repeats(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(seq,) bool each: a visible token whose text (leading space aside) occurred earlier in the
    window; one that, with the token before it, repeats an earlier pair (what induction heads
    copy)."""
    words = [t.strip() for t in texts]
    seen: set[str] = set()
    pairs: set[tuple[str, str]] = set()
    repeated, repeated_pair = np.zeros((2, len(texts)), dtype=bool)
    for i, word in enumerate(words):
        pair = (words[i - 1] if i else "", word)
        if word:
            repeated[i], repeated_pair[i] = word in seen, pair in pairs
        seen.add(word)
        pairs.add(pair)
    return repeated, repeated_pair


def context_masks(texts: list[str]) -> np.ndarray:
    """Which contexts hold at each token of a window, from the tokens' decoded texts.

    Returns (len(CONTEXT_NAMES), seq) bool, rows in ``CONTEXT_NAMES`` order (token classes
    included, so a window's masks hold every predicate a rule can test).
    """
    text = "".join(texts)
    seq = len(texts)
    masks = np.zeros((len(CONTEXT_NAMES), seq), dtype=bool)
    masks[:] = class_bits(texts).T
    if not text:
        return masks
    shapes = [_shape(t) for t in texts]
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=seq)  # (seq,)
    starts = np.cumsum(lengths) - lengths
    # A token's context is that of its first visible character (a leading space belongs to code).
    visible = np.fromiter((sh.visible for sh in shapes), dtype=bool, count=seq)
    leads = np.fromiter((sh.lead for sh in shapes), dtype=np.int64, count=seq)
    firsts = np.minimum(starts + np.where(visible, leads, 0), len(text) - 1)  # (seq,)
    states = _char_states(text)
    token_state = states[firsts]
    in_code = token_state == _CODE
    call, signature, subscript = _bracket_kinds(text, states)
    lines = _line_kinds(text, states)
    quoted = np.zeros(len(text), dtype=bool)
    for match in _QUOTES.finditer(text):
        quoted[match.start() + 1 : match.end() - 1] = True
    prose = _is_prose(text)
    masks[_ROW["string"]] = token_state == _STRING
    masks[_ROW["docstring"]] = token_state == _DOCSTRING
    masks[_ROW["comment"]] = token_state == _COMMENT
    masks[_ROW["line_start"]] = _line_starts(shapes)
    masks[_ROW["decorator"]] = lines["decorator"][firsts] & in_code
    masks[_ROW["signature"]] = signature[firsts] & in_code
    masks[_ROW["call_args"]] = call[firsts] & in_code
    masks[_ROW["subscript"]] = subscript[firsts] & in_code
    masks[_ROW["import_line"]] = lines["import_line"][firsts] & in_code
    masks[_ROW["code"]] = not prose
    masks[_ROW["prose"]] = prose
    masks[_ROW["sentence_start"]] = _sentence_starts(text)[firsts] & visible
    masks[_ROW["quoted"]] = quoted[firsts]
    masks[_ROW["list_item"]] = lines["list_item"][firsts]
    masks[_ROW["heading"]] = lines["heading"][firsts]
    for name in ("def_line", "condition", "assign_target", *_STATEMENTS):
        masks[_ROW[name]] = lines[name][firsts] & in_code
    masks[_ROW["line_end"]] = _line_ends(text, starts + lengths, shapes)
    before = _char_before(text, starts)
    first_chars = [t[:1] for t in texts]
    masks[_ROW["inside_word"]] = [
        _is_word_char(b) and _is_word_char(c) for b, c in zip(before, first_chars, strict=True)
    ]
    masks[_ROW["after_open"]] = [b in _OPENERS for b in before]
    masks[_ROW["repeated"]], masks[_ROW["repeated_pair"]] = _repeats(texts)
    return masks
