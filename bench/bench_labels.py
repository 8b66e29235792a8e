"""Automatic labelling speed and quality, on a synthetic store or a copy of a real one.

Synthetic: half of the features fire on a small set of tokens (1-3, with 10% noise firings
elsewhere), half fire at random; the store keeps what precompute keeps (top examples, interval
samples per bin, their contexts). Prints labelling throughput and the held-out F1 of both halves.
``--store``: label a copy of that store's SAE (``--sae``) instead and print its F1 report.
``--tune NAME=V1,V2 ...``: no labelling; for each combination of those settings of
``sae_core.labels.induction`` or ``sae_core.labels.corpus_words``, label every alive feature on
its tuning split (its training evidence split again, ``tuning_evidence``: the fitted rule, then
its corpus words, less the firings of both the tuning and the scored held-out windows) and print
the F1 distribution there: settings are chosen on this, never on the held-out tokens labels are
scored on.

Each run is timed with one process and with ``--workers`` side by side, each in a process of its
own (as ``saescope label`` runs, so none finds windows lexed by an earlier one), and prints the 1-minute
load average around it: on a shared machine the wall-clock rate is the contended one, and the CPU
seconds per feature (this process and its workers) say what the code costs.
``--against CHECKOUT``: each run is also made, interleaved, by another checkout of saescope (today's
``main``, say) in a process of its own, and the two checkouts' labels are compared: a speed-up
must write the same labels (text, precision, recall, F1, rule and held-out contexts).

    python bench/bench_labels.py [--features 2048] [--contexts 20000] [--workers 2]
    python bench/bench_labels.py --store saescope.db --sae smollm2-135m-l15-topk-4096 \
        [--against ../main]
    python bench/bench_labels.py --store saescope.db --sae ... --tune SHRINK=1,2 MAX_TERMS=1,2
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session

REPO = Path(__file__).resolve().parents[1]
if "sae_core" not in sys.modules:  # (imported by ``--against``, that checkout's is loaded)
    sys.path.insert(0, str(REPO))

from sae_core.labels import corpus_words, induction  # noqa: E402
from sae_core.labels.evidence import (  # noqa: E402
    ContextLibrary,
    FeatureEvidence,
    TokenSet,
    Vocab,
    build_evidence,
    load_examples,
    tuning_evidence,
)
from sae_core.labels.history import get_sae  # noqa: E402
from sae_core.labels.report import label_report  # noqa: E402
from sae_core.labels.run import PROMOTED, LabelOptions, label_sae  # noqa: E402
from sae_core.labels.scoring import score_rule  # noqa: E402
from sae_core.store.db import (  # noqa: E402
    FeatureRow,
    LabelRow,
    VocabRow,
    create_engine_for,
    migrate,
)
from tests.label_fixtures import add_bare_sae, add_contexts, add_examples  # noqa: E402

VOCAB = 2000
SEQ = 64
TOP_K, N_BINS, PER_BIN = 20, 4, 5  # what precompute keeps per feature, roughly


def feature_acts(tokens: np.ndarray, planted: bool, rng: np.random.Generator) -> np.ndarray:
    """(n_contexts, SEQ + 1) activations of one feature."""
    if planted:
        fires = np.isin(
            tokens, rng.choice(np.arange(1, VOCAB), size=rng.integers(1, 4), replace=False)
        )
        fires |= rng.random(tokens.shape) < 0.1 * fires.mean()
    else:
        fires = rng.random(tokens.shape) < 0.002
    fires[:, 0] = False  # BOS
    return np.where(fires, rng.uniform(0.5, 5, tokens.shape), 0).astype(np.float32)


def write_store(url: str, n_features: int, n_contexts: int, rng: np.random.Generator) -> None:
    tokens = np.concatenate(
        [np.zeros((n_contexts, 1), int), rng.integers(1, VOCAB, (n_contexts, SEQ))], axis=1
    )
    engine = create_engine_for(url)
    migrate(engine)
    with Session(engine) as session:
        sae = add_bare_sae(
            session,
            "bench",
            n_features,
            vocab_size=VOCAB,
            bos_token_id=0,
            n_tokens=tokens.size,
            status="complete",
        )
        session.execute(
            sa.insert(VocabRow),
            [{"model_id": sae.model_id, "token_id": i, "text": f" w{i}"} for i in range(VOCAB)],
        )
        used: set[int] = set()
        for f in range(n_features):
            acts = feature_acts(tokens, planted=f % 2 == 0, rng=rng)
            session.add(
                FeatureRow(
                    sae_id=sae.id, idx=f, count=int((acts > 0).sum()), max_act=float(acts.max())
                )
            )
            used |= add_examples(
                session, sae.id, f, acts, rng, top_k=TOP_K, n_bins=N_BINS, per_bin=PER_BIN
            )
        add_contexts(session, sae.id, tokens, used)
        session.commit()
    engine.dispose()


def _cpu_seconds() -> float:
    """CPU seconds used by this process and its finished children (the forked workers)."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def auto_labels(session: Session, sae_name: str) -> dict[int, list]:
    """The latest automatic label of each feature: text, precision, recall, F1 and rule (held-out
    contexts included; the method's name aside, which a new version may change)."""
    sae = get_sae(session, sae_name)
    rows = session.execute(
        sa.select(
            LabelRow.feature_idx,
            LabelRow.label,
            LabelRow.precision,
            LabelRow.recall,
            LabelRow.f1,
            LabelRow.rule,
        )
        .where(LabelRow.sae_id == sae.id, LabelRow.source == "auto")
        .order_by(LabelRow.id)
    )
    return {
        idx: [*values, {k: v for k, v in rule.items() if k != "method"}]
        for idx, *values, rule in rows
    }


