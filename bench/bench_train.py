"""Training throughput: saescope's sparse TopK step vs a dense PyTorch TopK step, side by side.

Both train the same width and k on the same batches with fused Adam. The dense reference
scatters the TopK values into a (batch, width) matrix and lets autograd run the three dense
backward matmuls; ours runs one dense encoder matmul and touches only the k active latents
afterwards. Ours also does the decoder-norm projection and gradient clipping; the reference
does not, so the ratio is conservative.

    python bench/bench_train.py [--width 8192 --k 32 --batch-size 4096 --d-model 576 --steps 5]
"""

from __future__ import annotations

import argparse
import time

import torch

from sae_core.saes.train_config import TrainConfig
from sae_core.saes.train_data import TensorSource
from sae_core.saes.train_loop import init_state, train_step


def dense_topk_step(sae, optimizer, x: torch.Tensor, k: int) -> None:
    z = (x - sae.b_dec) @ sae.W_enc + sae.b_enc  # (batch, width)
    values, indices = z.topk(k, dim=-1, sorted=False)
    f = torch.zeros_like(z).scatter(-1, indices, torch.relu(values))  # (batch, width), k nonzero per row
    x_hat = f @ sae.W_dec + sae.b_dec
    loss = (x_hat - x).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def tokens_per_second(step, batches: list[torch.Tensor]) -> float:
    step(batches[0])  # warm-up: allocations, fused-kernel setup
    start = time.perf_counter()
    for x in batches[1:]:
        step(x)
    return sum(x.shape[0] for x in batches[1:]) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=576)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method (after one warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(0)
    data = torch.randn((args.steps + 1) * args.batch_size, args.d_model, generator=gen)
    batches = list(data.split(args.batch_size))
    cfg = TrainConfig(width=args.width, k=args.k, batch_size=args.batch_size, tokens=len(data) * 100)

    ours = init_state(cfg, TensorSource(data))
    lr = cfg.resolved_lr(args.width)
    ours_tps = tokens_per_second(lambda x: train_step(ours, x, cfg, lr), batches)

    reference = init_state(cfg, TensorSource(data))
    dense_tps = tokens_per_second(
        lambda x: dense_topk_step(reference.sae, reference.optimizer, x * reference.scale, args.k), batches
    )
    print(
        f"TopK training step, width {args.width}, k {args.k}, batch {args.batch_size}, d_model {args.d_model}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"  saescope sparse step : {ours_tps:8.0f} tokens/s")
    print(f"  dense PyTorch TopK   : {dense_tps:8.0f} tokens/s")
    print(f"  ratio                : {ours_tps / dense_tps:8.2f}x")


if __name__ == "__main__":
    main()
