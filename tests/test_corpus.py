"""Corpus specs -> documents -> shuffled fixed-length contexts, and the errors a user can cause."""

from __future__ import annotations

import json
import sys
import sysconfig
from itertools import islice
from pathlib import Path

import pytest
import torch

from sae_core.errors import SaescopeError
from sae_core.inputs import corpus as corpus_module
from sae_core.inputs.corpus import (
    Contexts,
    CorpusError,
    build_contexts,
    default_corpus_files,
    load_documents,
)
from tests.tiny import TRAIN_TEXT, make_tokenizer

DOCS = [
    "def add(a, b):\n    return a + b\n" * 3,
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France.",
    "import os\nimport sys\nprint('hello world')\n" * 2,
]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def text_folder(tmp_path) -> Path:
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text(DOCS[1])
    (folder / "a.txt").write_text(DOCS[0])
    (folder / "sub" / "c.md").write_text(DOCS[2])
    (folder / "empty.txt").write_text("  \n\t")
    (folder / "duplicate.txt").write_text(DOCS[0])
    (folder / ".hidden").write_text("never read")
    return folder


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def _stream(tokenizer, docs: list[str]) -> list[int]:
    """What the corpus promises: every document's tokens followed by EOS, in order."""
    out: list[int] = []
    for doc in docs:
        out += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return out


# ---------------------------------------------------------------------------------------------
# documents


def test_folder_documents_are_sorted_without_empty_duplicate_or_hidden_files(text_folder):
    # sorted paths: a.txt, b.txt, duplicate.txt (dropped), empty.txt (dropped), sub/c.md
    assert list(load_documents(str(text_folder))) == [DOCS[0], DOCS[1], DOCS[2]]


def test_glob_and_single_file(text_folder):
    assert list(load_documents(str(text_folder / "*.txt"))) == [DOCS[0], DOCS[1]]
    assert list(load_documents(str(text_folder / "**" / "*.md"))) == [DOCS[2]]
    assert list(load_documents(str(text_folder / "b.txt"))) == [DOCS[1]]


def test_jsonl_reads_the_named_field_and_skips_blank_lines(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(
        json.dumps({"body": DOCS[0], "id": 1})
        + "\n\n"
        + json.dumps({"body": DOCS[1], "id": 2})
        + "\n"
        + json.dumps({"body": DOCS[0], "id": 3})
        + "\n"
    )
    assert list(load_documents(str(path), text_field="body")) == [DOCS[0], DOCS[1]]


def test_default_corpus_is_the_stdlib_without_tests_plus_pydoc_topics():
    from pydoc_data.topics import topics

    files = default_corpus_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    relative = [f.relative_to(root).as_posix() for f in files]
    assert relative == sorted(relative)
    assert "json/__init__.py" in relative and "os.py" in relative
    assert not any(
        part in {"test", "tests", "idle_test", "site-packages"}
        for f in relative
        for part in f.split("/")
    )
    first = next(load_documents("default"))
    assert first == next(f.read_text() for f in files if f.read_text().strip())
    assert list(load_documents("default"))[-1] == topics[sorted(topics)[-1]]


# ---------------------------------------------------------------------------------------------
# contexts


def test_contexts_are_bos_plus_windows_of_the_document_stream(text_folder, tokenizer):
    contexts = build_contexts(str(text_folder), tokenizer, ctx_len=8)
    stream = _stream(tokenizer, DOCS)
    n = len(stream) // 8
    assert contexts.tokens.shape == (n, 9) and contexts.tokens.dtype == torch.int64
    assert (contexts.tokens[:, 0] == tokenizer.bos_token_id).all()
    windows = sorted(tuple(stream[i * 8 : (i + 1) * 8]) for i in range(n))
    assert sorted(tuple(row) for row in contexts.tokens[:, 1:].tolist()) == windows
    special = (contexts.tokens == tokenizer.bos_token_id) | (
        contexts.tokens == tokenizer.eos_token_id
    )
    assert torch.equal(contexts.special_mask, special)
    assert contexts.special_mask[:, 0].all() and contexts.special_mask[:, 1:].any()
    assert contexts.describe() == {
        "spec": str(text_folder),
        "text_field": "text",
        "seed": 0,
        "n_documents": 3,
        "n_contexts": n,
        "seq_len": 9,
        "n_tokens": int((~special).sum()),
        "fingerprint": contexts.fingerprint,
    }


def test_a_tokenizer_without_bos_gives_bare_windows(text_folder):
    tokenizer = make_tokenizer()
    tokenizer.bos_token = None
    contexts = build_contexts(str(text_folder), tokenizer, ctx_len=8)
    assert contexts.tokens.shape == (len(_stream(tokenizer, DOCS)) // 8, 8)


def test_shuffle_is_deterministic_by_seed(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in TRAIN_TEXT])
    first = build_contexts(str(path), tokenizer, ctx_len=4, seed=1)
    (corpus_module.cache_dir() / "corpora").rename(tmp_path / "moved")  # force a rebuild
    again = build_contexts(str(path), tokenizer, ctx_len=4, seed=1)
    other = build_contexts(str(path), tokenizer, ctx_len=4, seed=2)
    assert torch.equal(first.tokens, again.tokens) and first.fingerprint == again.fingerprint
    assert not torch.equal(first.tokens, other.tokens) and first.fingerprint != other.fingerprint
    assert sorted(first.tokens.tolist()) == sorted(other.tokens.tolist())


def test_max_contexts_is_a_prefix_with_its_own_fingerprint(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in TRAIN_TEXT])
    full = build_contexts(str(path), tokenizer, ctx_len=4)
    head = build_contexts(str(path), tokenizer, ctx_len=4, max_contexts=5)
    assert isinstance(head, Contexts) and len(head) == 5
    assert torch.equal(head.tokens, full.tokens[:5])
    assert torch.equal(head.special_mask, full.special_mask[:5])
    assert head.fingerprint != full.fingerprint


