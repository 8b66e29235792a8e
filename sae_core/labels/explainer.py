"""Optional explanations from a language model behind any OpenAI-compatible chat endpoint.

Never required: without a URL nothing here runs. The model sees a feature's training examples
(never its held-out ones), the same evidence the automatic rule is made from, and answers with a
short explanation plus a rule in the same language as the automatic labels (tokens, a context or
token class, the token that follows; see ``sae_core.labels.rules``), so its explanation is scored
exactly like theirs: F1 on the held-out tokens. It is also given a detection score: the same model,
as a judge, reads the held-out windows unmarked and says from the explanation alone in which ones
the feature fires (balanced accuracy; 0.5 is chance). A server that cannot be reached or answers
with an error stops the run with one line and nothing of it is stored; a single unusable answer is
skipped, and an unusable judgement leaves the detection score empty, never zero.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import NamedTuple

from sae_core.errors import SaescopeError
from sae_core.labels.evidence import Vocab
from sae_core.labels.lexical import CONTEXTS
from sae_core.labels.rules import LabelRule, Term

MAX_EXPLANATION_CHARS = 200  # a label, not an essay: pages show it in one line


class ExplainerError(SaescopeError):
    """The explainer endpoint could not be used."""


@dataclass(frozen=True)
class ExplainerConfig:
    url: str  # base URL of the API, e.g. http://127.0.0.1:8080/v1; we POST {url}/chat/completions
    model: str  # model name the server knows
    api_key: str | None = None  # None for local servers that need no key
    timeout_s: float = 120.0  # a local model on a CPU can take a minute per answer

    @classmethod
    def from_env(
        cls, *, url: str | None = None, model: str | None = None, key_env: str | None = None
    ) -> ExplainerConfig | None:
        """Arguments first, then SAESCOPE_EXPLAINER_URL / _MODEL / the key variable (default
        SAESCOPE_EXPLAINER_KEY). None when no URL is configured: explaining is off, silently."""
        url = url or os.environ.get("SAESCOPE_EXPLAINER_URL")
        if not url:
            return None
        model = model or os.environ.get("SAESCOPE_EXPLAINER_MODEL")
        if not model:
            raise ExplainerError(
                "an explainer URL is set but no model: pass --explainer-model or set SAESCOPE_EXPLAINER_MODEL"
            )
        key_env = key_env or "SAESCOPE_EXPLAINER_KEY"
        return cls(url.rstrip("/"), model, os.environ.get(key_env) or None)

    @property
    def source(self) -> str:
        return f"llm:{self.model}"


class Explanation(NamedTuple):
    text: str
    tokens: list[str]  # token texts the model says the feature fires on
    context: str | None  # one of ``sae_core.labels.lexical.CONTEXTS``
    before: list[str] = []  # token texts that follow where it fires

    def rule(self, vocab: Vocab) -> LabelRule:
        """The explanation as a rule over the vocabulary (models often drop a token's leading
        space, so each token is taken with and without it)."""

        def texts(tokens: list[str]) -> tuple[str, ...]:
            both = [v for t in tokens for v in (t, " " + t.lstrip()) if v in vocab.index]
            return tuple(dict.fromkeys(both))

        contexts = (self.context,) if self.context else ()
        return LabelRule.of(
            Term(texts(self.tokens), following=texts(self.before), contexts=contexts)
        )


SYSTEM_PROMPT = (
    "You explain features of a sparse autoencoder trained on a language model's activations. "
    "You see text windows where the feature fires; tokens it fires on are wrapped as [[token|strength]] "
    "with strength 1-10. Answer with one JSON object and nothing else: "
    '{"explanation": "<at most 12 words>", "tokens": ["<token texts it fires on, with leading spaces '
    'as they appear, or [] for any token>"], "before": [<token texts that come right after where it '
    'fires, or []>], "context": <one of ' + ", ".join(f'"{c}"' for c in CONTEXTS) + " or null>}"
)
JUDGE_PROMPT = (
    "A feature of a language model's sparse autoencoder is explained as: {explanation}\n"
    "Below are numbered texts. In which of them does the feature fire on some token? Answer with "
    'one JSON object and nothing else: {{"fires": [<numbers of the texts where it fires>]}}'
)


def render_example(texts: list[str], acts: list[float]) -> str:
    """One window for the prompt: firing tokens marked [[text|1-10]] relative to its max."""
    peak = max(acts, default=0.0) or 1.0
    return "".join(
        f"[[{t}|{max(1, round(10 * a / peak))}]]" if a > 0 else t
        for t, a in zip(texts, acts, strict=True)
    )


def _post(config: ExplainerConfig, payload: dict) -> dict:
    headers = {"Content-Type": "application/json"}
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key}"
    request = urllib.request.Request(
        f"{config.url}/chat/completions",
        data=json.dumps(payload).encode(),
        headers=headers,
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=config.timeout_s) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        detail = err.read()[:200].decode("utf-8", "replace")
        raise ExplainerError(
            f"explainer at {config.url} answered HTTP {err.code}: {detail}; check the URL, model and key"
        ) from err
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ExplainerError(
            f"explainer at {config.url} cannot be reached ({reason}); start the server or fix --explainer-url"
        ) from err
    except json.JSONDecodeError as err:
        raise ExplainerError(
            f"explainer at {config.url} did not answer JSON; is it an OpenAI-compatible /v1 URL?"
        ) from err


def parse_explanation(reply: str) -> Explanation | None:
    """The JSON object in a model's reply, or None when there is no usable one."""
    match = re.search(r"\{.*\}", reply, flags=re.DOTALL)
    if not match:
        return None
    try:
        data = json.loads(match.group())
    except json.JSONDecodeError:
        return None
    text = data.get("explanation") if isinstance(data, dict) else None
    if not isinstance(text, str) or not text.strip():
        return None
    tokens = [t for t in data.get("tokens") or [] if isinstance(t, str) and t]
    before = [t for t in data.get("before") or [] if isinstance(t, str) and t]
    context = data.get("context") if data.get("context") in CONTEXTS else None
    return Explanation(text.strip()[:MAX_EXPLANATION_CHARS], tokens, context, before)


