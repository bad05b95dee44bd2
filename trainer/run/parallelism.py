"""How the processes of a launch share each SAE stage: the one place the mode of a stage is
decided. The pipeline runs the mode chosen here and the dry run prints it.

- ``DDP``: every process holds the whole SAE and a 1/P slice of the global batch; the gradients
  are all-reduced (the only mode on one process, where it is plain training).
- ``LATENT_PARALLEL``: every process holds K/P of the latents (their encoder rows, decoder rows,
  biases and Adam state; b_dec replicated) and the whole global batch; BatchTopK, the Matryoshka
  prefixes and AuxK are taken across the shards (``trainer.sae.latent_parallel``).
- ``SAE_PARALLEL``: the stage's independent SAEs are dealt to the processes; each trains whole
  SAEs on the whole global batch, with no gradient all-reduce.
"""

from __future__ import annotations

import math
from collections import Counter
from enum import Enum
from typing import NamedTuple, Sequence

from trainer.config import DistillConfig
from trainer.run.stages import final_saes


class StageMode(str, Enum):
    DDP = "ddp"
    LATENT_PARALLEL = "latent-parallel"
    SAE_PARALLEL = "sae-parallel"


def cycle_mode(config: DistillConfig, processes: int) -> StageMode:
    """A distillation cycle is one SAE: its latents are sharded over the processes."""
    if processes > 1 and config.run.parallelism == "auto":
        return StageMode.LATENT_PARALLEL
    return StageMode.DDP


def transfer_mode(config: DistillConfig, processes: int) -> StageMode:
    """The final SAEs are independent given C*: dealt to the processes, when every transfer seed
    has at least one for each process; with fewer, dealing them would leave processes idle, so each
    is trained latent-parallel by all of them instead."""
    if processes == 1 or config.run.parallelism != "auto":
        return StageMode.DDP
    per_seed = Counter(final.seed for final in final_saes(config))
    return StageMode.SAE_PARALLEL if min(per_seed.values()) >= processes else StageMode.LATENT_PARALLEL


def deal(ks: Sequence[int], processes: int) -> list[list[int]]:
    """Which of a stage's independent SAEs (given by their k, in training order) each process
    trains in SAE-parallel mode: their indices, per process, in training order.

    A process steps all of its SAEs on every batch, so the stage lasts as long as its busiest
    process, and an SAE's step grows with k (its sparse decode and backward). The SAEs are sorted
    by k, largest first, and dealt back and forth (processes 0..P-1, then P-1..0, ...): every
    process gets ceil or floor of n/P SAEs, and the largest k share a process with the smallest."""
    order = sorted(range(len(ks)), key=lambda index: (-ks[index], index))
    dealt: list[list[int]] = [[] for _ in range(processes)]
    for position, index in enumerate(order):
        lap, place = divmod(position, processes)
        dealt[place if lap % 2 == 0 else processes - 1 - place].append(index)
    return [sorted(indices) for indices in dealt]


# ---- what a process sends per optimisation step in each mode ------------------------------------
# The dry run's plan, bench/bench_parallel.py and the pipeline all count with these functions. Bytes
# are those one process sends over ring collectives: an all-reduce of B bytes sends 2 (P - 1) / P B,
# an all-gather whose result is B bytes sends (P - 1) / P B.

FP32, INT64 = 4, 8
RADIX_ROUNDS, RADIX_BINS = 4, 256  # BatchTopK's exact cut: one 256-bin int64 histogram per byte of a float32


class StepShape(NamedTuple):
    """One SAE's optimisation step as the byte counts need it."""

    d_in: int
    num_latents: int
    """K."""
    tokens: int
    """N: tokens of the global micro-batch, all processes together."""
    processes: int
    """P."""
    groups: int
    """L + 1: Matryoshka groups, one partial prefix reconstruction each."""
    aux_k: int
    core_size: int = 0
    """c: frozen encoder rows, no gradient (0 in a plan: the core is known only after selection)."""
    storage_bytes: int = 2
    """s: bytes of one cached or streamed activation value (2 for bf16)."""
    compute_bytes: int = FP32
    """Bytes of the compute dtype (4; 2 under accelerate launch --mixed_precision bf16)."""


def all_reduce_bytes(size: float, processes: int) -> float:
    """Bytes one process sends in a ring all-reduce of ``size`` bytes."""
    return 2 * (processes - 1) / processes * size


def all_gather_bytes(result: float, processes: int) -> float:
    """Bytes one process sends in a ring all-gather whose result is ``result`` bytes."""
    return (processes - 1) / processes * result


def batch_topk_bytes(processes: int) -> float:
    """BatchTopK over the global batch (``modeling_dmsae.batch_topk_entries``): the radix select's
    four 256-bin int64 histograms, plus its scalars: the budget (DDP: summed over the processes'
    batches; latent-parallel: the masked columns summed over the shards, int64), the sampled bound
    (fp32, MIN), the candidates' total (int64), the entries above the cut (int64) and the ties
    before each rank (P int64)."""
    scalars = INT64 + FP32 + INT64 + INT64 + processes * INT64
    return all_reduce_bytes(RADIX_ROUNDS * RADIX_BINS * INT64, processes) + all_reduce_bytes(scalars, processes)


