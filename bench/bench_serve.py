"""Serving benchmark: `saescope serve` over a 16k-feature store, SQLite and Postgres side by side.

A synthetic store of realistic size (16,384 features, 20 top examples + 5 bins x 5 interval
samples of 65 tokens each, a 49k vocabulary with a token index) is built by code into SQLite and
into a scratch Postgres schema. For each, the server runs on loopback and 32 concurrent clients
replay a researcher's mix of requests (feature pages, the feature JSON, label and token search,
as-you-type fragments, example and preview fragments, SAE pages, family pages and the feature
map's JSON) for a bounded time. The 16k SAE is the largest of a release with a 1k and a 4k SAE
on its hook (as the demo's), with 5 links per feature into each other SAE and a map of all
21,504 features, so the family page and the map JSON are timed at the demo's size:

- paced: each client waits a random think time (exponential, mean --think s) between requests,
  i.e. 32 researchers clicking fast; this is the latency a user sees (target p99 <= 50 ms);
- saturated: no think time, to find the throughput ceiling (latency then is queueing).

--mixed adds the run that asks whether anything can stall the pages: the same paced page
clients, first alone, then while live prompts (SmolLM2-135M, a 16k-latent random SAE on layer
15) and new semantic searches of ~170 characters arrive as fast as the server takes them, each
from a few more clients than its queue holds. A 503 is a refusal (the queue was full, as designed),
counted apart from errors. It reports page p99 mixed / pages-only (target <= 2x, 0 errors).

Server CPU is read from /proc (the server's processes only). Per kind it is measured with one
request at a time, so it is what each kind costs, free of queueing and of the other processes;
the 1-minute load average at the start of each run says how busy the shared machine was.

Run from the repository root:  python bench/bench_serve.py [--duration 20] [--workers 2] [--mixed]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sae_core.store.db import SaeRow, create_engine_for  # noqa: E402
from sae_core.store.families import FeatureLinkRow, FeatureMapRow, mark_mapped  # noqa: E402
from sae_core.store.releases import join_release  # noqa: E402
from tests.app.server_process import server_processes, serving  # noqa: E402
from tests.app.synthetic_store import StoreSpec, build_synthetic_store  # noqa: E402

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
SPEC = StoreSpec(
    sae_name="bench-16k",
    n_features=16384,
    vocab_size=49152,  # SmolLM2's vocabulary size
    n_contexts=100_000,
    token_index_size=8,
)
LABEL_WORDS = [
    "capital",
    "cities",
    "python",
    "function",
    "definitions",
    "indentation",
    "loops",
    "quotes",
    "return",
]
TOKENS = [" Paris", "Paris", " w100", " w2000", " nothing-like-this"]
RELEASE = "bench-release"
SMALLER_WIDTHS = (1024, 4096)  # the release's other SAEs on the 16k SAE's hook, as the demo's
LINKS_PER_SAE = 5  # each feature's top 5 in each other SAE, as precompute stores them


@dataclass(frozen=True)
class Request:
    kind: str
    path: str


# A researcher's mix of requests, in percent.
MIX = {
    "feature page": 30,
    "feature json": 15,
    "label search": 15,
    "token search": 10,
    "typing fragment": 10,
    "examples fragment": 5,
    "preview fragment": 5,
    "sae page": 5,
    "family page": 3,
    "map json": 2,
}


def next_request(rng: random.Random, sae: str) -> Request:
    """One request of the ``MIX``."""
    index = rng.randrange(SPEC.n_features)
    word = rng.choice(LABEL_WORDS)
    page = min(
        int(rng.expovariate(0.5)), SPEC.n_features // 50 - 1
    )  # readers mostly stay on the first pages
    paths = {  # the random draws in this order, so that a seed replays the same requests
        "feature page": f"/saes/{sae}/features/{index}",
        "feature json": f"/api/v1/saes/{sae}/features/{index}",
        "label search": f"/api/v1/saes/{sae}/features?q={word}"
        f"&sort={rng.choice(['relevance', 'density'])}",
        "token search": f"/api/v1/saes/{sae}/features?token={rng.choice(TOKENS)}",
        "typing fragment": f"/saes/{sae}/-/fragments/features?q={word[: rng.randint(2, len(word))]}",
        "examples fragment": f"/saes/{sae}/-/fragments/features/{index}/examples?offset=10",
        "preview fragment": f"/saes/{sae}/-/fragments/features/{index}/preview",
        "sae page": f"/saes/{sae}?offset={page * 50}"
        f"&sort={rng.choice(['index', 'max_act', 'density'])}",
        "family page": f"/saes/{sae}/features/{index}/family",
        "map json": f"/api/v1/releases/{RELEASE}/map",
    }
    kind = rng.choices(list(MIX), weights=list(MIX.values()))[0]
    return Request(kind, paths[kind])


@dataclass
class LoadResult:
    seconds: float
    latencies: dict[str, list[float]] = field(default_factory=dict)  # kind -> seconds
    errors: int = 0
    refused: dict[str, int] = field(default_factory=dict)  # kind -> 503s (a full queue)
    failures: dict[str, int] = field(default_factory=dict)  # "kind status" -> errors, to say which
    server_cpu: float = 0.0  # seconds of CPU the server processes spent during the run
    load: float = 0.0  # the machine's 1-minute load average when the run started

    @property
    def all_latencies(self) -> list[float]:
        return [t for times in self.latencies.values() for t in times]

    @property
    def page_latencies(self) -> list[float]:
        return [t for kind in MIX for t in self.latencies.get(kind, [])]

    @property
    def requests(self) -> int:
        return len(self.all_latencies) + self.errors


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return (
        statistics.quantiles(values, n=1000, method="inclusive")[int(q * 10) - 1]
        if len(values) > 1
        else values[0]
    )


async def one_client(
    client: httpx.AsyncClient,
    seed: int,
    sae: str,
    deadline: float,
    think: float,
    result: LoadResult,
):
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        if think:
            await asyncio.sleep(rng.expovariate(1 / think))
        request = next_request(rng, sae)
        start = time.perf_counter()
        try:
            status = (await client.get(request.path)).status_code
        except httpx.HTTPError as err:
            status = type(err).__name__
        if status == 200:
            result.latencies.setdefault(request.kind, []).append(time.perf_counter() - start)
        else:
            result.errors += 1
            failure = f"{request.kind} {status}"
            result.failures[failure] = result.failures.get(failure, 0) + 1


async def run_load(
    base: str, *, clients: int, seconds: float, think: float, seed: int
) -> LoadResult:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:
        result = LoadResult(seconds)
        deadline = time.monotonic() + seconds
        await asyncio.gather(
            *(
                one_client(client, seed * 1000 + i, SPEC.sae_name, deadline, think, result)
                for i in range(clients)
            )
        )
    return result


# The mixed run's pressure: what a live prompt and a semantic search send.
LIVE_TEXT = (
    'def read_config(path):\n    """Read the settings file at path and return them as a '
    'dictionary, with defaults for every key the file leaves out."""\n    with open(path) as '
    "handle:\n        return {**DEFAULTS, **json.load(handle)}\n"
)
SEMANTIC_QUERY = (
    "features that fire on the names of capital cities and the countries they belong to, in "
    "prose and in code comments, like Paris and France or Berlin and Germany, query"
)  # within the server's 200-character limit; each request adds a number, so none is a cache hit
QUERY_NUMBERS = itertools.count()


