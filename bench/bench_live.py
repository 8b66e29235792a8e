"""Benchmark: live endpoints against the forward passes they cost, on the default model.

One 64-token prompt (BOS included) on SmolLM2-135M with a TopK SAE on the residual after block
``--layer`` (random init, or ``--sae FOLDER`` for a trained one). Four methods, interleaved round
by round so that load from other processes hits them alike:

- bare forward to layer L (``Subject.forward_to_layer``), called on the model worker;
- full forward (``model(ids)``, logits at every position), called on the model worker;
- ``POST /api/v1/saes/{sae}/activations`` through a TestClient: HTTP, tokenising, the worker hop,
  forward to L, SAE encode, ranking, labels from the store, JSON;
- ``POST /api/v1/saes/{sae}/attribution``: one forward with the SAE spliced in, one backward.

Targets (issue 6): activations <= 1.3x the bare forward; attribution <= 3x a full forward.
Ratios are reported per round (the methods of one round ran back to back) and as p50 ratios.

    python bench/bench_live.py [--layer 15] [--rounds 30] [--sae FOLDER]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa
import torch
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from sae_core.inputs.subject import hook_name, load_subject
from sae_core.saes.formats import load_sae
from sae_core.saes.sae import SAE, SAEConfig, default_width
from sae_core.store.db import SaeRow, SubjectModelRow, create_engine_for, migrate

PROMPT_TOKENS = 64
SOURCE_TEXT = (
    "The sparse autoencoder reads the residual stream of a middle layer and writes it back as a "
    "sum of a few feature directions. Researchers type a prompt, see which features fire on each "
    "token, attribute the next-token prediction to the features that caused it, and steer the "
    "model by adding a feature's decoder direction to the residual stream while it generates text."
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--sae", default=None, help="a trained SAE folder (default: random TopK init)")
    parser.add_argument("--k", type=int, default=32, help="k of the random TopK SAE")
    parser.add_argument("--rounds", type=int, default=30, help="timed calls per method")
    return parser.parse_args()


def random_topk_sae(d_model: int, k: int, layer: int, model: str) -> SAE:
    """Anthropic/OpenAI init: unit-norm random decoder rows, encoder = decoder transposed."""
    d_sae = default_width(d_model)
    cfg = SAEConfig(d_in=d_model, d_sae=d_sae, architecture="topk", k=k, layer=layer,
                    model_name=model, hook_name=hook_name(layer))
    w_dec = torch.randn(d_sae, d_model)
    w_dec /= w_dec.norm(dim=-1, keepdim=True)
    tensors = {"W_dec": w_dec, "W_enc": w_dec.T.clone(), "b_enc": torch.zeros(d_sae), "b_dec": torch.zeros(d_model)}
    return SAE.from_tensors(cfg, tensors, origin="bench")


def write_store(folder: Path, subject, sae: SAE, sae_path: Path, layer: int) -> str:
    """A store holding just the model and the SAE row the live endpoints need."""
    url = f"sqlite:///{folder / 'store.db'}"
    engine = create_engine_for(url)
    migrate(engine)
    with engine.begin() as conn:
        model_id = conn.execute(
            sa.insert(SubjectModelRow).values(
                name=subject.name, source=subject.source, architecture=subject.config.model_type,
                d_model=subject.d_model, n_layers=subject.n_layers, vocab_size=subject.vocab_size,
                bos_token_id=subject.bos_token_id,
            ).returning(SubjectModelRow.id)
        ).scalar_one()
        conn.execute(sa.insert(SaeRow).values(
            name="bench", model_id=model_id, layer=layer, hook_name=hook_name(layer), architecture="topk",
            d_in=sae.d_in, d_sae=sae.d_sae, k=sae.cfg.k, path=str(sae_path), status="complete",
        ))
    engine.dispose()
    return url


def prompt_of_length(tokenizer, n_tokens: int) -> str:
    """Text that encodes to ``n_tokens`` tokens once BOS is prepended."""
    ids = tokenizer(SOURCE_TEXT, add_special_tokens=False)["input_ids"][: n_tokens - 1]
    text = tokenizer.decode(ids)
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) == n_tokens - 1, "decode does not round-trip"
    return text


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    args = parse_args()
    subject = load_subject(args.model)
    layer = subject.check_layer(args.layer)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.sae:
            sae_path = Path(args.sae)
            sae = load_sae(sae_path, d_in=subject.d_model)
        else:
            torch.manual_seed(0)
            sae = random_topk_sae(subject.d_model, args.k, layer, args.model)
            sae_path = sae.save(folder / "sae")
        url = write_store(folder, subject, sae, sae_path, layer)
        text = prompt_of_length(subject.tokenizer, PROMPT_TOKENS)
        ids = torch.tensor([[subject.bos_token_id, *subject.tokenizer(text, add_special_tokens=False)["input_ids"]]])
        settings = Settings(db_url=url, live=True, max_prompt_tokens=PROMPT_TOKENS)
        with TestClient(create_app(settings)) as client, torch.inference_mode(False):

            def post(endpoint: str) -> Callable[[], object]:
                def call():
                    response = client.post(f"/api/v1/saes/bench/{endpoint}", json={"text": text})
                    response.raise_for_status()
                return call

            worker = client.app.state.live.backend.worker

            def on_worker(fn):
                """Baselines run on the model worker too: torch's thread pool belongs to the thread
                that calls it, and two pools spinning against each other would skew the ratios."""

                def no_grad():
                    with torch.no_grad():
                        fn()

                return lambda: worker.run(no_grad, timeout_s=600)

            methods = {
                "bare forward to layer L": on_worker(lambda: subject.forward_to_layer(ids, layer)),
                "full forward (logits)": on_worker(lambda: subject.model(ids, use_cache=False)),
                "activations endpoint": post("activations"),
                "attribution endpoint": post("attribution"),
            }
            for run in methods.values():  # warm-up: allocator, kernels, the worker thread
                run()
                run()
            seconds: dict[str, list[float]] = {name: [] for name in methods}
            for _ in range(args.rounds):
                for name, run in methods.items():
                    seconds[name].append(timed(run))

    print(
        f"{subject.name}, layer {layer} of {subject.n_layers}, SAE {sae.d_sae} latents "
        f"({sae.cfg.architecture}, k={sae.cfg.k}), prompt {PROMPT_TOKENS} tokens, "
        f"{args.rounds} rounds, {torch.get_num_threads()} torch threads"
    )
    print(f"{'method':<26} {'p50 ms':>8} {'p95 ms':>8}")
    p50 = {name: statistics.median(values) for name, values in seconds.items()}
    for name, values in seconds.items():
        print(f"{name:<26} {p50[name] * 1e3:8.1f} {percentile(values, 0.95) * 1e3:8.1f}")
    # Load from other processes comes in waves longer than a round, so each round's own ratio
    # (its methods ran back to back) is steadier than the ratio of the medians.
    for name, base, target in (
        ("activations endpoint", "bare forward to layer L", 1.3),
        ("attribution endpoint", "full forward (logits)", 3.0),
    ):
        ratios = [a / b for a, b in zip(seconds[name], seconds[base], strict=True)]
        print(
            f"{name} / {base}: median per-round ratio {statistics.median(ratios):.2f}x, "
            f"ratio of p50s {p50[name] / p50[base]:.2f}x (target <= {target}x)"
        )

if __name__ == "__main__":
    main()
