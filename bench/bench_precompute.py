"""Benchmark: the whole `saescope precompute` command against the bare forward pass, side by side.

On SmolLM2-135M layer 15 and the default corpus, the same tokens for every side, each side in a
fresh process (as a user runs it):

- bare forward: the subject to layer 15 over the contexts and nothing else (model load and corpus
  excluded), before the commands and again after them (the mean: other load on the machine drifts);
- one SAE: ``saescope precompute --sae <TopK, 4,096 wide>``, the whole command from its first line
  (model load, the pass, results, writes, and labels, on by default as in the command);
- a release: ``saescope precompute`` over three TopK SAEs (1,024 / 4,096 / 16,384 wide) on layer 15.

For each command: tokens per second against the bare forward's, wall time and CPU-seconds split
into load (everything else), forward (the subject), SAE (encoding, accumulators, spill,
checkpoints, co-firing), tail (per-SAE results, pass 2, writes, families, the VACUUM) and labels (their worker
processes' CPU included); the peak resident memory of the precompute (labels excluded; the model's
share is the bare forward's peak) and of the whole command; the resident memory after 25, 50, 75
and 100% of the pass, which shows how memory grows with the tokens; the store's bytes per feature.

Targets (issue 17): the command >= 0.8x the bare forward's tokens/s, one SAE and the release;
peak <= 1.2 GB (1,144 MiB) for one 4,096-wide SAE at 100k tokens, growing sub-linearly with the tokens.

Random-init SAEs (the default) understate the tail and the labels: pass trained ones (``--sae``,
``--release``; the demo's, say). With the demo release's layer-15 SAEs at 100k tokens, on a fast
day (bare forward 1,866 tokens/s): one SAE 0.66x with labels (20 s of them, most of it the label
embeddings) and 0.88x without; the release 0.22x and 0.35x (tail 61 s, labels 88 s for 18k
features). On a slow one (2 December, bare forward 1,071 tokens/s), after the compiled rule
search: one SAE 0.60x with labels and 0.78x without; its labels took 35 s, of which the rules
3.7 s and the label embeddings 30 s. Later that day (bare forward 997 tokens/s), once the label
embeddings read labels without their token markup and checkpoints stopped listing the dense
co-activation counts: 0.76x with labels (22.5 s of them) and 0.92x without; peak 1,281 MiB. A
rerun with the whitespace tokens named too: 0.65x (labels 21.4 s) and 0.77x, the bare forward
itself moving 93.0 -> 82.9 s between its two runs; peak 1,267 MiB. Since 3 December the
command's labels leave the label vectors of semantic search to `saescope serve` (MiniLM was 15 of
their ~20 s): on a slow day (bare forward 929-1,030 tokens/s), two runs gave 0.77x and 0.82x with
labels (5.0 and 5.2 s of them) against 0.81x (19.5 s) just before the change, the bare forward's
own drift within a run being as large (94.7 / 99.6 s and 105.1 / 110.1 s); peaks 1,173 and 1,210 MiB.
Later on 3 December, with the sparse counters merging their sorted buffer into the table (bare forward
866 tokens/s): 0.83x with labels (6.2 s of them), 0.87x without; peak 1,171 MiB.
Later still, once the CLI stopped importing the labels (and numba, ~55 MB resident) to build
its parser (bare forward 1,043 tokens/s, its own peak 950 MiB): 0.89x with labels (5.6 s of
them), 0.94x without; peak 1,119 MiB in precompute and with labels, flat through the pass
(1,083 / 1,076 / 1,068 / 1,084 MiB at a quarter, half, three quarters and the end).
The demo's release (1k/4k/16k, trained) the same evening, families on as in the command (bare
forward 1,012 tokens/s): 0.33x with labels, 0.36x without (SAE 61.9 s, tail 84.8 s with the
family links and map, labels 24.0 s); peak 3,110 MiB.

    python bench/bench_precompute.py [--tokens 100000] [--no-label] [--sae FOLDER] [--release FOLDER ...]
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.util
import math
import multiprocessing
import os
import resource
import sqlite3
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple

from bench_release import block_macs

MODEL, LAYER, CTX_LEN = "smollm2-135m", 15, 64
WIDTHS = (1024, 4096, 16384)
PASS_MARKS = (0.25, 0.5, 0.75, 1.0)  # fractions of the pass at which resident memory is reported


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=100_000, help="corpus tokens for every side")
    parser.add_argument("--batch-size", type=int, default=32, help="contexts per forward pass")
    parser.add_argument("--sae", default=None, help="the one SAE (default: random-init TopK, 4,096 wide, k = 32)")
    parser.add_argument("--release", nargs="+", default=None, help="the release's SAE folders (default: random-init TopK 1k/4k/16k)")
    parser.add_argument("--label", action=argparse.BooleanOptionalAction, default=True, help="the command's labelling (default: on, as in the command)")
    parser.add_argument("--only", choices=("one", "release"), help="run one of the two commands")
    return parser.parse_args()


def random_sae(folder: Path, width: int) -> str:
    """Anthropic/OpenAI init: unit decoder rows, W_enc = W_dec^T."""
    import torch

    from sae_core.saes.sae import SAE, SAEConfig

    torch.manual_seed(width)
    sae = SAE(SAEConfig(d_in=576, d_sae=width, architecture="topk", k=32, model_name=MODEL, layer=LAYER))
    sae.W_dec.data = torch.nn.functional.normalize(torch.randn(width, 576), dim=1)
    sae.W_enc.data = sae.W_dec.data.T.clone()
    return str(sae.save(folder / f"topk-{width}"))


def sae_widths(paths: list[str]) -> list[int]:
    from sae_core.saes.formats import load_sae

    return [load_sae(path).d_sae for path in paths]


class Clock(NamedTuple):
    wall: float
    cpu: float  # this process, all its threads, plus its waited-for children


def now() -> Clock:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return Clock(time.perf_counter(), time.process_time() + children.ru_utime + children.ru_stime)


def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Phases:
    """Adds up the wall time and CPU-seconds spent inside wrapped functions, per phase; tracks the
    peak resident memory (sampled) and the memory at marks of the pass."""

    def __init__(self, total_batches: int):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.total_batches = total_batches
        self.batches = 0
        self.pass_rss: dict[float, float] = {}
        self.peak = 0.0
        self.peak_before_labels = 0.0
        self.labelling = False
        self._active = False  # a phase is running: nested wrapped calls are not counted twice
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = rss_mib()
            self.peak = max(self.peak, rss)
            if not self.labelling:
                self.peak_before_labels = max(self.peak_before_labels, rss)
            self._stop.wait(0.05)

    def stop(self) -> None:
        self._stop.set()

    def wrap(self, owner, name: str, phase: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            if self._active:
                return original(*args, **kwargs)
            self._active = True
            self.labelling = phase == "labels"
            start = now()
            try:
                return original(*args, **kwargs)
            finally:
                end = now()
                self.wall[phase] = self.wall.get(phase, 0.0) + end.wall - start.wall
                self.cpu[phase] = self.cpu.get(phase, 0.0) + end.cpu - start.cpu
                self._active = False
                if phase == "forward":
                    self._count_batch()

        setattr(owner, name, timed)

    def _count_batch(self) -> None:
        self.batches += 1
        for mark in PASS_MARKS:
            if mark not in self.pass_rss and self.batches >= mark * self.total_batches:
                self.pass_rss[mark] = rss_mib()


class WrapLabelsOnImport(importlib.abc.MetaPathFinder):
    """Times ``label_sae`` once the command imports the labels, without importing them first:
    they bring numba (~55 MB resident), which the command imports only to label, after its pass,
    and which the pass's peak must not count. The import itself counts as labelling."""

    NAME = "sae_core.labels.run"

    def __init__(self, phases: Phases):
        self.phases = phases

    def find_spec(self, name, path=None, target=None):
        if name != self.NAME:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run_module, phases = spec.loader.exec_module, self.phases

        def exec_module(module):
            phases.labelling = True
            run_module(module)
            phases.wrap(module, "label_sae", "labels")

        spec.loader.exec_module = exec_module
        return spec


