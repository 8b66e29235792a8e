"""Corpora: text sources -> fixed-length token contexts, cached on disk.

A corpus spec (every command's ``--corpus``) is one of:

- ``default``: the Python standard library's ``.py`` sources (sorted, without test folders or
  site-packages) followed by the ``pydoc_data.topics`` entries, about 4M tokens, offline;
- ``stdlib-docs``: those ``pydoc_data.topics`` entries alone: English documentation prose, the
  default second corpus of an SAE's report card;
- a folder (every non-hidden file below it, sorted) or a glob of UTF-8 text files, or one file;
- a ``.jsonl`` file with one JSON object per line, the text under ``text_field``;
- ``hf:NAME``: the train split of a Hugging Face dataset (needs ``datasets`` and a network).

Empty and duplicate documents are dropped. The documents are tokenised and concatenated into one
stream, each followed by the tokenizer's EOS (so no text is lost and nothing is padded; a window
may therefore cross from the end of one document into the next, with the EOS marking the border),
and the stream is cut into windows of ``ctx_len`` tokens; the final partial window is dropped.
Each window gets the tokenizer's BOS at position 0 where it has one. Windows are shuffled with
``seed``; the row index of a window is its context id everywhere downstream. ``max_contexts``
keeps the first rows of that shuffled order, so a smaller corpus is a prefix of a larger one.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from sae_core.errors import SaescopeError
from sae_core.inputs.paths import cache_dir
from sae_core.inputs.subject import special_token_ids

DEFAULT_CORPUS = "default"
DOCS_CORPUS = "stdlib-docs"
# Folders of the standard library that are not its own source: tests and installed packages.
_SKIPPED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)
# Documents per tokenizer call: large enough for the fast tokenizer to batch well, small enough
# that the progress bar moves.
_TOKENIZE_BATCH = 64
_CACHE_FORMAT = 1  # bump when the on-disk layout or the windowing rule changes


class CorpusError(SaescopeError):
    """A corpus spec that names nothing usable; the message says what and how to fix it."""


@dataclass
class Contexts:
    """Fixed-length token windows of a corpus; the row index is the context id."""

    tokens: torch.Tensor  # (n_contexts, seq) int64; seq = ctx_len + 1 with BOS at 0, else ctx_len
    special_mask: torch.Tensor  # (n_contexts, seq) bool; True at BOS/EOS/special tokens
    spec: str  # the corpus spec it was built from
    # hash of spec, source files, text_field, tokenizer vocab, ctx_len, seed, max_contexts
    fingerprint: str
    text_field: str = "text"  # JSONL / datasets field the text came from
    seed: int = 0  # seed of the window shuffle
    n_documents: int = 0  # documents read, after dropping empty and duplicate ones
    # Where the rows come from: the fingerprint of the whole tokenised corpus, and the row of it
    # that is row 0 here. Subsets of one corpus (a prefix, a training split) share ``source``, so
    # an activation cache of one can serve another (sae_core.inputs.activations.find_cache).
    source: str = ""
    first_row: int = 0

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_tokens(self) -> int:
        """Tokens that count as activations (not special)."""
        return int((~self.special_mask).sum())

    def describe(self) -> dict:
        return {
            "spec": self.spec,
            "text_field": self.text_field,
            "seed": self.seed,
            "n_documents": self.n_documents,
            "n_contexts": len(self),
            "seq_len": int(self.tokens.shape[1]),
            "n_tokens": self.n_tokens,
            "fingerprint": self.fingerprint,
        }


# ---------------------------------------------------------------------------------------------
# Documents


def load_documents(spec: str, *, text_field: str = "text") -> Iterator[str]:
    """The documents a corpus spec names, in a deterministic order, without empty or duplicate ones."""
    return _unique_nonempty(_raw_documents(spec, text_field))


def _raw_documents(spec: str, text_field: str) -> Iterator[str]:
    if spec == DEFAULT_CORPUS:
        return _default_documents()
    if spec == DOCS_CORPUS:
        return _pydoc_topics()
    if spec.startswith("hf:"):
        return _hf_documents(spec[3:], text_field)
    if spec.endswith(".jsonl"):
        return _jsonl_documents(_existing(spec), text_field)
    return (_read_text(path) for path in _text_files(spec))


def _unique_nonempty(documents: Iterable[str]) -> Iterator[str]:
    seen: set[bytes] = set()
    for text in documents:
        if not text.strip():
            continue
        digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        if digest in seen:
            continue
        seen.add(digest)
        yield text


def default_corpus_files() -> list[Path]:
    """The standard library's own ``.py`` files, sorted by path relative to the stdlib folder."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [name for name in dirs if name not in _SKIPPED_DIRS]  # prune before descending
        files.extend(Path(folder, name) for name in names if name.endswith(".py"))
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