def _chat(config: ExplainerConfig, messages: list[dict]) -> str:
    """The model's reply to ``messages``."""
    answer = _post(config, {"model": config.model, "temperature": 0, "messages": messages})
    try:
        return answer["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError) as err:
        raise ExplainerError(
            f"explainer at {config.url} answered without choices[0].message.content; is it OpenAI-compatible?"
        ) from err


def explain(config: ExplainerConfig, examples: list[str]) -> Explanation | None:
    """Ask the model about one feature, given its rendered examples."""
    examples_text = "\n\n".join(f"Example {i + 1}: {e}" for i, e in enumerate(examples))
    return parse_explanation(
        _chat(
            config,
            [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": examples_text},
            ],
        )
    )


def parse_judgement(reply: str, n_texts: int) -> set[int] | None:
    """The 0-based indices of the texts a judge says the feature fires in; None if unusable."""
    match = re.search(r"\{.*\}", reply, flags=re.DOTALL)
    try:
        numbers = json.loads(match.group())["fires"] if match else None
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    if not isinstance(numbers, list) or not all(isinstance(n, int) for n in numbers):
        return None
    return {n - 1 for n in numbers if 1 <= n <= n_texts}


def detection_score(
    config: ExplainerConfig, explanation: str, windows: list[list[str]], fires: list[bool]
) -> float | None:
    """Balanced accuracy of the model judging, from ``explanation`` alone, which ``windows`` (token
    texts) the feature fires in (``fires``, one per window); None when its answer is unusable."""
    texts = "\n\n".join(f"Text {i + 1}: {''.join(w)}" for i, w in enumerate(windows))
    said = parse_judgement(
        _chat(
            config,
            [
                {"role": "system", "content": JUDGE_PROMPT.format(explanation=explanation)},
                {"role": "user", "content": texts},
            ],
        ),
        len(windows),
    )
    if said is None:
        return None
    rates = []
    for truth in (True, False):
        members = [i for i, f in enumerate(fires) if f == truth]
        if members:
            rates.append(sum((i in said) == truth for i in members) / len(members))
    return sum(rates) / len(rates) if rates else None
