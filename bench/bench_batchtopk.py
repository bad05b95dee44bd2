"""What the global BatchTopK costs: the selection over one process's batch alone against the same
selection cut over every process's batch as one (``batch_topk_entries(..., group)``), on
``--processes`` gloo (CPU) or NCCL (CUDA) processes, at the paper's SAE shape by default.

    python bench/bench_batchtopk.py [--num_latents 65536 --batch_size 1024 --k 320 --processes 2]

Every process holds its own random [N, K] ReLU pre-activations; the table gives the median time of
a selection, local and global, and the global cut's extra cost (candidates, four all_reduces of
256 counts, the tie split). The encoder GEMM that produces those pre-activations is timed alongside
for scale.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from modeling_dmsae.modeling_dmsae import batch_topk_entries


def _median_seconds(action, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        action()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def _worker(rank: int, args: argparse.Namespace, port: int, results) -> None:
    device = torch.device(f"cuda:{rank}" if args.device == "cuda" else "cpu")
    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.processes
    )
    generator = torch.Generator(device=device).manual_seed(rank)
    x = torch.randn(args.batch_size, args.d_in, device=device, generator=generator)
    weights = torch.randn(args.d_in, args.num_latents, device=device, generator=generator) / args.d_in**0.5
    acts = (x @ weights - 0.5).relu_()
    group = dist.group.WORLD
    timings = {
        "encoder GEMM": _median_seconds(lambda: x @ weights, args.repeats, device),
        "BatchTopK, local batch": _median_seconds(lambda: batch_topk_entries(acts, args.k), args.repeats, device),
        "BatchTopK, global batch": _median_seconds(lambda: batch_topk_entries(acts, args.k, group=group), args.repeats, device),
    }
    kept_here = batch_topk_entries(acts, args.k, group=group)[0].numel()
    kept = torch.tensor([kept_here], device=device)
    dist.all_reduce(kept)
    if rank == 0:
        results.update(timings, kept=int(kept), budget=args.k * args.batch_size * args.processes)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d_in", type=int, default=2304)
    parser.add_argument("--num_latents", type=int, default=65536)
    parser.add_argument("--k", type=int, default=320)
    parser.add_argument("--batch_size", type=int, default=1024, help="tokens per process")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (CPU)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(args, 29500 + os.getpid() % 1000, results), nprocs=args.processes)
    print(
        f"d = {args.d_in}, K = {args.num_latents}, k = {args.k}, N = {args.batch_size} per process, "
        f"{args.processes} {args.device} processes; kept {results['kept']:,} of a budget of {results['budget']:,}"
    )
    print("| what | median (ms) |\n|---|--:|")
    for name in ("encoder GEMM", "BatchTopK, local batch", "BatchTopK, global batch"):
        print(f"| {name} | {results[name] * 1000:.1f} |")
    extra = results["BatchTopK, global batch"] - results["BatchTopK, local batch"]
    print(f"| global cut's extra cost | {extra * 1000:.1f} ({extra / results['encoder GEMM']:.1%} of the GEMM) |")


if __name__ == "__main__":
    main()
