"""Scaling out: 1 vs 2 processes side by side, for precompute, training and serving.

- precompute: `saescope precompute` of a random TopK SAE (8 x 576 latents, k = 32) on SmolLM2-135M
  layer 15 over --tokens tokens of the default corpus; wall time of the whole job, model loading
  included; the stores are compared row for row;
- training: `fit` on --train-steps batches of 4,096 random 576-d activations (width 4,608, k = 32),
  timed inside the job after a warm-up run;
  both as one process with torch's default threads (2 here), one process with one thread, and
  `torchrun --nproc-per-node 2` with gloo (torchrun gives each rank one thread);
- serving: `saescope serve --workers 1` vs `--workers 2` over a synthetic Postgres store, 32
  concurrent clients without think time (feature pages, feature JSON, label search) for
  --serve-seconds each: requests per second and latency percentiles;
- live beside pages: one web worker with live on over a store precomputed for the random SAE,
  the model on a thread of the web process (uvicorn serving the app directly) vs in its own
  process (`saescope serve --live`); feature-page latency of 8 clients alone, then while 2
  clients keep posting 60-token prompts.

Every process of every run shares the same 2 CPU cores (and, on the team machine, other people's
jobs): the ratios say how much the second process buys on this box, not on a real cluster.

Run from the repository root:  python bench/bench_scale.py [--tokens 8192] [--train-steps 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import sqlalchemy as sa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sae_core.inputs import distributed  # noqa: E402
from sae_core.saes.sae import SAE, SAEConfig  # noqa: E402
from sae_core.saes.train_config import TrainConfig  # noqa: E402
from sae_core.saes.train_data import TensorSource  # noqa: E402
from sae_core.saes.train_loop import fit  # noqa: E402
from sae_core.store.db import create_engine_for  # noqa: E402
from tests.app.server_process import free_port, running, serving  # noqa: E402
from tests.app.synthetic_store import StoreSpec, build_synthetic_store  # noqa: E402

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
D_MODEL, WIDTH, K, BATCH = 576, 4608, 32, 4096
SERVE_SPEC = StoreSpec(sae_name="scale-4k", n_features=4096, vocab_size=49152, n_contexts=20_000, token_index_size=4)


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", *args]


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # what torchrun gives each rank


def timed(command: list[str], env: dict | None = None) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command[:6])}... failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# Precompute


def random_sae(folder: Path) -> Path:
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=D_MODEL, d_sae=WIDTH, architecture="topk", k=K, model_name="smollm2-135m", layer=15))
    sae.W_enc.data.normal_(std=D_MODEL**-0.5)
    sae.W_dec.data = torch.nn.functional.normalize(torch.randn(WIDTH, D_MODEL), dim=1)
    sae.save(folder / "sae")
    return folder / "sae"


def bench_precompute(tokens: int, folder: Path) -> None:
    from tests.test_precompute import dump

    sae = random_sae(folder)
    args = ["-m", "sae_core", "precompute", "--sae", str(sae), "--tokens", str(tokens), "--batch-size", "16"]
    dbs = {name: f"sqlite:///{folder / name}.db" for name in ("warm", "threads", "thread", "ranks")}
    timed([sys.executable, "-m", "sae_core", "precompute", "--sae", str(sae), "--tokens", "64", "--db", dbs["warm"]])  # caches
    seconds = {
        "1 process x 2 threads": timed([sys.executable, *args, "--db", dbs["threads"]]),
        "1 process x 1 thread": timed([sys.executable, *args, "--db", dbs["thread"]], env=ONE_THREAD),
        "2 ranks x 1 thread": timed(torchrun(*args, "--db", dbs["ranks"])),
    }
    same = dump(dbs["thread"]) == dump(dbs["ranks"]) == dump(dbs["threads"])
    report("precompute", {name: tokens / s for name, s in seconds.items()})
    print(f"precompute  stores written by all three are identical: {same}")


def report(section: str, rates: dict[str, float]) -> None:
    """Tokens/s of each variant and its ratio to the 2-rank run."""
    ranks = rates["2 ranks x 1 thread"]
    for name, rate in rates.items():
        print(f"{section:<11} {name:<22} {rate:7.0f} tok/s   2 ranks / this: {ranks / rate:.2f}x")


# ---------------------------------------------------------------------------------------------
# Training


def train_worker(steps: int, folder: Path) -> None:
    """Inside the job (1 process or a torchrun rank): time `fit` after one warm-up step."""
    with distributed.session() as me:
        x = torch.randn(BATCH * (steps + 1), D_MODEL, generator=torch.Generator().manual_seed(0))
        cfg = TrainConfig(width=WIDTH, k=K, batch_size=BATCH, tokens=BATCH, checkpoint_every=10_000)
        fit(TensorSource(x), cfg, folder / f"warm{me.size}", progress=False)
        distributed.barrier("warm-up")
        start = time.perf_counter()
        cfg = TrainConfig(width=WIDTH, k=K, batch_size=BATCH, tokens=BATCH * steps, checkpoint_every=10_000)
        fit(TensorSource(x), cfg, folder / f"run{me.size}", progress=False)
        if me.is_main:
            print(BATCH * steps / (time.perf_counter() - start))


def bench_train(steps: int, folder: Path) -> None:
    def rate(variant: str, launch: list[str], env: dict | None = None) -> float:
        worker = [str(Path(__file__).resolve()), "--train-worker", str(folder / variant), "--train-steps", str(steps)]
        done = subprocess.run([*launch, *worker], capture_output=True, text=True, check=True, env=env)
        return float(done.stdout.split()[-1])

    report(
        "training",
        {
            "1 process x 2 threads": rate("threads", [sys.executable]),
            "1 process x 1 thread": rate("thread", [sys.executable], env=ONE_THREAD),
            "2 ranks x 1 thread": rate("ranks", torchrun()),
        },
    )


# ---------------------------------------------------------------------------------------------
# Serving


def request_path(rng: random.Random) -> str:
    index, sae = rng.randrange(SERVE_SPEC.n_features), SERVE_SPEC.sae_name
    return rng.choice(
        [f"/saes/{sae}/features/{index}", f"/api/v1/saes/{sae}/features/{index}", f"/api/v1/saes/{sae}/features?q=capital"]
    )


async def saturate(base: str, clients: int, seconds: float) -> list[float]:
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:

        async def one_client(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < deadline:
                start = time.perf_counter()
                response = await client.get(request_path(rng))
                response.raise_for_status()
                latencies.append(time.perf_counter() - start)

        await asyncio.gather(*(one_client(i) for i in range(clients)))
    return latencies


def bench_serve(seconds: float, clients: int) -> None:
    schema = f"scale_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_URL)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    url = f"{PG_URL}?options=-csearch_path%3D{schema}"
    try:
        engine = create_engine_for(url)
        build_synthetic_store(engine, SERVE_SPEC)
        engine.dispose()
        rates = {}
        for workers in (1, 2):
            with serving(url, "--workers", str(workers)) as base:
                asyncio.run(saturate(base, clients, 2))  # warm-up
                latencies = asyncio.run(saturate(base, clients, seconds))
            rates[workers] = len(latencies) / seconds
            q = statistics.quantiles(latencies, n=100)
            print(f"serving     {workers} worker{'s' if workers > 1 else ' '}  {clients} clients   {rates[workers]:6.0f} req/s   "
                  f"p50 {q[49] * 1000:5.0f} ms   p99 {q[98] * 1000:5.0f} ms")
        print(f"serving     speed-up {rates[2] / rates[1]:.2f}x")
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        admin.dispose()


async def pages_beside_live(base: str, sae: str, seconds: float, live_clients: int) -> tuple[list[float], int]:
    """Feature-page latencies of 8 clients while ``live_clients`` post prompts; and live answers."""
    deadline = time.monotonic() + seconds
    pages: list[float] = []
    answered = 0
    prompt = "def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n" * 2
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:

        async def reader(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < deadline:
                start = time.perf_counter()
                (await client.get(f"/saes/{sae}/features/{rng.randrange(WIDTH)}")).raise_for_status()
                pages.append(time.perf_counter() - start)

        async def prompter() -> None:
            nonlocal answered
            while time.monotonic() < deadline:
                response = await client.post(f"/api/v1/saes/{sae}/activations", json={"text": prompt})
                answered += response.status_code == 200

        await asyncio.gather(*(reader(i) for i in range(8)), *(prompter() for _ in range(live_clients)))
    return pages, answered


@contextmanager
def live_server(db: str, model_in: str) -> Iterator[str]:
    """One web worker with live on: the model on a thread of the web process (the app built
    without a model process, as uvicorn serves it directly), or in its own process
    (`saescope serve`)."""
    port = free_port()
    if model_in == "web process":
        command = [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--port", str(port), "--log-level", "warning"]
        env = {"SAESCOPE_DB_URL": db, "SAESCOPE_LIVE": "true"}
    else:
        command = [sys.executable, "-m", "sae_core", "serve", "--db", db, "--port", str(port), "--live", "--log-level", "warning"]
        env = {}
    with running(command, port, env=env, timeout=300) as base:
        yield base


def bench_live(seconds: float, folder: Path) -> None:
    sae, db = random_sae(folder), f"sqlite:///{folder / 'live.db'}"
    timed([sys.executable, "-m", "sae_core", "precompute", "--sae", str(sae), "--tokens", "1024", "--db", db, "--name", "scale-live"])
    for model_in in ("web process", "own process"):
        with live_server(db, model_in) as base:
            asyncio.run(pages_beside_live(base, "scale-live", 2, 1))  # warm-up
            for live_clients in (0, 2):
                pages, answered = asyncio.run(pages_beside_live(base, "scale-live", seconds, live_clients))
                q = statistics.quantiles(pages, n=100)
                print(f"live        model in its {model_in:<11}  pages beside {live_clients} live clients   p50 {q[49] * 1000:5.0f} ms   "
                      f"p99 {q[98] * 1000:5.0f} ms   {len(pages) / seconds:5.1f} pages/s   {answered / seconds:4.1f} prompts/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192, help="precompute tokens")
    parser.add_argument("--train-steps", type=int, default=8, help="timed training steps of 4,096 tokens")
    parser.add_argument("--serve-seconds", type=float, default=10.0, help="saturated load per worker count")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--only", choices=["precompute", "train", "serve", "live"], help="run one section")
    parser.add_argument("--train-worker", type=Path, help=argparse.SUPPRESS)  # the timed job itself
    args = parser.parse_args()
    if args.train_worker:
        train_worker(args.train_steps, args.train_worker)
        return
    print(f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at the start")
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "precompute"):
            bench_precompute(args.tokens, Path(tmp))
        if args.only in (None, "train"):
            bench_train(args.train_steps, Path(tmp))
        if args.only in (None, "live"):
            bench_live(args.serve_seconds, Path(tmp))
    if args.only in (None, "serve"):
        bench_serve(args.serve_seconds, args.clients)


if __name__ == "__main__":
    main()