class Measured(NamedTuple):
    n_tokens: int
    wall: float
    cpu: float
    phase_wall: dict[str, float]
    phase_cpu: dict[str, float]
    peak_precompute_mib: float
    peak_mib: float
    pass_rss: dict[float, float]
    load: tuple[float, float]  # 1-minute load average at start and end
    store_bytes_per_feature: float


def in_child(work, *args):
    """``work(*args)`` in a fresh process, as a separate command would run (not a daemon: the
    command's labelling starts worker processes of its own)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(work, *args).result()


def bare_forward(tokens: int, batch_size: int) -> Measured:
    import torch  # noqa: F401

    from sae_core.inputs.activations import iter_layer_activations
    from sae_core.inputs.corpus import build_contexts
    from sae_core.inputs.subject import load_subject

    subject = load_subject(MODEL)
    subject.drop_blocks_after(LAYER)  # as precompute does: the blocks past the layer are never run
    contexts = build_contexts("default", subject.tokenizer, ctx_len=CTX_LEN, max_contexts=math.ceil(tokens / CTX_LEN))
    load = os.getloadavg()[0]
    start = now()
    for _ in iter_layer_activations(subject, [LAYER], contexts, batch_size=batch_size, progress=False):
        pass
    end = now()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    wall, cpu = end.wall - start.wall, end.cpu - start.cpu
    return Measured(contexts.n_tokens, wall, cpu, {"forward": wall}, {"forward": cpu}, peak, peak, {}, (load, os.getloadavg()[0]), 0.0)


def command(sae_paths: list[str], db_path: str, tokens: int, batch_size: int, label: bool) -> Measured:
    """``saescope precompute`` through the CLI's own entry point, with its phases timed."""
    import sae_core.precompute.encode as encode
    import sae_core.precompute.run as run
    from sae_core.cli import main
    from sae_core.inputs.subject import Subject
    from sae_core.precompute.checkpoint import ResumeFiles
    from sae_core.precompute.spill import SpillWriter
    from sae_core.precompute.stats import StreamingStats

    phases = Phases(total_batches=math.ceil(math.ceil(tokens / CTX_LEN) / batch_size))
    phases.wrap(Subject, "forward_to_layers", "forward")
    for owner, name in ((encode, "encode_batch"), (StreamingStats, "update"), (SpillWriter, "append"), (ResumeFiles, "save")):
        phases.wrap(owner, name, "SAE")
    phases.wrap(run.Feed, "update", "SAE")  # co-firing across the SAEs of a layer, inside the pass
    for name in ("finish", "publish_feeds", "run_families", "reclaim_space"):  # reclaim_space: the store's one VACUUM
        phases.wrap(run, name, "tail")
    sys.meta_path.insert(0, WrapLabelsOnImport(phases))
    argv = ["precompute", "--db", f"sqlite:///{db_path}", "--tokens", str(tokens), "--batch-size", str(batch_size), "--model", MODEL]
    argv += [arg for path in sae_paths for arg in ("--sae", path)] + ([] if label else ["--no-label"])
    load = os.getloadavg()[0]
    start = now()
    code = main(argv)
    end = now()
    phases.stop()
    if code:
        raise SystemExit(f"saescope precompute exited with {code}")
    n_tokens, n_features, store_bytes = store_size(db_path)
    wall, cpu = end.wall - start.wall, end.cpu - start.cpu
    phases.wall["load"] = wall - sum(phases.wall.values())
    phases.cpu["load"] = cpu - sum(phases.cpu.values())
    return Measured(
        n_tokens, wall, cpu, phases.wall, phases.cpu, phases.peak_before_labels, max(phases.peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        phases.pass_rss, (load, os.getloadavg()[0]), store_bytes / max(n_features, 1),
    )  # fmt: skip


def store_size(db_path: str) -> tuple[int, int, int]:
    """Tokens of the first SAE, features of all, and the store's bytes less the shared vocabulary."""
    with sqlite3.connect(db_path) as conn:
        n_tokens, n_features = conn.execute("select min(n_tokens), sum(d_sae) from saes").fetchone()
        sizes = dict(conn.execute("select name, sum(pgsize) from dbstat group by name").fetchall())
    return n_tokens, n_features, sum(size for name, size in sizes.items() if "vocab" not in name)


def ceiling(widths: list[int], per_block: int) -> float:
    """The best ratio to the bare forward the multiply-adds per token allow: the subject's blocks
    to the layer against those and every SAE's encoder (d x width); the tail, labels and load
    are left out, so the command can only come in under it."""
    forward = (LAYER + 1) * per_block
    return forward / (forward + sum(576 * width for width in widths))


def report(title: str, measured: Measured, bare_tok_s: float, best: float) -> None:
    tok_s = measured.n_tokens / measured.wall
    print(f"\n{title}: {measured.n_tokens} tokens, load {measured.load[0]:.1f}..{measured.load[1]:.1f}")
    print(f"  whole command : {tok_s:7.0f} tok/s, {measured.wall:6.1f} s wall, {measured.cpu:6.1f} CPU-s: "
          f"{tok_s / bare_tok_s:.2f}x the bare forward (target >= 0.8x; ceiling {best:.2f}x from multiply-adds "
          "per token, the tail and labels left out)")  # fmt: skip
    for phase in ("load", "forward", "SAE", "tail", "labels"):
        if phase in measured.phase_wall:
            print(f"    {phase:8s} {measured.phase_wall[phase]:7.1f} s wall {measured.phase_cpu[phase]:7.1f} CPU-s "
                  f"({measured.phase_cpu[phase] / measured.cpu:4.0%} of the CPU)")  # fmt: skip
    no_labels = measured.wall - measured.phase_wall.get("labels", 0.0)
    print(f"  without labels: {measured.n_tokens / no_labels:7.0f} tok/s, {(measured.n_tokens / no_labels) / bare_tok_s:.2f}x the bare forward")
    marks = ", ".join(f"{mark:.0%} {rss:.0f}" for mark, rss in sorted(measured.pass_rss.items()))
    print(f"  memory: peak {measured.peak_precompute_mib:.0f} MiB in precompute, {measured.peak_mib:.0f} MiB with labels; "
          f"resident through the pass (MiB): {marks}")  # fmt: skip
    print(f"  store: {measured.store_bytes_per_feature / 1024:.1f} KiB per feature")


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        one = [args.sae or in_child(random_sae, tmp, 4096)]
        release = args.release or [in_child(random_sae, tmp, width) for width in WIDTHS]
        print(f"{os.cpu_count()} CPUs; {MODEL} layer {LAYER}; {args.tokens} tokens in batches of {args.batch_size} x {CTX_LEN}; "
              f"labels {'on' if args.label else 'off'}")  # fmt: skip
        before = in_child(bare_forward, args.tokens, args.batch_size)
        runs, widths = {}, {}
        if args.only != "release":
            runs["one SAE (4,096)"] = in_child(command, one, str(tmp / "one.db"), args.tokens, args.batch_size, args.label)
            widths["one SAE (4,096)"] = in_child(sae_widths, one)
        if args.only != "one":
            runs["release (1k, 4k, 16k)"] = in_child(command, release, str(tmp / "release.db"), args.tokens, args.batch_size, args.label)
            widths["release (1k, 4k, 16k)"] = in_child(sae_widths, release)
        after = in_child(bare_forward, args.tokens, args.batch_size)
    bare_wall = (before.wall + after.wall) / 2
    bare_tok_s = before.n_tokens / bare_wall
    print(f"\nbare forward: {bare_tok_s:7.0f} tok/s (mean of {before.wall:.1f} s, load {before.load[0]:.1f}, and {after.wall:.1f} s, "
          f"load {after.load[0]:.1f}); {before.cpu:.1f} and {after.cpu:.1f} CPU-s; peak {max(before.peak_mib, after.peak_mib):.0f} MiB "
          "(the model's share)")  # fmt: skip
    per_block = in_child(block_macs)
    for title, measured in runs.items():
        report(title, measured, bare_tok_s, ceiling(widths[title], per_block))


if __name__ == "__main__":
    main()
