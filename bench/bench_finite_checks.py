"""What the NaN/Inf guards cost, against one training step at the embedded default's shape.

    python bench/bench_finite_checks.py [--rounds 5] [--threads 2]

Two guards run while training: reading a cache shard sums each tensor once (NaN and Inf
propagate into the sum; the per-row scan runs only when it is not finite), and each step checks
that the clipped gradient norm is finite (one scalar; NaN anywhere in the loss or the gradients
makes it NaN). Prints the shard read (as float32, what training reads) with and without the
check, and the step.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from modeling_dmsae import DMSAEConfig, DMSAEModel
from trainer.config import OptimizerConfig
from trainer.harvest.cache import read_shard
from trainer.sae.training import SAETrainer


def best_of(rounds: int, action) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--d_in", type=int, default=576)  # SmolLM2-135M
    parser.add_argument("--num_latents", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=1024)
    parser.add_argument("--shard_rows", type=int, default=64 * 127)  # 64 contexts of 128 tokens, BOS masked
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as scratch:
        shard = Path(scratch) / "shard_000000.safetensors"
        save_file({"x": torch.randn(args.shard_rows, args.d_in).to(torch.bfloat16)}, shard)
        plain = best_of(args.rounds, lambda: load_file(shard)["x"].float())
        checked = best_of(args.rounds, lambda: read_shard(shard)["x"])
        x = load_file(shard)["x"].float()
        check_alone = best_of(args.rounds, lambda: torch.isfinite(x.sum()))

    sae = DMSAEModel(DMSAEConfig(d_in=args.d_in, num_latents=args.num_latents, group_sizes=[args.num_latents], k=args.k))
    trainer = SAETrainer(sae, OptimizerConfig(warmup_steps=1), total_steps=10_000)
    batch = torch.randn(args.batch_size, args.d_in)
    trainer.step(batch)  # the first step initialises b_dec
    step = best_of(args.rounds, lambda: trainer.step(batch))

    steps_per_shard = args.shard_rows / args.batch_size
    print(f"d = {args.d_in}, K = {args.num_latents}, k = {args.k}, batch {args.batch_size} tokens, shard {args.shard_rows} rows (bf16), {args.threads} threads, best of {args.rounds}")
    print("| what | ms |")
    print("|---|--:|")
    print(f"| read a shard, no check | {plain * 1e3:.2f} |")
    print(f"| read a shard with the NaN/Inf check | {checked * 1e3:.2f} |")
    print(f"| the check alone (one sum) | {check_alone * 1e3:.2f} |")
    print(f"| one training step (includes the gradient-norm check) | {step * 1e3:.1f} |")
    per_step = max(checked - plain, check_alone) / steps_per_shard
    print(f"shard check per training step: {per_step * 1e3:.3f} ms = {per_step / step:.3%} of a step ({steps_per_shard:.1f} steps per shard)")


if __name__ == "__main__":
    main()