def timed_label(source: str, sae: str, copy: str, workers: int) -> dict:
    """Label a fresh copy (at ``copy``) of the store at path ``source``; time it."""
    shutil.copy(source, copy)
    engine = create_engine_for(f"sqlite:///{copy}")
    load_before, cpu, start = os.getloadavg()[0], _cpu_seconds(), time.perf_counter()
    summary = label_sae(
        engine, sae, LabelOptions(embed=False, progress=False, force=True, workers=workers)
    )
    elapsed, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    with Session(engine) as session:
        report = label_report(session, get_sae(session, sae))
        f1 = dict(session.execute(sa.select(FeatureRow.idx, FeatureRow.label_f1)).all())
        labels = auto_labels(session, sae)
    engine.dispose()
    return {
        "n": summary.n_labelled,
        "elapsed": elapsed,
        "cpu": cpu,
        "load": [load_before, os.getloadavg()[0]],
        "report": report.lines(),
        "f1": f1,
        "labels": labels,
    }


def timed_label_elsewhere(checkout: str, source: str, sae: str, copy: str, workers: int) -> dict:
    """``timed_label`` by a checkout of saescope (this one, or another), in a process of its own
    that loads that checkout's ``sae_core`` before this file."""
    code = (
        f"import json, sys; sys.path.insert(0, {checkout!r}); import sae_core; "
        f"sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_labels; "
        f"print(json.dumps(bench_labels.timed_label({source!r}, {sae!r}, {copy!r}, {workers})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=checkout)
    if out.returncode:
        raise SystemExit(f"{checkout}: {out.stderr.strip().splitlines()[-1]}")
    run = json.loads(out.stdout)
    run["labels"] = {int(k): v for k, v in run["labels"].items()}
    run["f1"] = {int(k): v for k, v in run["f1"].items()}
    return run


def print_run(name: str, workers: int, run: dict) -> None:
    n, elapsed, cpu = run["n"], run["elapsed"], run["cpu"]
    print(
        f"{name}workers={workers}: {n:,} features in {elapsed:.1f} s = {n / elapsed:,.0f} "
        f"features/s; {1000 * cpu / n:.2f} CPU-ms per feature ({n / cpu:,.0f} features per "
        f"CPU-second); load {run['load'][0]:.1f} -> {run['load'][1]:.1f}"
    )


class _Tuning(NamedTuple):
    """A feature's tuning split, what its search is given, and its stored corpus words."""

    evidence: FeatureEvidence  # the training evidence split again
    promoted: tuple[str, ...]
    words: corpus_words.FeatureWords | None
    unseen: TokenSet  # the held-out tokens of both splits: the corpus words owe them nothing


def _joined(sets: list[TokenSet]) -> TokenSet:
    """Token sets of one library, end to end."""
    return TokenSet._make(
        sets[0].flags if name == "flags" else np.concatenate([getattr(s, name) for s in sets])
        for name in TokenSet._fields
    )


def _tuning_split(source: str, sae_name: str) -> tuple[Vocab, list[_Tuning]]:
    """The vocabulary, and the tuning split of every alive feature of a store's SAE."""
    engine = create_engine_for(f"sqlite:///{source}", readonly=True)
    with Session(engine) as session:
        sae = get_sae(session, sae_name)
        vocab = Vocab.load(session, sae)
        library = ContextLibrary.load(session, sae, vocab)
        features = session.execute(
            sa.select(FeatureRow.idx, FeatureRow.logit_top).where(
                FeatureRow.sae_id == sae.id, FeatureRow.count > 0
            )
        ).all()
        examples = load_examples(session, sae.id, 0, sae.d_sae)
        words = corpus_words.corpus_firings(session, sae, vocab, [idx for idx, _ in features])
    engine.dispose()
    out = []
    for idx, logit_top in features:
        evidence = tuning_evidence(library, idx, examples.get(idx, []), seed=0)
        if evidence is not None:
            scored = build_evidence(library, idx, examples[idx], seed=0)
            promoted = [vocab.texts[vocab.text_id[int(t)]] for t, _ in (logit_top or [])[:PROMOTED]]
            unseen = _joined([scored.heldout, evidence.heldout])
            out.append(_Tuning(evidence, tuple(promoted), words.get(idx), unseen))
    return vocab, out


def _listed(rule) -> bool:
    """Whether a rule is only a list of tokens (one part per term, the token itself): the labels
    the issue asks to read as phrases instead, wherever the rule has structure."""
    return all(t.tokens and t.n_parts == 1 for t in rule.terms)


_TUNABLE = (induction, corpus_words)  # the modules whose settings ``--tune`` may set


def _module_of(name: str):
    for module in _TUNABLE:
        if hasattr(module, name):
            return module
    raise SystemExit(f"--tune: neither induction nor corpus_words has a setting {name!r}")


def _distribution(f1: np.ndarray) -> str:
    return (
        f"median {np.median(f1):.3f} mean {f1.mean():.3f} F1=0 {np.mean(f1 == 0):.1%} "
        f"F1>=0.5 {np.mean(f1 >= 0.5):.1%}"
    )


def tune(source: str, sae_name: str, settings: list[str]) -> None:
    """Print the tuning split's F1 distribution under each combination of ``settings``: of the
    fitted rules alone, and of the labels (the rules with their corpus words)."""
    names = [s.split("=", 1)[0] for s in settings]
    modules = {name: _module_of(name) for name in names}
    grids = [[float(v) for v in s.split("=", 1)[1].split(",")] for s in settings]
    vocab, features = _tuning_split(source, sae_name)
    print(f"{len(features):,} features with a tuning split")
    defaults = {name: getattr(modules[name], name) for name in names}
    fits: dict[tuple, tuple[list, float]] = {}  # by the search's settings: fits, CPU-seconds
    for values in itertools.product(*grids):
        for name, value in zip(names, values, strict=True):
            setattr(modules[name], name, type(defaults[name])(value))
        searched = tuple(getattr(induction, n) for n in names if modules[n] is induction)
        if searched not in fits:  # corpus words' settings alone leave the search as it was
            cpu = time.process_time()
            fitted = induction.fit_rules(
                [f.evidence.train for f in features], vocab, [f.promoted for f in features]
            )
            fits[searched] = (fitted, time.process_time() - cpu)
        fitted, cpu = fits[searched]
        rules = [f.rule for f in fitted]
        labels = [
            corpus_words.with_corpus_words(
                fit.rule,
                corpus_words.corpus_term(f.words, f.unseen, vocab),
                f.evidence.train,
                vocab,
            )
            for fit, f in zip(fitted, features, strict=True)
        ]
        f1, label_f1 = (
            np.array(
                [
                    score_rule(r, f.evidence.heldout, vocab).f1
                    for r, f in zip(each, features, strict=True)
                ]
            )
            for each in (rules, labels)
        )
        print(
            " ".join(f"{n}={getattr(modules[n], n)}" for n in names)
            + f": rules {_distribution(f1)}; labels {_distribution(label_f1)}; token lists "
            f"{np.mean(list(map(_listed, labels))):.0%} ({1000 * cpu / len(f1):.2f} CPU-ms per fit)"
        )
    for name, value in defaults.items():
        setattr(modules[name], name, value)


def compare_f1(name: str, theirs: dict[int, list], ours: dict[int, list]) -> None:
    """The held-out F1 distributions of two checkouts' automatic labels to three decimals (the
    report rounds to two), and how many features each labels better."""
    before, after = (np.array([labels[i][3] for i in sorted(theirs)]) for labels in (theirs, ours))
    print(f"{name}: automatic labels' held-out F1 {_distribution(before)}")
    print(f"this checkout: automatic labels' held-out F1 {_distribution(after)}")
    print(
        f"F1 higher here for {np.sum(after > before):,} features, lower for "
        f"{np.sum(after < before):,}, the same for {np.sum(after == before):,}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--features", type=int, default=2048)
    parser.add_argument("--contexts", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=2, help="workers of the second run")
    parser.add_argument(
        "--store", help="an SQLite store to label a copy of, instead of a synthetic one"
    )
    parser.add_argument("--sae", default="bench", help="the SAE of --store to label")
    parser.add_argument(
        "--tune", nargs="+", metavar="NAME=V1,V2", help="settings to try on the tuning split"
    )
    parser.add_argument(
        "--against", metavar="CHECKOUT", help="also time another checkout; compare the labels"
    )
    args = parser.parse_args()
    if args.tune:
        if args.store is None:
            raise SystemExit("--tune needs --store: settings are chosen on a real SAE's evidence")
        tune(args.store, args.sae, args.tune)
        return
    with tempfile.TemporaryDirectory() as folder:
        source = args.store
        if source is None:
            source = f"{folder}/bench.db"
            write_store(
                f"sqlite:///{source}", args.features, args.contexts, np.random.default_rng(0)
            )
        runs, theirs = [], []
        for workers in dict.fromkeys([1, args.workers]):
            copy = f"{folder}/run-{workers}.db"
            if args.against:  # interleaved, so both meet the same load
                theirs.append(timed_label_elsewhere(args.against, source, args.sae, copy, workers))
                print_run(f"{args.against}: ", workers, theirs[-1])
            # each run in a process of its own, as ``saescope label`` runs: none finds the windows
            # lexed, or the compiled search loaded, by an earlier one
            runs.append(timed_label_elsewhere(str(REPO), source, args.sae, copy, workers))
            print_run("this checkout: " if args.against else "", workers, runs[-1])
    for ours, other in zip(runs, theirs, strict=False):
        same = sum(ours["labels"].get(i) == label for i, label in other["labels"].items())
        print(f"labels identical to {args.against}'s: {same:,} of {len(other['labels']):,}")
        compare_f1(args.against, other["labels"], ours["labels"])
    if theirs:
        print(f"{args.against}:", *theirs[-1]["report"], "this checkout:", sep="\n")
    print(*runs[-1]["report"], sep="\n")
    if args.store is not None:
        return
    f1 = runs[-1]["f1"]
    planted = [v for k, v in f1.items() if k % 2 == 0 and v is not None]
    random = [v for k, v in f1.items() if k % 2 == 1 and v is not None]
    print(
        f"held-out F1, planted token features: mean {np.mean(planted):.3f}, median {np.median(planted):.3f}"
    )
    print(
        f"held-out F1, random features:        mean {np.mean(random):.3f}, median {np.median(random):.3f}"
    )
    print(
        f"planted / random mean F1 ratio:      {np.mean(planted) / max(np.mean(random), 1e-9):.1f}x"
    )


if __name__ == "__main__":
    main()
