"""Count (not time) the bytes one process sends per optimisation step in each stage mode, on 2 gloo
CPU processes, and print them beside the formulas of ``trainer/run/parallelism.py``.

    python bench/bench_parallel.py                      # d = 64, K = 1024, k = 16, N = 256 tokens per step
    python bench/bench_parallel.py --d_in 128 --num_latents 4096

- ``ddp``: ``SAETrainer.step`` (the pipeline's step) under Accelerate's DDP, AuxK active (every latent
  dead). DDP's gradient all-reduce is counted by a communication hook (``register_comm_hook``)
  that wraps the default all-reduce; the Python-level collectives (BatchTopK's, the dead-latent
  counts, AuxK's variance) by wrapping ``torch.distributed``'s functions. The first step (b_dec's
  initialisation, once per SAE) is not counted.
- ``latent-parallel``: ``LatentParallelTrainer.step`` (each process half of the latents, the whole
  batch), AuxK active, after the all-gather of the batch's activations.
- ``sae-parallel``: the all-gather of the global micro-batch's activations ([N, d] bf16, each
  process contributing its N / P rows), of the shape and dtype the pipeline's stream sends
  (``trainer.harvest.harvested.lanes_in_order``), as a plain ``all_gather_into_tensor``.

Every collective is converted to bytes sent with the ring formulas of ``parallelism.py`` (an
all-reduce of B bytes sends 2 (P - 1) / P B, an all-gather of a B-byte result (P - 1) / P B): the
bench checks which collectives a step makes and their sizes against what the formulas assume.
A mode is one entry of ``MODES``: a function that runs one counted step, and its formula.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make the project importable
    sys.path.insert(0, str(ROOT))

from trainer.run.parallelism import StageMode, StepShape, all_gather_bytes, all_reduce_bytes, bytes_per_step  # noqa: E402

PROCESSES = 2


class Counter:
    """Bytes this process sends, summed over the collectives made while ``counting``."""

    def __init__(self) -> None:
        self.sent = 0.0
        self.counting = False
        self.in_hook = False  # the comm hook's own all-reduce is counted by the hook, not again

    def add(self, sent: float) -> None:
        if self.counting:
            self.sent += sent


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def wrap_collectives(counter: Counter) -> None:
    """Replace torch.distributed's collectives by counting wrappers (modeling_dmsae and Accelerate
    call them through the module, so the wrappers see every Python-level collective)."""
    world = PROCESSES
    reduce, gather_into, gather = dist.all_reduce, dist.all_gather_into_tensor, dist.all_gather

    def all_reduce(tensor, *args, **kwargs):
        if not counter.in_hook:
            counter.add(all_reduce_bytes(_nbytes(tensor), world))
        return reduce(tensor, *args, **kwargs)

    def all_gather_into_tensor(output, *args, **kwargs):
        counter.add(all_gather_bytes(_nbytes(output), world))
        return gather_into(output, *args, **kwargs)

    def all_gather(outputs, *args, **kwargs):
        counter.add(all_gather_bytes(sum(map(_nbytes, outputs)), world))
        return gather(outputs, *args, **kwargs)

    dist.all_reduce, dist.all_gather_into_tensor, dist.all_gather = all_reduce, all_gather_into_tensor, all_gather
    if hasattr(dist, "all_gather_single"):  # the newer name of all_gather_into_tensor (torch >= 2.13)
        single = dist.all_gather_single

        def all_gather_single(output, *args, **kwargs):
            counter.add(all_gather_bytes(_nbytes(output), world))
            return single(output, *args, **kwargs)

        dist.all_gather_single = all_gather_single


def counting_allreduce_hook(counter: Counter):
    """A DDP communication hook: the default all-reduce of each gradient bucket, counted."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    def hook(state, bucket):
        counter.add(all_reduce_bytes(_nbytes(bucket.buffer()), PROCESSES))
        counter.in_hook = True
        try:
            return default_hooks.allreduce_hook(state, bucket)
        finally:
            counter.in_hook = False

    return hook