async def pressing_client(
    client: httpx.AsyncClient, kind: str, path: str, deadline: float, result: LoadResult
) -> None:
    """Send ``kind`` back to back until ``deadline``; a 503 (queue full) waits a moment. Each
    semantic query is new (numbered), so each is embedded: the cache would otherwise answer."""
    while time.monotonic() < deadline:
        start = time.perf_counter()
        try:
            if kind == "live prompt":
                response = await client.post(path, json={"text": LIVE_TEXT})
            else:
                query = f"{SEMANTIC_QUERY} {next(QUERY_NUMBERS)}"
                response = await client.get(path, params={"q": query})
            status = response.status_code
        except httpx.HTTPError as err:
            status = type(err).__name__
        if status == 200:
            result.latencies.setdefault(kind, []).append(time.perf_counter() - start)
        elif status == 503:
            result.refused[kind] = result.refused.get(kind, 0) + 1
            await asyncio.sleep(0.2)
        else:
            result.errors += 1
            failure = f"{kind} {status}"
            result.failures[failure] = result.failures.get(failure, 0) + 1


async def run_mixed(
    base: str, *, clients: int, seconds: float, think: float, seed: int, live: int, semantic: int
) -> LoadResult:
    """``run_load``'s page clients, with ``live`` clients pressing live prompts and ``semantic``
    pressing semantic searches, over the same ``seconds``."""
    sae = SPEC.sae_name
    total = clients + live + semantic
    limits = httpx.Limits(max_connections=total, max_keepalive_connections=total)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:
        result = LoadResult(seconds)
        deadline = time.monotonic() + seconds
        pressure = [("live prompt", f"/api/v1/saes/{sae}/activations")] * live + [
            ("semantic search", f"/api/v1/saes/{sae}/search")
        ] * semantic
        await asyncio.gather(
            *(
                one_client(client, seed * 1000 + i, sae, deadline, think, result)
                for i in range(clients)
            ),
            *(pressing_client(client, kind, path, deadline, result) for kind, path in pressure),
        )
    return result