def gradient_bytes(shape: StepShape) -> int:
    """Bytes of every trainable gradient (fp32): encoder rows (K - c) d, W_dec K d, b_enc K, b_dec d."""
    K, d = shape.num_latents, shape.d_in
    return FP32 * ((K - shape.core_size) * d + K * d + K + d)


def ddp_bytes(shape: StepShape, dead_latents: bool = True) -> float:
    """DDP: the all-reduce of every trainable gradient, BatchTopK's reductions, the dead-latent
    counts (K + 1 int64) and, while latents are dead, AuxK's batch variance (d + 2 fp32). The
    gradient norm needs none: every process holds the whole reduced gradient."""
    P = shape.processes
    small = batch_topk_bytes(P) + all_reduce_bytes((shape.num_latents + 1) * INT64, P)
    variance = all_reduce_bytes((shape.d_in + 1) * FP32, P) + all_reduce_bytes(FP32, P) if dead_latents else 0.0
    return all_reduce_bytes(gradient_bytes(shape), P) + small + variance


def activation_gather_bytes(shape: StepShape) -> float:
    """The all-gather that gives every process the global micro-batch's activations (N d s)."""
    return all_gather_bytes(shape.tokens * shape.d_in * shape.storage_bytes, shape.processes)


def latent_parallel_bytes(shape: StepShape, dead_latents: bool = True) -> float:
    """Latent-parallel (``trainer.sae.latent_parallel``): the activations' all-gather, the
    all-reduce of the partial prefix reconstructions ((L + 1) N d in the compute dtype), BatchTopK's
    reductions, b_dec's gradient through the encoder (d fp32), the gradient norm (one fp32), the
    step's L0 counts (2 fp32), dead fraction (one fp32) and dead-latent total (one int64); while
    latents are dead, AuxK's all-gather of every process's per-token top aux_k values (a P N aux_k
    fp32 result), the all-reduce of its [N, d] reconstruction and a second b_dec gradient. The
    backward sends nothing else: each process's latents get their whole gradient locally."""
    P, N, d = shape.processes, shape.tokens, shape.d_in
    sent = activation_gather_bytes(shape) + all_reduce_bytes(shape.groups * N * d * shape.compute_bytes, P)
    sent += batch_topk_bytes(P) + all_reduce_bytes(d * FP32, P) + all_reduce_bytes(FP32, P)
    sent += all_reduce_bytes(2 * FP32, P) + all_reduce_bytes(FP32, P) + all_reduce_bytes(INT64, P)
    if dead_latents:
        sent += all_gather_bytes(P * N * shape.aux_k * FP32, P) + all_reduce_bytes(N * d * shape.compute_bytes, P)
        sent += all_reduce_bytes(d * FP32, P)
    return sent


def sae_parallel_bytes(shape: StepShape) -> float:
    """SAE-parallel: the activations' all-gather alone (one stream for every SAE a process trains);
    whole SAEs need no gradient traffic."""
    return activation_gather_bytes(shape)


def bytes_per_step(mode: StageMode, shape: StepShape, dead_latents: bool = True) -> float:
    """Bytes one process sends per optimisation step of a stage in ``mode`` (0 on one process)."""
    if shape.processes == 1:
        return 0.0
    if mode is StageMode.LATENT_PARALLEL:
        return latent_parallel_bytes(shape, dead_latents)
    if mode is StageMode.SAE_PARALLEL:
        return sae_parallel_bytes(shape)
    return ddp_bytes(shape, dead_latents)


def sae_rounds(saes: int, processes: int, mode: StageMode) -> int:
    """SAEs one process trains in a stage of ``saes`` independent SAEs: all of them one after
    the other in DDP or latent-parallel, ceil(saes / P) side by side (one activation stream) in
    SAE-parallel."""
    return math.ceil(saes / processes) if mode is StageMode.SAE_PARALLEL else saes


GRADIENT_BUCKET_BYTES = 25 * 2**20  # DDP's default bucket: one all-reduce per 25 MiB of gradients


def collectives_per_step(mode: StageMode, shape: StepShape, dead_latents: bool = True) -> int:
    """Collectives one process takes part in per optimisation step (each has a fixed latency):
    BatchTopK's 9 (budget, bound, candidates, 4 histograms, entries above, ties) in DDP and
    latent-parallel; DDP's dead-latent counts and gradient buckets (and AuxK's two); latent-parallel's
    gather, prefix reduce, b_dec gradient, norm, L0 counts, dead fraction and dead total (and AuxK's
    three); SAE-parallel's one gather."""
    if shape.processes == 1:
        return 0
    if mode is StageMode.SAE_PARALLEL:
        return 1
    batch_topk = 9
    if mode is StageMode.LATENT_PARALLEL:
        return batch_topk + 7 + 3 * dead_latents
    return batch_topk + 1 + math.ceil(gradient_bytes(shape) / GRADIENT_BUCKET_BYTES) + 2 * dead_latents
