"""The language of labels: a rule a machine can apply to every token, and the phrase it reads as.

A rule is a short decision list: it says "the feature fires on this token" when any of its terms
holds. A term holds when all of its parts do:
- ``tokens``: the token's text is one of these (empty: any token);
- ``previous``: the token right before it is one of these;
- ``following``: the token right after it is one of these (what the feature predicts comes next);
- ``window``: one of these occurs among the ``WINDOW`` tokens before it;
- ``contexts``: the token sits in each of these contexts or is of these classes
  (``sae_core.labels.lexical.CONTEXTS``: in a docstring, inside call arguments, a number...);
- ``unless``: ...and it is in none of these contexts (an exception).

``describe`` renders a rule as a phrase, e.g. ``` `if`/`elif` at the start of a line ``` or
``any token in a docstring, a few tokens after `Returns` ``, and ``parse_label`` reads such a
phrase back, so a researcher can write a label in the same language and have it scored. In a
phrase, ``` `x` ``` stands for the token ``x`` with or without its leading space (as a person
writes it); a token that is only whitespace is written quoted, as ``"\\n"``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sae_core.labels.lexical import CONTEXTS, LOCATIONS, TOKEN_CLASSES

WINDOW = 6  # tokens before a token that a window part looks at: about a short clause


def _check_contexts(names: tuple[str, ...]) -> None:
    for name in names:
        if name not in CONTEXTS:
            raise ValueError(f"unknown context {name!r}; one of {', '.join(CONTEXTS)}")


@dataclass(frozen=True)
class Term:
    tokens: tuple[str, ...] = ()
    previous: tuple[str, ...] = ()
    following: tuple[str, ...] = ()
    window: tuple[str, ...] = ()
    contexts: tuple[str, ...] = ()
    unless: tuple[str, ...] = ()

    def __post_init__(self):
        _check_contexts(self.contexts + self.unless)

    @property
    def n_parts(self) -> int:
        return (
            sum(map(bool, (self.tokens, self.previous, self.following, self.window)))
            + len(self.contexts)
            + len(self.unless)
        )

    @property
    def n_keys(self) -> int:
        return len(self.tokens) + len(self.previous) + len(self.following) + len(self.window)

    def to_json(self) -> dict:
        return {
            "tokens": list(self.tokens),
            "previous": list(self.previous),
            "following": list(self.following),
            "window": list(self.window),
            "contexts": list(self.contexts),
            "unless": list(self.unless),
        }

    @classmethod
    def from_json(cls, data: dict) -> Term:
        """Also reads the single-term rules of earlier versions (one ``context`` or none)."""
        contexts = data.get("contexts") or ([data["context"]] if data.get("context") else [])
        return cls(
            *(tuple(data.get(key) or ()) for key in ("tokens", "previous", "following", "window")),
            tuple(contexts),
            tuple(data.get("unless") or ()),
        )

    def describe(self, max_shown: int) -> str:
        classes = [c for c in self.contexts if c in TOKEN_CLASSES]
        where = [LOCATIONS[c] for c in self.contexts if c in LOCATIONS]
        if self.tokens:
            subject = token_list(self.tokens, max_shown)
            where = [TOKEN_CLASSES[c] for c in classes] + where  # rare: tokens and a class
        elif classes:
            subject = " ".join(
                [TOKEN_CLASSES[classes[0]]] + [f"({TOKEN_CLASSES[c]})" for c in classes[1:]]
            )
        else:
            subject = "any token"
        parts = [subject] + where
        if self.previous:
            parts.append(f"right after {token_list(self.previous, max_shown)}")
        if self.following:
            parts.append(f"before {token_list(self.following, max_shown)}")
        if self.window:
            parts.append(f"a few tokens after {token_list(self.window, max_shown)}")
        if self.unless:
            parts.append("except " + " or ".join(CONTEXTS[c] for c in self.unless))
        return " ".join(parts)


@dataclass(frozen=True)
class LabelRule:
    terms: tuple[Term, ...] = field(default_factory=lambda: (Term(),))

    @classmethod
    def of(cls, *terms: Term) -> LabelRule:
        return cls(tuple(terms))

    @property
    def n_parts(self) -> int:
        return sum(t.n_parts for t in self.terms)

    def to_json(self) -> dict:
        return {"terms": [t.to_json() for t in self.terms]}

    @classmethod
    def from_json(cls, data: dict) -> LabelRule:
        if "terms" in data:
            return cls(tuple(Term.from_json(t) for t in data["terms"]))
        return cls((Term.from_json(data),))

    def describe(self, *, max_shown: int = 4) -> str:
        """The label, e.g. ``` `if`/`elif`/`while` at the start of a line ``` or
        ``` `)` in a def signature; or any token right after `def` ```."""
        if not self.terms:
            return "no token"
        return "; or ".join(t.describe(max_shown) for t in self.terms)


# ---------------------------------------------------------------------------------------------
# Token lists in phrases


def _quote(text: str) -> str:
    return (
        '"'
        + text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace('"', '\\"')
        + '"'
    )


def written_word(text: str) -> str | None:
    """The word a phrase writes a token as, ``x`` in ```x```: its text without leading spaces,
    when that is visible text a backtick can hold; None for tokens written quoted."""
    word = text.lstrip(" ")
    if word and word.strip() == word and "`" not in word and "\\" not in word:
        return word
    return None


def _shown(text: str) -> str:
    """```x``` for a token with visible text (with or without its leading space), else quoted."""
    word = written_word(text)
    return _quote(text) if word is None else f"`{word}`"


def token_list(texts: tuple[str, ...], max_shown: int = 4) -> str:
    """Tokens as a phrase writes them: ```if`/`elif` and 3 more``."""
    shown = list(dict.fromkeys(_shown(t) for t in texts))
    more = len(shown) - max_shown
    listed = "/".join(shown[:max_shown])
    return f"{listed} and {more} more" if more > 0 else listed


_TOKEN = r'`[^`]+`|"(?:[^"\\]|\\.)*"'
_TOKEN_LIST = rf"(?:{_TOKEN})(?:/(?:{_TOKEN}))*"
_UNESCAPE = {"n": "\n", "t": "\t", '"': '"', "\\": "\\"}


def _parse_tokens(text: str) -> tuple[str, ...]:
    out: list[str] = []
    for token in re.findall(_TOKEN, text):
        if token.startswith("`"):
            out += [token[1:-1], " " + token[1:-1]]
        else:
            out.append(
                re.sub(r"\\(.)", lambda m: _UNESCAPE.get(m.group(1), m.group(1)), token[1:-1])
            )
    return tuple(dict.fromkeys(out))


def _alternation(phrases) -> str:
    return "|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True))


_CLASS_BY_PHRASE = {phrase: name for name, phrase in TOKEN_CLASSES.items()}
_LOCATION_BY_PHRASE = {phrase: name for name, phrase in LOCATIONS.items()}
_CONTEXT_BY_PHRASE = {phrase: name for name, phrase in CONTEXTS.items()}
_CONTEXT_PHRASE = re.compile(_alternation(_CONTEXT_BY_PHRASE))
_SUBJECT = re.compile(
    rf"\s*(?:(?P<tokens>{_TOKEN_LIST})|(?P<any>any token)|(?P<cls>{_alternation(_CLASS_BY_PHRASE)}))"
)
_PART = re.compile(
    rf"\s+(?:(?P<location>{_alternation(_LOCATION_BY_PHRASE)})"
    rf"|\((?P<cls>{_alternation(_CLASS_BY_PHRASE)})\)"
    rf"|(?P<cls_bare>{_alternation(_CLASS_BY_PHRASE)})"
    rf"|right after (?P<previous>{_TOKEN_LIST})"
    rf"|before (?P<following>{_TOKEN_LIST})"
    rf"|a few tokens after (?P<window>{_TOKEN_LIST})"
    rf"|except (?P<unless>(?:{_alternation(_CONTEXT_BY_PHRASE)})(?: or (?:{_alternation(_CONTEXT_BY_PHRASE)}))*))"
)


def _parse_term(text: str) -> Term | None:
    match = _SUBJECT.match(text)
    if match is None:
        return None
    parts: dict[str, tuple[str, ...]] = {"contexts": ()}
    if match.group("tokens"):
        parts["tokens"] = _parse_tokens(match.group("tokens"))
    elif match.group("cls"):
        parts["contexts"] = (_CLASS_BY_PHRASE[match.group("cls")],)
    pos = match.end()
    while pos < len(text.rstrip()):
        part = _PART.match(text, pos)
        if part is None:
            return None
        found = {k: v for k, v in part.groupdict().items() if v is not None}
        ((key, value),) = found.items()
        if key == "location":
            parts["contexts"] += (_LOCATION_BY_PHRASE[value],)
        elif key in ("cls", "cls_bare"):
            parts["contexts"] += (_CLASS_BY_PHRASE[value],)
        elif key == "unless":
            # phrases may hold " or " themselves ("inside quotes or backticks")
            phrases = _CONTEXT_PHRASE.findall(value)
            parts["unless"] = tuple(_CONTEXT_BY_PHRASE[p] for p in phrases)
        else:
            parts[key] = _parse_tokens(value)
        pos = part.end()
    return Term(**parts)


def parse_label(text: str) -> LabelRule | None:
    """The rule a label written in the rule language states (``describe``'s output with every
    token listed, e.g. ``` `Paris`/`Lyon` in English prose ```); None for free text."""
    terms = [_parse_term(t) for t in text.strip().split("; or ")]
    if not terms or any(t is None or t == Term() for t in terms):
        return None
    return LabelRule(tuple(terms))