def _default_documents() -> Iterator[str]:
    for path in default_corpus_files():
        yield path.read_bytes().decode("utf-8", errors="replace")
    yield from _pydoc_topics()


def _pydoc_topics() -> Iterator[str]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name]


def _existing(spec: str) -> Path:
    path = Path(spec).expanduser()
    if not path.exists():
        raise CorpusError(
            f"no such file or folder: {path} (a corpus is 'default', a folder, a glob of text files, "
            "a .jsonl file or hf:NAME)"
        )
    return path


def _text_files(spec: str) -> list[Path]:
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True))
        files = [path for path in files if path.is_file()]
        if not files:
            raise CorpusError(f"no files match {spec!r}")
        return files
    path = _existing(spec)
    if path.is_file():
        return [path]
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise CorpusError(
            f"the folder {path} holds no files; a corpus needs at least one text file"
        )
    return files


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(
            f"{path} is not UTF-8 text (byte {err.start}); remove it or pass a glob that matches only text files"
        ) from err
    except OSError as err:
        raise CorpusError(f"cannot read the corpus file {path}: {err.strerror}") from err
    if "\x00" in text:  # valid UTF-8, but no text holds NUL: a binary file
        raise CorpusError(
            f"{path} holds NUL bytes, so it is not text; remove it or pass a glob that matches only text files"
        )
    return text


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise CorpusError(f"{path} line {number} is not valid JSON ({err.msg})") from err
            if not isinstance(record, dict) or text_field not in record:
                fields = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                raise CorpusError(
                    f"{path} line {number} has no field {text_field!r} (it has: {fields}); "
                    "pass --text-field with the field that holds the text"
                )
            text = record[text_field]
            if not isinstance(text, str):
                raise CorpusError(
                    f"{path} line {number}: field {text_field!r} is {type(text).__name__}, not text"
                )
            yield text


def _hf_documents(name: str, text_field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError as err:
        raise CorpusError(
            f"hf:{name} needs the datasets package: pip install 'saescope[datasets]'"
        ) from err
    try:
        rows = datasets.load_dataset(name, split="train", streaming=True)
        for row in rows:
            if text_field not in row:
                raise CorpusError(
                    f"dataset {name} has no field {text_field!r} (it has: {', '.join(row)}); pass --text-field"
                )
            yield row[text_field]
    except CorpusError:
        raise
    except Exception as err:  # datasets raises many types for a missing name or no network
        raise CorpusError(
            f"cannot read dataset {name!r} from the hub: {err}".splitlines()[0]
        ) from err


# ---------------------------------------------------------------------------------------------
# Contexts


def build_contexts(
    spec: str,
    tokenizer,
    *,
    text_field: str = "text",
    ctx_len: int = 64,
    seed: int = 0,
    max_contexts: int | None = None,
) -> Contexts:
    """Tokenise a corpus into shuffled fixed-length windows (cached under ``cache_dir()/corpora``)."""
    if ctx_len < 1:
        raise CorpusError(f"ctx_len must be at least 1, not {ctx_len}")
    if max_contexts is not None and max_contexts < 1:
        raise CorpusError(f"max_contexts must be at least 1, not {max_contexts}")
    key = _fingerprint(spec, text_field, tokenizer, ctx_len, seed)
    folder = cache_dir() / "corpora" / key
    if not (folder / "meta.json").is_file():
        _write_contexts(folder, _tokenize_contexts(spec, tokenizer, text_field, ctx_len, seed))
    contexts = _read_contexts(folder, spec=spec, text_field=text_field, seed=seed, fingerprint=key)
    if max_contexts is None or max_contexts >= len(contexts):
        return contexts
    return replace(
        contexts,
        tokens=contexts.tokens[:max_contexts],
        special_mask=contexts.special_mask[:max_contexts],
        fingerprint=_hash([key, max_contexts]),
    )


class _Tokenized(NamedTuple):
    """What ``_tokenize_contexts`` hands to the cache writer."""

    tokens: np.ndarray  # (n_contexts, seq) int32
    special_mask: np.ndarray  # (n_contexts, seq) bool
    n_documents: int


def _tokenize_contexts(
    spec: str, tokenizer, text_field: str, ctx_len: int, seed: int
) -> _Tokenized:
    stream, n_documents = _token_stream(
        load_documents(spec, text_field=text_field), tokenizer, spec
    )
    n_windows = len(stream) // ctx_len
    if n_windows == 0:
        raise CorpusError(
            f"corpus {spec!r} has {len(stream)} tokens, fewer than one context of {ctx_len}; "
            "add text or lower --ctx-len"
        )
    windows = stream[: n_windows * ctx_len].reshape(n_windows, ctx_len)  # (n_windows, ctx_len)
    if tokenizer.bos_token_id is not None:
        bos = np.full((n_windows, 1), tokenizer.bos_token_id, dtype=np.int32)
        windows = np.concatenate([bos, windows], axis=1)  # (n_windows, ctx_len + 1)
    order = torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed)).numpy()
    tokens = np.ascontiguousarray(windows[order])
    special_mask = np.isin(tokens, np.asarray(special_token_ids(tokenizer), dtype=np.int32))
    return _Tokenized(tokens, special_mask, n_documents)


