"""Benchmark: how fast a live prompt is refused when the model's queue is full (issue 19: under
50 ms), and where a refusal's time goes.

``saescope serve --live --workers 2`` on SmolLM2-135M with a random 16k-latent TopK SAE on layer
15; ``--clients`` clients post 180-token prompts for ``--duration`` s, each pausing 0.2 s after
a 503 (as bench_serve's pressing clients do). Beside them, two probes separate the parts of a
refusal:

- a cheap page (``GET /api/v1/saes``) every 50 ms: how long the web workers take to answer
  anything at this moment (event loop, HTTP, the machine's load);
- the model side asked directly (``RemoteModel.call`` on the model process's socket, from this
  process): the round trip that a refusal decided by the model side costs (connection, key
  handshake, a thread in a process at lower priority busy with a forward pass).

    python bench/bench_refusals.py [--clients 20] [--duration 20]

Measured on the shared 2-core machine (one run each, 20 clients, 20 s): main at load 10.0,
503 p50 61.0 ms / max 943 ms beside the cheap page's 42.5 ms and the model side's 12.7 ms;
admission in the web worker at load 11.3, 503 p50 49.7 ms / max 1,200 ms beside the cheap
page's 45.1 ms. A refusal now costs what any request costs on that server at that moment.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_live import SOURCE_TEXT, percentile, write_store  # noqa: E402
from sae_core.inputs.subject import load_subject  # noqa: E402
from tests.app.server_process import server_processes, serving  # noqa: E402
from tests.live_support import random_sae  # noqa: E402

PROMPT_TOKENS = 180
PAUSE_AFTER_503_S = 0.2


async def prompting(client: httpx.AsyncClient, text: str, deadline: float, seen: dict) -> None:
    while time.monotonic() < deadline:
        start = time.perf_counter()
        try:
            status = (
                await client.post("/api/v1/saes/bench/activations", json={"text": text})
            ).status_code
        except httpx.HTTPError as err:
            status = type(err).__name__
        seen.setdefault(status, []).append(time.perf_counter() - start)
        if status == 503:
            await asyncio.sleep(PAUSE_AFTER_503_S)


async def probing_pages(client: httpx.AsyncClient, deadline: float, seen: list) -> None:
    while time.monotonic() < deadline:
        start = time.perf_counter()
        await client.get("/api/v1/saes")
        seen.append(time.perf_counter() - start)
        await asyncio.sleep(0.05)


def probing_model_side(socket: str, text: str, stop: threading.Event, seen: dict) -> None:
    from app.live.remote import RemoteModel
    from app.live.worker import LiveRefused
    from sae_core.live.requests import ActivationsOp

    model = RemoteModel(socket, timeout_s=60)
    op = ActivationsOp(sae="bench", text=text, per_token=3, top=10)
    while not stop.is_set():
        start = time.perf_counter()
        try:
            model.call(op)
            status = 200
        except LiveRefused as err:
            status = err.status
        seen.setdefault(status, []).append(time.perf_counter() - start)
        time.sleep(0.05)


def live_socket(pids: list[int]) -> str:
    """The model process's socket, from a web worker's environment (``saescope serve`` sets it)."""
    for pid in pids:
        for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            if entry.startswith(b"SAESCOPE_LIVE_SOCKET="):
                return entry.split(b"=", 1)[1].decode()
    raise RuntimeError("no web worker has SAESCOPE_LIVE_SOCKET")


def summary(name: str, seconds: list[float]) -> str:
    if not seconds:
        return f"  {name:44} none"
    return (
        f"  {name:44} {len(seconds):5d}   p50 {percentile(seconds, 0.5) * 1e3:7.1f} ms   "
        f"max {max(seconds) * 1e3:7.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--duration", type=float, default=20)
    args = parser.parse_args()
    subject = load_subject("smollm2-135m")
    words = subject.tokenizer(" ".join([SOURCE_TEXT] * 4), add_special_tokens=False)["input_ids"]
    text = subject.tokenizer.decode(words[: PROMPT_TOKENS - 1])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        torch.manual_seed(0)
        sae = random_sae(subject.d_model, d_sae=16384, architecture="topk", k=32, layer=15)
        url = write_store(folder, subject, sae, sae.save(folder / "sae"), 15)
        flags = ("--workers", "2", "--live", "--model", "smollm2-135m")
        with serving(url, *flags, timeout=300) as base:
            port = int(base.rsplit(":", 1)[1])
            socket = live_socket(server_processes(port))
            prompts: dict = {}
            pages: list[float] = []
            model_side: dict = {}

            async def run() -> None:
                limits = httpx.Limits(max_connections=args.clients + 1)
                async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
                    deadline = time.monotonic() + args.duration
                    await asyncio.gather(
                        *(prompting(client, text, deadline, prompts) for _ in range(args.clients)),
                        probing_pages(client, deadline, pages),
                    )

            stop = threading.Event()
            probe = threading.Thread(
                target=probing_model_side, args=(socket, text, stop, model_side)
            )
            load = os.getloadavg()[0]
            probe.start()
            asyncio.run(run())
            stop.set()
            probe.join()
    print(
        f"{args.clients} clients posting {PROMPT_TOKENS}-token prompts for {args.duration:.0f} s "
        f"(queue 4 + 1 running); load average {load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end"
    )
    for status, seconds in sorted(prompts.items(), key=str):
        print(summary(f"live prompt {status}", seconds))
    print(summary("probe: GET /api/v1/saes", pages))
    for status, seconds in sorted(model_side.items(), key=str):
        print(summary(f"probe: the model side asked directly, {status}", seconds))


if __name__ == "__main__":
    main()