def make_live(url: str, folder: Path) -> None:
    """Point the store's SAE at a random 16k-latent TopK SAE for SmolLM2-135M's layer 15, and give
    every feature a label embedding, so live prompts and semantic search do real work."""
    import numpy as np

    from sae_core.labels.embeddings import EMBED_DIM, EMBED_MODEL, pack_vector
    from sae_core.store.db import FeatureEmbeddingRow, FeatureRow, SaeRow
    from tests.live_support import random_sae

    random_sae(576, d_sae=SPEC.n_features, architecture="topk", k=32, layer=15).save(folder / "sae")
    rng = np.random.default_rng(0)
    engine = create_engine_for(url)
    with engine.begin() as conn:
        # the release's 16k SAE is the one live prompts and semantic searches press on
        sae_id = conn.scalar(sa.select(SaeRow.id).where(SaeRow.d_sae == SPEC.n_features))
        conn.execute(
            sa.update(SaeRow)
            .where(SaeRow.id == sae_id)
            .values(path=str(folder / "sae"), layer=15, d_in=576, hook_name="model.layers.15")
        )
        labels = conn.execute(sa.select(FeatureRow.idx, FeatureRow.label).where(FeatureRow.sae_id == sae_id)).all()
        vectors = rng.standard_normal((len(labels), EMBED_DIM)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        conn.execute(
            sa.insert(FeatureEmbeddingRow),
            [
                dict(
                    sae_id=sae_id,
                    feature_idx=idx,
                    kind="auto",
                    text=label or f"feature {idx}",
                    model=EMBED_MODEL,
                    vector=pack_vector(vector),
                )
                for (idx, label), vector in zip(labels, vectors, strict=True)
            ],
        )
    engine.dispose()


async def models_loaded(base: str, connections: int, timeout_s: float = 600) -> None:
    """Until a live prompt and a semantic search have been answered on each of ``connections``
    connections: the live model and each web worker's query model load after the server answers
    pages (tens of seconds on a busy machine), and a run measured before would time them out."""

    async def answered(kind: str, path: str) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:  # a connection of its own
            while time.monotonic() < deadline:
                if kind == "live prompt":
                    response = await client.post(path, json={"text": LIVE_TEXT})
                else:
                    response = await client.get(path, params={"q": f"{SEMANTIC_QUERY} warm"})
                if response.status_code == 200:
                    return
                await asyncio.sleep(1)
        raise RuntimeError(f"no {kind} answered within {timeout_s:.0f} s")

    deadline = time.monotonic() + timeout_s
    sae = SPEC.sae_name
    await asyncio.gather(
        *(answered("live prompt", f"/api/v1/saes/{sae}/activations") for _ in range(connections)),
        *(answered("semantic search", f"/api/v1/saes/{sae}/search") for _ in range(connections)),
    )


def measure_mixed(url: str, args: argparse.Namespace) -> dict[str, LoadResult]:
    """Pages alone, then pages under live and semantic pressure, on one live server."""
    load = {"clients": args.clients, "seconds": args.duration, "think": args.think}
    flags = ("--workers", str(args.workers), "--live", "--model", "smollm2-135m")
    with serving(url, *flags, timeout=300) as base:
        asyncio.run(run_load(base, clients=args.clients, seconds=3, think=0, seed=99))
        asyncio.run(models_loaded(base, connections=2 * args.workers))
        return {
            "pages only": asyncio.run(measured_load(base, **load, seed=1)),
            "mixed": asyncio.run(
                measured_mixed(
                    base, **load, seed=1, live=args.live_clients, semantic=args.semantic_clients
                )
            ),
        }


async def measured_mixed(base: str, **load) -> LoadResult:
    started_at = os.getloadavg()[0]
    result = await run_mixed(base, **load)
    result.load = started_at
    return result


def print_mixed(results: dict[str, dict[str, LoadResult]], args: argparse.Namespace) -> None:
    print(
        f"\nmixed: {args.clients} paced page clients (think ~ exp, mean {args.think} s), "
        f"{args.duration:.0f} s per run; with {args.live_clients} live-prompt and "
        f"{args.semantic_clients} semantic-search clients pressing; latency in ms"
    )
    for backend, runs in results.items():
        alone, mixed = runs["pages only"], runs["mixed"]
        print(f"\n{backend}" + "".join(f"{name:>18}" for name in runs))
        rows = {
            "load average at start": lambda r: f"{r.load:.2f}",
            "page requests": lambda r: f"{len(r.page_latencies)}",
            "page p50": lambda r: f"{percentile(r.page_latencies, 50) * 1e3:.1f}",
            "page p99": lambda r: f"{percentile(r.page_latencies, 99) * 1e3:.1f}",
            "errors": lambda r: f"{r.errors}",
            "live prompts answered": lambda r: f"{len(r.latencies.get('live prompt', []))}",
            "live prompts refused (503)": lambda r: f"{r.refused.get('live prompt', 0)}",
            "live prompt p50": lambda r: (
                f"{percentile(r.latencies.get('live prompt', []), 50) * 1e3:.0f}"
            ),
            "semantic answered": lambda r: f"{len(r.latencies.get('semantic search', []))}",
            "semantic refused (503)": lambda r: f"{r.refused.get('semantic search', 0)}",
            "semantic p50": lambda r: (
                f"{percentile(r.latencies.get('semantic search', []), 50) * 1e3:.0f}"
            ),
        }
        for name, cell in rows.items():
            print(f"  {name:30}" + "".join(f"{cell(r):>18}" for r in runs.values()))
        for failure, count in sorted(mixed.failures.items()):
            print(f"  error: {failure} x{count}")
        ratio = percentile(mixed.page_latencies, 99) / percentile(alone.page_latencies, 99)
        verdict = "within" if ratio <= 2 and mixed.errors == 0 else "NOT within"
        print(
            f"  page p99 mixed / pages only: {ratio:.2f}x ({verdict} the 2x target, {mixed.errors} errors)"
        )


def server_cpu_seconds(port: int) -> float:
    """User + system CPU time of the `saescope serve --port PORT` process and its workers, from
    Linux's /proc: a figure the other processes on a shared machine cannot inflate."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in server_processes(port):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # it ended while we looked
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


async def measured_load(base: str, **load) -> LoadResult:
    port = int(base.rsplit(":", 1)[1])
    started_at = os.getloadavg()[0]
    before = server_cpu_seconds(port)
    result = await run_load(base, **load)
    result.server_cpu = server_cpu_seconds(port) - before
    result.load = started_at
    return result


def cpu_by_kind(base: str, per_kind: int) -> dict[str, float]:
    """Server CPU seconds per request of each kind, sending one request at a time."""
    port = int(base.rsplit(":", 1)[1])
    rng = random.Random(7)
    paths: dict[str, list[str]] = {}
    while len(paths) < len(MIX) or min(len(p) for p in paths.values()) < per_kind:
        request = next_request(rng, SPEC.sae_name)
        paths.setdefault(request.kind, []).append(request.path)
    costs = {}
    with httpx.Client(base_url=base, timeout=30) as client:
        for kind, kind_paths in sorted(paths.items()):
            before = server_cpu_seconds(port)
            for path in kind_paths[:per_kind]:
                client.get(path).raise_for_status()
            costs[kind] = (server_cpu_seconds(port) - before) / per_kind
    return costs


def build_release(engine: sa.Engine) -> None:
    """Put the 16k SAE into a release with a 1k and a 4k SAE on its hook, with random family links
    (each feature's ``LINKS_PER_SAE`` in each other SAE, cosine falling from ~0.9) and a random
    map of every feature: the family page and the map JSON then read what the demo's hold."""
    with engine.connect() as conn:
        model_id = conn.scalar(sa.select(SaeRow.model_id).where(SaeRow.name == SPEC.sae_name))
    for width in SMALLER_WIDTHS:
        spec = dataclasses.replace(
            SPEC,
            sae_name=f"bench-{width // 1024}k",
            n_features=width,
            n_contexts=10_000,
            token_index_size=0,
        )
        build_synthetic_store(engine, spec, model_id=model_id)
    rng = np.random.default_rng(0)
    with engine.begin() as conn:
        saes = conn.execute(
            sa.select(SaeRow.id, SaeRow.d_sae).where(SaeRow.model_id == model_id)
        ).all()
        for sae in saes:
            join_release(conn, sae.id, RELEASE)
        for sae in saes:
            xy = rng.uniform(0, 1, (sae.d_sae, 2))
            conn.execute(
                sa.insert(FeatureMapRow),
                [
                    dict(sae_id=sae.id, feature_idx=i, x=float(x), y=float(y))
                    for i, (x, y) in enumerate(xy)
                ],
            )
            mark_mapped(conn, [sae.id])
            for other in saes:
                if other.id == sae.id:
                    continue
                targets = rng.integers(0, other.d_sae, (sae.d_sae, LINKS_PER_SAE))
                cosines = np.sort(rng.uniform(0.1, 0.95, (sae.d_sae, LINKS_PER_SAE)))[:, ::-1]
                fired = rng.integers(50, 500, (sae.d_sae, LINKS_PER_SAE, 2))
                conn.execute(
                    sa.insert(FeatureLinkRow),
                    [
                        dict(
                            sae_id=sae.id,
                            feature_idx=i,
                            other_sae_id=other.id,
                            other_idx=int(targets[i, j]),
                            cosine=float(cosines[i, j]),
                            n_both=int(fired[i, j].min() // 2),
                            n_self=int(fired[i, j, 0]),
                            n_other=int(fired[i, j, 1]),
                        )
                        for i in range(sae.d_sae)
                        for j in range(LINKS_PER_SAE)
                        if j == 0 or targets[i, j] not in targets[i, :j]
                    ],
                )


def build_sqlite(folder: Path) -> str:
    url = f"sqlite:///{folder / 'bench.db'}"
    engine = create_engine_for(url)
    build_synthetic_store(engine, SPEC)
    build_release(engine)
    engine.dispose()
    return url


def build_postgres(pg_url: str, schema: str) -> str:
    admin = sa.create_engine(pg_url)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    admin.dispose()
    url = f"{pg_url}?options=-csearch_path%3D{schema}"
    engine = create_engine_for(url)
    build_synthetic_store(engine, SPEC)
    build_release(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE")
    engine.dispose()
    return url


def drop_postgres(pg_url: str, schema: str) -> None:
    admin = sa.create_engine(pg_url)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    admin.dispose()


@dataclass
class BackendResult:
    runs: dict[str, LoadResult]  # "paced", "saturated"
    cpu_by_kind: dict[str, float]  # kind -> server CPU seconds per request, one at a time


def measure(url: str, args: argparse.Namespace) -> BackendResult:
    load = {"clients": args.clients, "seconds": args.duration}
    with serving(url, "--workers", str(args.workers)) as base:
        asyncio.run(
            run_load(base, clients=args.clients, seconds=3, think=0, seed=99)
        )  # warm caches
        return BackendResult(
            runs={
                "paced": asyncio.run(measured_load(base, **load, think=args.think, seed=1)),
                "saturated": asyncio.run(measured_load(base, **load, think=0, seed=2)),
            },
            cpu_by_kind=cpu_by_kind(base, args.per_kind),
        )


def print_report(backend_results: dict[str, BackendResult], args: argparse.Namespace) -> None:
    results = {backend: result.runs for backend, result in backend_results.items()}
    backends = list(results)
    print(
        f"\n{args.clients} clients, {args.duration:.0f} s per run, {args.workers} server worker(s), "
        f"{SPEC.n_features} features; latency in ms"
    )
    header = f"{'':34}" + "".join(f"{b:>22}" for b in backends)
    for mode in ("paced", "saturated"):
        print(
            f"\n{mode}"
            + (
                f" (think time ~ exp, mean {args.think} s)"
                if mode == "paced"
                else " (no think time)"
            )
        )
        print(header)
        rows = {
            "load average at start": lambda r: f"{r.load:.2f}",
            "requests/s": lambda r: f"{r.requests / r.seconds:.1f}",
            "p50": lambda r: f"{percentile(r.all_latencies, 50) * 1e3:.1f}",
            "p99": lambda r: f"{percentile(r.all_latencies, 99) * 1e3:.1f}",
            "errors": lambda r: f"{r.errors} / {r.requests}",
            "server CPU ms / request": lambda r: f"{r.server_cpu / max(r.requests, 1) * 1e3:.1f}",
        }
        for name, cell in rows.items():
            print(f"  {name:32}" + "".join(f"{cell(results[b][mode]):>22}" for b in backends))
        kinds = sorted({k for b in backends for k in results[b][mode].latencies})
        for kind in kinds:
            cells = []
            for b in backends:
                times = results[b][mode].latencies.get(kind, [])
                cells.append(
                    f"{percentile(times, 50) * 1e3:.1f} / {percentile(times, 99) * 1e3:.1f}"
                )
            print(f"  {kind + ' p50 / p99':32}" + "".join(f"{c:>22}" for c in cells))
    print(f"\nserver CPU ms / request, by kind ({args.per_kind} requests each, one at a time)")
    print(header)
    kinds = sorted({k for b in backends for k in backend_results[b].cpu_by_kind})
    for kind in kinds:
        cells = [
            f"{backend_results[b].cpu_by_kind.get(kind, float('nan')) * 1e3:.1f}" for b in backends
        ]
        print(f"  {kind:32}" + "".join(f"{c:>22}" for c in cells))
    weighted = [
        sum(MIX[k] * cpu for k, cpu in backend_results[b].cpu_by_kind.items()) / sum(MIX.values())
        for b in backends
    ]
    print(f"  {'the mix, weighted':32}" + "".join(f"{w * 1e3:>22.1f}" for w in weighted))
    if len(backends) == 2:
        a, b = (results[x]["paced"] for x in backends)
        ratio = percentile(b.all_latencies, 99) / percentile(a.all_latencies, 99)
        print(f"\npaced p99, {backends[1]} / {backends[0]}: {ratio:.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=20, help="seconds per measured run")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument(
        "--think", type=float, default=1.0, help="mean think time of a paced client (s)"
    )
    parser.add_argument("--workers", type=int, default=2, help="server processes (2 cores here)")
    parser.add_argument(
        "--per-kind", type=int, default=50, help="requests of each kind for the CPU-by-kind table"
    )
    parser.add_argument("--pg", default=PG_URL, help="PostgreSQL URL ('' to skip Postgres)")
    parser.add_argument(
        "--mixed", action="store_true", help="only the mixed run: pages alone, then under pressure"
    )
    parser.add_argument(
        "--live-clients", type=int, default=6, help="live prompts pressing (queue of 4 + 1 running)"
    )
    parser.add_argument(
        "--semantic-clients", type=int, default=6, help="semantic searches pressing"
    )
    args = parser.parse_args()
    if args.mixed:
        return run_mixed_bench(args)

    results: dict[str, BackendResult] = {}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as folder:
        started = time.perf_counter()
        sqlite_url = build_sqlite(Path(folder))
        print(f"built the SQLite store in {time.perf_counter() - started:.0f} s", flush=True)
        results["SQLite"] = measure(sqlite_url, args)
    if args.pg:
        schema = f"bench_serve_{uuid.uuid4().hex[:8]}"
        try:
            started = time.perf_counter()
            pg_url = build_postgres(args.pg, schema)
            print(f"built the Postgres store in {time.perf_counter() - started:.0f} s", flush=True)
            results["Postgres"] = measure(pg_url, args)
        finally:
            drop_postgres(args.pg, schema)
    print_report(results, args)
    return 0


def run_mixed_bench(args: argparse.Namespace) -> int:
    results: dict[str, dict[str, LoadResult]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as folder:
        url = build_sqlite(Path(folder))
        make_live(url, Path(folder))
        results["SQLite"] = measure_mixed(url, args)
        if args.pg:
            schema = f"bench_serve_{uuid.uuid4().hex[:8]}"
            try:
                pg_url = build_postgres(args.pg, schema)
                make_live(pg_url, Path(folder))
                results["Postgres"] = measure_mixed(pg_url, args)
            finally:
                drop_postgres(args.pg, schema)
    print_mixed(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