def _token_stream(documents: Iterator[str], tokenizer, spec: str) -> tuple[np.ndarray, int]:
    """All documents' tokens, each followed by EOS, as one int32 array; and the document count."""
    separator = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    pieces: list[np.ndarray] = []
    n_documents = 0
    with tqdm(desc=f"tokenising {spec}", unit="doc", mininterval=1.0) as bar:
        while batch := list(islice(documents, _TOKENIZE_BATCH)):
            ids = tokenizer(
                batch, add_special_tokens=False, return_attention_mask=False, verbose=False
            )
            for doc_ids in ids["input_ids"]:
                pieces.append(np.asarray(doc_ids + separator, dtype=np.int32))
            n_documents += len(batch)
            bar.update(len(batch))
    if n_documents == 0:
        raise CorpusError(f"corpus {spec!r} has no non-empty documents")
    return np.concatenate(pieces), n_documents


def _write_contexts(folder: Path, tokenized: _Tokenized) -> None:
    """Write the arrays into a temporary folder and rename it into place (atomic)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is as readable as any folder
    try:
        np.save(staging / "tokens.npy", tokenized.tokens)
        np.save(staging / "special_mask.npy", tokenized.special_mask)
        meta = {"format": _CACHE_FORMAT, "n_documents": tokenized.n_documents}
        (staging / "meta.json").write_text(json.dumps(meta))
        try:
            os.replace(staging, folder)
        except OSError:
            if not (folder / "meta.json").is_file():  # not a concurrent writer finishing first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _read_contexts(
    folder: Path, *, spec: str, text_field: str, seed: int, fingerprint: str
) -> Contexts:
    meta = json.loads((folder / "meta.json").read_text())
    return Contexts(
        tokens=torch.from_numpy(np.load(folder / "tokens.npy")).long(),
        special_mask=torch.from_numpy(np.load(folder / "special_mask.npy")),
        spec=spec,
        fingerprint=fingerprint,
        text_field=text_field,
        seed=seed,
        n_documents=int(meta["n_documents"]),
        source=fingerprint,
    )


def _fingerprint(spec: str, text_field: str, tokenizer, ctx_len: int, seed: int) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    tokenizer_key = [
        vocab,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        special_token_ids(tokenizer),
    ]
    return _hash(
        [_CACHE_FORMAT, spec, _source_signature(spec), text_field, tokenizer_key, ctx_len, seed]
    )


def _source_signature(spec: str) -> list:
    """What tells a changed source from an unchanged one: file paths, sizes and mtimes."""
    if spec.startswith("hf:"):
        return [spec]
    if spec == DOCS_CORPUS:
        return [sys.version]
    if spec == DEFAULT_CORPUS:
        files, extra = default_corpus_files(), [sys.version]
    elif spec.endswith(".jsonl"):
        files, extra = [_existing(spec)], []
    else:
        files, extra = _text_files(spec), []
    stats = [(str(path), path.stat().st_size, path.stat().st_mtime_ns) for path in files]
    return [stats, extra]


def _hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:32]


# ---------------------------------------------------------------------------------------------
# Training's split: the contexts it may read, and those held out for evaluation


class Split(NamedTuple):
    train: Contexts  # the contexts training may read
    held_out: Contexts  # the last contexts of the corpus, never trained on


def held_out_split(contexts: Contexts, n_eval: int) -> Split:
    """The last min(n_eval, 20%) contexts are held out; training and `evaluate` agree on them."""
    n_eval = min(n_eval, len(contexts) // 5)
    if n_eval == 0:
        raise CorpusError(f"the corpus {contexts.spec!r} has only {len(contexts)} contexts; it needs at least 5")
    n_train = len(contexts) - n_eval
    return Split(context_rows(contexts, 0, n_train, "train"), context_rows(contexts, n_train, len(contexts), "heldout"))


def context_rows(contexts: Contexts, begin: int, end: int, tag: str) -> Contexts:
    """Rows [begin, end) of ``contexts``, fingerprinted as such (activation caches are named by it)."""
    return dataclasses.replace(
        contexts,
        tokens=contexts.tokens[begin:end],
        special_mask=contexts.special_mask[begin:end],
        fingerprint=f"{contexts.fingerprint}-{tag}{begin}-{end}",
        first_row=contexts.first_row + begin,
    )