def test_contexts_are_cached_until_the_source_changes(tmp_path, tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in TRAIN_TEXT])
    built = build_contexts(str(path), tokenizer, ctx_len=4)
    folder = corpus_module.cache_dir() / "corpora" / built.fingerprint
    assert sorted(p.name for p in folder.iterdir()) == [
        "meta.json",
        "special_mask.npy",
        "tokens.npy",
    ]

    def no_tokenizing(*_args):
        raise AssertionError("tokenised again although the cache was valid")

    monkeypatch.setattr(corpus_module, "_token_stream", no_tokenizing)
    assert torch.equal(build_contexts(str(path), tokenizer, ctx_len=4).tokens, built.tokens)
    write_jsonl(path, [{"text": t} for t in TRAIN_TEXT[:3]])
    with pytest.raises(AssertionError, match="tokenised again"):
        build_contexts(str(path), tokenizer, ctx_len=4)


# ---------------------------------------------------------------------------------------------
# errors a user can cause


def test_missing_path(tmp_path, tokenizer):
    with pytest.raises(CorpusError, match=r"no such file or folder: .*nowhere.*'default'"):
        build_contexts(str(tmp_path / "nowhere"), tokenizer)
    with pytest.raises(CorpusError, match="no such file or folder"):
        build_contexts(str(tmp_path / "nowhere.jsonl"), tokenizer)
    with pytest.raises(CorpusError, match="no files match"):
        build_contexts(str(tmp_path / "*.txt"), tokenizer)


def test_empty_corpus(tmp_path, tokenizer):
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(CorpusError, match="has no non-empty documents"):
        build_contexts(str(tmp_path), tokenizer)
    (tmp_path / "short.txt").write_text("hi")
    with pytest.raises(CorpusError, match="fewer than one context of 64"):
        build_contexts(str(tmp_path), tokenizer)
    empty = tmp_path / "nothing"
    empty.mkdir()
    with pytest.raises(CorpusError, match="holds no files"):
        build_contexts(str(empty), tokenizer)


def test_jsonl_without_the_field_names_the_line(tmp_path, tokenizer):
    path = write_jsonl(
        tmp_path / "docs.jsonl", [{"text": "fine"}, {"text": "also fine"}, {"body": "oops"}]
    )
    with pytest.raises(
        CorpusError,
        match=r"docs.jsonl line 3 has no field 'text' \(it has: body\); pass --text-field",
    ):
        build_contexts(str(path), tokenizer)


def test_jsonl_with_a_broken_line(tmp_path, tokenizer):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(CorpusError, match="docs.jsonl line 2 is not valid JSON"):
        list(load_documents(str(path)))


def test_binary_file_in_a_folder(tmp_path, tokenizer):
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(CorpusError, match="image.png is not UTF-8 text"):
        build_contexts(str(tmp_path), tokenizer)


def test_hf_without_datasets_installed(tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(
        CorpusError, match=r"hf:someone/corpus needs the datasets package: pip install"
    ):
        list(islice(load_documents("hf:someone/corpus"), 1))


def test_bad_sizes(text_folder, tokenizer):
    with pytest.raises(CorpusError, match="ctx_len must be at least 1"):
        build_contexts(str(text_folder), tokenizer, ctx_len=0)
    with pytest.raises(CorpusError, match="max_contexts must be at least 1"):
        build_contexts(str(text_folder), tokenizer, max_contexts=0)
    assert issubclass(CorpusError, SaescopeError)