class Shape(NamedTuple):
    d_in: int
    num_latents: int
    k: int
    tokens: int


def sae_config(shape: Shape):
    from modeling_dmsae import DMSAEConfig
    from modeling_dmsae.configuration_dmsae import matryoshka_group_sizes

    groups = matryoshka_group_sizes(shape.num_latents, [1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2 + 1 / 32])
    return DMSAEConfig(d_in=shape.d_in, num_latents=shape.num_latents, core_size=0, group_sizes=groups, k=shape.k, dead_tokens_threshold=1)


def step_shape(shape: Shape) -> StepShape:
    config = sae_config(shape)
    return StepShape(shape.d_in, shape.num_latents, shape.tokens, PROCESSES, len(config.group_sizes), config.aux_k)


def count_ddp(shape: Shape, counter: Counter) -> Callable[[], None]:
    """One counted SAETrainer step under DDP, every latent dead (AuxK on); returns the step, to time."""
    from accelerate import Accelerator

    from modeling_dmsae import DMSAEModel
    from trainer.config import OptimizerConfig
    from trainer.sae.training import SAETrainer

    torch.manual_seed(0)
    trainer = SAETrainer(DMSAEModel(sae_config(shape)), OptimizerConfig(warmup_steps=1), 10, Accelerator(cpu=True))
    trainer.model.register_comm_hook(None, counting_allreduce_hook(counter))
    batches = torch.randn(2, shape.tokens // PROCESSES, shape.d_in, generator=torch.Generator().manual_seed(dist.get_rank()))
    trainer.step(batches[0])  # b_dec's initialisation: once per SAE, not per step
    trainer.tokens_since_fired.fill_(trainer.sae.config.dead_tokens_threshold)
    counter.counting = True
    trainer.step(batches[1])
    counter.counting = False
    return lambda: trainer.step(batches[1])


def count_sae_parallel(shape: Shape, counter: Counter) -> None:  # nothing to time: one gather
    """The activation all-gather: each process's N / P rows into the global [N, d] bf16 batch."""
    mine = torch.randn(shape.tokens // PROCESSES, shape.d_in).to(torch.bfloat16)
    everyone = mine.new_empty(shape.tokens, shape.d_in)
    counter.counting = True
    dist.all_gather_into_tensor(everyone, mine)
    counter.counting = False


def count_latent_parallel(shape: Shape, counter: Counter) -> Callable[[], None]:
    """One counted LatentParallelTrainer step, every latent dead (AuxK on), after the activation
    all-gather that gives every process the whole batch; returns the step, to time."""
    from accelerate import Accelerator

    from modeling_dmsae import DMSAEModel
    from trainer.config import OptimizerConfig
    from trainer.sae.latent_parallel import LatentParallelTrainer

    torch.manual_seed(0)  # the same SAE on every process, each keeping its latents
    trainer = LatentParallelTrainer(DMSAEModel(sae_config(shape)), OptimizerConfig(warmup_steps=1), 10, Accelerator(cpu=True))
    batches = torch.randn(2, shape.tokens, shape.d_in, generator=torch.Generator().manual_seed(0))
    trainer.step(batches[0])  # b_dec's initialisation: once per SAE, not per step
    trainer.tokens_since_fired.fill_(trainer.shard.config.dead_tokens_threshold)
    count_sae_parallel(shape, counter)
    counter.counting = True
    trainer.step(batches[1])
    counter.counting = False
    return lambda: trainer.step(batches[1])


class Mode(NamedTuple):
    count: Callable[[Shape, Counter], Callable[[], None] | None]
    formula: Callable[[StepShape], float]


# One entry per mode: how to run one counted step, and the bytes parallelism.py says it sends.
MODES = {
    StageMode.DDP: Mode(count_ddp, lambda shape: bytes_per_step(StageMode.DDP, shape, dead_latents=True)),
    StageMode.LATENT_PARALLEL: Mode(count_latent_parallel, lambda shape: bytes_per_step(StageMode.LATENT_PARALLEL, shape, dead_latents=True)),
    StageMode.SAE_PARALLEL: Mode(count_sae_parallel, lambda shape: bytes_per_step(StageMode.SAE_PARALLEL, shape)),
}


def median_step_s(step: Callable[[], None], steps: int, synchronised: bool) -> float:
    """Median wall time of ``steps`` steps (each ended by a barrier when several processes run)."""
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if synchronised:
            dist.barrier()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def single_process_step_s(shape: Shape, steps: int, threads: int) -> float:
    """The plain trainer's step on one process holding the whole batch (the same SAE and data)."""
    from accelerate import Accelerator

    from modeling_dmsae import DMSAEModel
    from trainer.config import OptimizerConfig
    from trainer.sae.training import SAETrainer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    trainer = SAETrainer(DMSAEModel(sae_config(shape)), OptimizerConfig(warmup_steps=1), 10, Accelerator(cpu=True))
    batches = torch.randn(2, shape.tokens, shape.d_in, generator=torch.Generator().manual_seed(0))
    trainer.step(batches[0])
    trainer.tokens_since_fired.fill_(trainer.sae.config.dead_tokens_threshold)
    return median_step_s(lambda: trainer.step(batches[1]), steps, synchronised=False)


def worker(rank: int, port: int, shape: Shape, results, timed_steps: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(PROCESSES), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=PROCESSES)
    counter = Counter()
    wrap_collectives(counter)
    try:
        for mode, entry in MODES.items():
            counter.sent = 0.0
            step = entry.count(shape, counter)
            seconds = median_step_s(step, timed_steps, synchronised=True) if step and timed_steps else None
            if rank == 0:
                results[mode.value] = (counter.sent, seconds)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d_in", type=int, default=64)
    parser.add_argument("--num_latents", type=int, default=1024)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=256, help="global micro-batch, all processes together")
    parser.add_argument("--timed_steps", type=int, default=0, help="also time this many steps of each mode against one process")
    args = parser.parse_args()
    shape = Shape(args.d_in, args.num_latents, args.k, args.tokens)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(_free_port(), shape, results, args.timed_steps), nprocs=PROCESSES)
        measured = dict(results)
    formulas = step_shape(shape)
    print(f"bytes one process sends per optimisation step: {PROCESSES} gloo processes, d = {shape.d_in}, K = {shape.num_latents}, k = {shape.k}, N = {shape.tokens}")
    print(f"{'mode':<16}{'measured':>14}{'formula':>14}{'ratio':>8}")
    for mode, entry in MODES.items():
        expected = entry.formula(formulas)
        print(f"{mode.value:<16}{measured[mode.value][0]:>14,.0f}{expected:>14,.0f}{measured[mode.value][0] / expected:>8.3f}")
    if args.timed_steps:
        print_timings(shape, measured, args.timed_steps)


def print_timings(shape: Shape, measured: dict, steps: int) -> None:
    """Each mode's step on 2 processes of one thread beside one process doing all of it (the same
    2 cores: 2 threads; and 1 thread, the work of one of the 2 processes' cores)."""
    one = {threads: single_process_step_s(shape, steps, threads) for threads in (1, 2)}
    print(f"median step, {steps} steps, every latent dead (load average {os.getloadavg()[0]:.1f})")
    print(f"{'':<28}{'ms':>10}{'vs 1 process, 2 threads':>26}{'vs 1 thread':>14}")
    print(f"{'1 process, 2 threads':<28}{one[2] * 1e3:>10.1f}{1:>26.2f}{one[2] / one[1]:>14.2f}")
    print(f"{'1 process, 1 thread':<28}{one[1] * 1e3:>10.1f}{one[1] / one[2]:>26.2f}{1:>14.2f}")
    for mode, (_, seconds) in measured.items():
        if seconds is not None:
            print(f"{mode + ', 2 processes':<28}{seconds * 1e3:>10.1f}{seconds / one[2]:>26.2f}{seconds / one[1]:>14.2f}")


if __name__ == "__main__":
    main()
