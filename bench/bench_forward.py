"""Benchmark: residual-stream activations per second, forward-to-layer vs the full forward.

Both methods read the residual stream after block ``--layer`` of the default model on the same
batches of default-corpus contexts, alternating batch by batch so that load from other processes
hits both alike. The full forward is the usual recipe: ``model(ids, output_hidden_states=True)``
and ``hidden_states[layer + 1]``. Expected: >= 1.6x for layer 15 of SmolLM2-135M's 30.

    python bench/bench_forward.py [--layer 15] [--batch-size 8] [--batches 4]
"""

from __future__ import annotations

import argparse
import time

import torch

from sae_core.inputs.corpus import build_contexts
from sae_core.inputs.subject import load_subject


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=8, help="contexts per forward")
    parser.add_argument("--batches", type=int, default=4, help="timed batches per method")
    return parser.parse_args()


def full_forward(subject, ids: torch.Tensor, layer: int) -> torch.Tensor:
    return subject.model(ids, output_hidden_states=True).hidden_states[layer + 1]


def main() -> None:
    args = parse_args()
    subject = load_subject(args.model)
    subject.check_layer(args.layer)
    n_contexts = args.batch_size * (args.batches + 1)
    contexts = build_contexts("default", subject.tokenizer, max_contexts=n_contexts)
    batches = contexts.tokens.split(args.batch_size)  # each (batch_size, seq)
    methods = {
        "forward_to_layer": lambda ids: subject.forward_to_layer(ids, args.layer),
        "full forward + hidden_states": lambda ids: full_forward(subject, ids, args.layer),
    }
    seconds = dict.fromkeys(methods, 0.0)
    with torch.inference_mode():
        torch.testing.assert_close(
            *(run(batches[0]) for run in methods.values()), rtol=0, atol=1e-4
        )
        for ids in batches[1:]:  # batches[0] was the warm-up
            for name, run in methods.items():
                start = time.perf_counter()
                run(ids)
                seconds[name] += time.perf_counter() - start

    tokens = sum(ids.numel() for ids in batches[1:])
    print(
        f"{subject.name}, layer {args.layer} of {subject.n_layers}, {tokens:,} tokens per method, "
        f"{torch.get_num_threads()} threads"
    )
    for name, spent in seconds.items():
        print(f"  {name:<30} {tokens / spent:8.0f} tok/s")
    speedup = seconds["full forward + hidden_states"] / seconds["forward_to_layer"]
    print(f"  forward_to_layer speed-up: {speedup:.2f}x")


if __name__ == "__main__":
    main()
