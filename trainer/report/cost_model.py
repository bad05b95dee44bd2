"""Wall time of a run's stages on a kind of device never measured, estimated from its published
peak rates (``specifications`` in ``throughputs.json``) and the bytes each stage's mode sends
(``trainer.run.parallelism``): for the run's own design (each stage's mode, its compute dtype, its
activation source) and for plain DDP in float32 reading cached activations, priced the same way."""

from __future__ import annotations

from typing import NamedTuple

from trainer.config import DistillConfig
from trainer.run.parallelism import (
    FP32,
    StageMode,
    StepShape,
    bytes_per_step,
    collectives_per_step,
    cycle_mode,
    deal,
    transfer_mode,
)
from trainer.run.stages import batch_shape, final_saes, steps_for

# What these kernels reach of the peak rates (assumed, not measured): large dense GEMMs ~60% of the
# tensor-core peak, streaming kernels (Adam, elementwise passes, row gathers) ~70% of HBM, NCCL ring
# collectives inside an NVLink node ~70% of the one-way link rate.
GEMM_EFFICIENCY = 0.6
MEMORY_EFFICIENCY = 0.7
LINK_EFFICIENCY = 0.7
COLLECTIVE_LATENCY_S = 20e-6  # the fixed cost of one NCCL collective inside a node
# Per SAE and optimisation step: ~200 kernel launches of a few microseconds, and the host reads of
# BatchTopK's radix select (each round's digit), which stop the CPU from running ahead.
STEP_OVERHEAD_S = 1e-3
# The node's local disk (the activation cache): no GPU's specification says it; one PCIe 4 NVMe
# drive writes ~3 GB/s. A RAID of several drives is faster: this is the cautious figure.
DISK_BYTES_PER_S = 3e9
# A checkpoint written in the background stalls training only for its copy to host memory: PCIe 5
# x16 moves ~50 GB/s each way; half of it is the cautious figure.
HOST_COPY_BYTES_PER_S = 25e9
# Memory traffic per fp32 parameter a process holds: the backward writes its gradient (4), fused
# Adam reads parameter, gradient and both moments (16) and writes parameter and moments (12); the
# decoder's unit-norm constraint reads and writes each W_dec element and its gradient (~20).
ADAM_BYTES_PER_PARAMETER = 32
DECODER_CONSTRAINT_BYTES_PER_PARAMETER = 20
# The sparse decode and its backward gather a d-row of W_dec per kept entry twice from HBM (forward,
# and the codes' gradient); the other gathers read [N, d] tables that stay in the 50 MB L2.
SPARSE_ROW_PASSES = 2
PREACTIVATION_PASSES = 4  # the dense [N, K] pre-activations: written, ReLU'd, bounded, candidates read


class BaseModelSpec(NamedTuple):
    """A base model's size, for its FLOPs per token (2 per parameter in a forward)."""

    parameters: float
    layers: int
    source: str


BASE_MODELS = {
    # 2.6B parameters (2.0B in the 26 blocks, 0.59B in the tied 256k x 2304 embedding). A forward up to
    # layer 12 is counted as 2 x 2.6e9 x 13/26 FLOPs per token: the embedding lookup costs nothing, so
    # this overcounts ~0.6 GFLOP per token (a cautious figure).
    "google/gemma-2-2b": BaseModelSpec(2.6e9, 26, "Gemma 2 technical report (arXiv:2408.00118), Table 1"),
}


class Machine(NamedTuple):
    """One device's published peak rates."""

    bf16_flops_per_s: float
    tf32_flops_per_s: float
    fp32_flops_per_s: float
    memory_bytes_per_s: float
    link_bytes_per_s: float
    sources: list[str]

    def gemm_s(self, flops: float, bf16: bool) -> float:
        """A dense GEMM: bf16 on tensor cores, or float32 as PyTorch runs it by default (no TF32)."""
        return flops / ((self.bf16_flops_per_s if bf16 else self.fp32_flops_per_s) * GEMM_EFFICIENCY)

    def memory_s(self, size: float) -> float:
        return size / (self.memory_bytes_per_s * MEMORY_EFFICIENCY)

    def link_s(self, size: float, collectives: int) -> float:
        return size / (self.link_bytes_per_s * LINK_EFFICIENCY) + collectives * COLLECTIVE_LATENCY_S


def machine_from(specifications: dict) -> Machine:
    return Machine(*(float(specifications[name]) for name in Machine._fields[:-1]), specifications.get("sources", []))


class Design(NamedTuple):
    """How the SAE stages run: their modes, compute dtype and activation source."""

    name: str
    cycle: StageMode
    transfer: StageMode
    bf16: bool
    streamed: bool
    background_checkpoints: bool


def designs(config: DistillConfig, processes: int, bf16: bool) -> tuple[Design, Design]:
    """(the run's design, today's: every SAE stage DDP in float32 on cached activations)."""
    run = Design("this run", cycle_mode(config, processes), transfer_mode(config, processes), bf16, config.run.stream_activations, True)
    return run, Design("plain DDP", StageMode.DDP, StageMode.DDP, False, False, False)


class StageCost(NamedTuple):
    """One stage's estimate: its mode, one process's bytes sent per step, seconds, and its basis."""

    mode: str
    bytes_per_step: float | None
    seconds: float
    basis: str


def forward_flops(config: DistillConfig, full: bool = False) -> float:
    """FLOPs per token of the base model's forward up to the hook (or the whole model); 0 for a
    model not in BASE_MODELS (the plan then leaves its passes out and says so)."""
    spec = BASE_MODELS.get(config.model.model_id)
    if spec is None:
        return 0.0
    layer = int(config.model.hook_module.rsplit(".", 1)[-1]) if config.model.hook_module.rsplit(".", 1)[-1].isdigit() else spec.layers - 1
    return 2 * spec.parameters * (1.0 if full else (layer + 1) / spec.layers)


def step_shape(config: DistillConfig, d_in: int, processes: int, bf16: bool) -> StepShape:
    """The step the byte counts price: the global micro-batch, c = 0 (the core is unknown before selection)."""
    shape = batch_shape(config, processes)
    storage = 2 if config.harvest.storage_dtype in ("bfloat16", "float16") else 4
    groups = len(config.dictionary.group_fractions)
    aux_k = config.dictionary.aux_k or d_in // 2
    return StepShape(d_in, config.dictionary.num_latents, shape.micro_batch, processes, groups, aux_k, 0, storage, 2 if bf16 else FP32)


def sae_compute_s(machine: Machine, shape: StepShape, mode: StageMode, k: int, bf16: bool) -> float:
    """One process's compute for one SAE's micro-step: the encoder GEMM over its tokens and latents,
    the sparse decode and backward (memory-bound row gathers or their FLOPs, whichever is slower),
    Adam and the decoder constraint over the parameters it holds, and the dense pre-activations."""
    P, N, K, d = shape.processes, shape.tokens, shape.num_latents, shape.d_in
    tokens, latents = (N // P, K) if mode is StageMode.DDP else (N, K // P) if mode is StageMode.LATENT_PARALLEL else (N, K)
    entries = tokens * k * latents / K
    sparse = max(machine.gemm_s(6 * entries * d, False), machine.memory_s(SPARSE_ROW_PASSES * entries * d * FP32))
    decoder = latents * d
    memory = (2 * decoder + latents + d) * ADAM_BYTES_PER_PARAMETER + decoder * DECODER_CONSTRAINT_BYTES_PER_PARAMETER
    memory += PREACTIVATION_PASSES * tokens * latents * FP32
    return machine.gemm_s(2 * tokens * d * latents, bf16) + sparse + machine.memory_s(memory) + STEP_OVERHEAD_S


def stage_step_s(config: DistillConfig, machine: Machine, shape: StepShape, mode: StageMode, ks: list[int], design: Design) -> tuple[float, float]:
    """(seconds, bytes sent) of one optimisation step of a process training the SAEs at ``ks`` side
    by side on one activation stream: their compute, the mode's collectives, and the activations
    (streamed: the base model's forward of N/P tokens; cached: the node's disk read, prefetched in
    the background so only the slower of it and the step counts)."""
    sent = bytes_per_step(mode, shape)
    busy = sum(sae_compute_s(machine, shape, mode, k, design.bf16) for k in ks)
    busy += machine.link_s(sent, collectives_per_step(mode, shape))
    source = shape.tokens * shape.d_in * shape.storage_bytes
    if design.streamed:
        return busy + machine.gemm_s(shape.tokens / shape.processes * forward_flops(config), True), sent
    return max(busy, source / DISK_BYTES_PER_S), sent


def checkpoint_s(config: DistillConfig, shape: StepShape, mode: StageMode, saes: int, steps: int, background: bool) -> tuple[float, str]:
    """(seconds, what) the stage's training checkpoints stall it: every ``run.checkpoint_every``
    optimisation steps, the weights and both Adam moments (3 fp32 values per parameter) of the SAEs
    a process writes while the others wait (DDP: the main process, the whole SAE; latent-parallel:
    every process its 1/P of the latents at once, to disk; SAE-parallel: every process its own SAEs
    at once). Written in the background (``background``; not latent-parallel shards), a checkpoint
    stalls training only for its copy to host memory."""
    parameters = 2 * shape.num_latents * shape.d_in + shape.num_latents + shape.d_in
    latent_parallel = mode is StageMode.LATENT_PARALLEL
    written = 3 * FP32 * parameters * (1 / shape.processes if latent_parallel else 1.0) * saes
    count = steps // config.run.gradient_accumulation_steps // config.run.checkpoint_every
    copied = background and not latent_parallel
    seconds = count * written / (HOST_COPY_BYTES_PER_S if copied else DISK_BYTES_PER_S)
    how = "copied to host memory, written in the background" if copied else "written to disk"
    return seconds, f"{count:,} checkpoint(s) of {written / 1e9:.2f} GB per process {how}, {seconds / 60:.1f} min"


def training_costs(config: DistillConfig, machine: Machine, d_in: int, processes: int, design: Design, trained_cycles: int) -> dict[str, StageCost]:
    """The cycle and transfer training stages of ``design``, their checkpoints included."""
    shape = step_shape(config, d_in, processes, design.bf16)
    dtype = "bf16" if design.bf16 else "fp32"
    source = "streamed from the base model" if design.streamed else "read from the cache on disk"
    steps = steps_for(config.cycles.tokens_per_cycle, config)
    cycle_s, cycle_sent = stage_step_s(config, machine, shape, design.cycle, [config.cycles.k], design)
    saved_s, saved = checkpoint_s(config, shape, design.cycle, 1, steps, design.background_checkpoints)
    costs = {
        "cycle training": StageCost(
            design.cycle.value, cycle_sent, trained_cycles * (steps * cycle_s + saved_s),
            f"{trained_cycles} SAE(s) x ({steps:,} steps x {cycle_s * 1e3:.1f} ms + {saved}) = "
            f"{(steps * cycle_s + saved_s) / 3600:.2f} h per cycle ({dtype}, activations {source})",
        )
    }  # fmt: skip
    finals, steps = final_saes(config), steps_for(config.transfer.tokens, config)
    if design.transfer is StageMode.SAE_PARALLEL:
        seconds, timed = 0.0, []
        for seed in sorted({final.seed for final in finals}):
            ks = [final.k for final in finals if final.seed == seed]
            groups = [[ks[index] for index in indices] for indices in deal(ks, processes) if indices]
            seed_timed = [(stage_step_s(config, machine, shape, design.transfer, group, design), len(group)) for group in groups]
            most = max(n for _, n in seed_timed)
            saved_s = checkpoint_s(config, shape, design.transfer, most, steps, design.background_checkpoints)[0]
            seconds += steps * max(step for (step, _), _ in seed_timed) + saved_s
            timed += seed_timed  # the slowest process decides when the next seed starts
        sent = timed[0][0][1]
        slowest, most = max(step for (step, _), _ in timed), max(n for _, n in timed)
        basis = (
            f"{len(finals)} SAE(s) dealt to {processes} processes, up to {most} side by side on one stream, x {steps:,} "
            f"steps, slowest process {slowest * 1e3:.1f} ms per step + {checkpoint_s(config, shape, design.transfer, most, steps, design.background_checkpoints)[1]} "
            f"per seed ({dtype}, activations {source})"
        )
    else:
        timed = [stage_step_s(config, machine, shape, design.transfer, [final.k], design) for final in finals]
        saved_s, saved = checkpoint_s(config, shape, design.transfer, 1, steps, design.background_checkpoints)
        seconds, sent = steps * sum(step for step, _ in timed) + len(finals) * saved_s, timed[0][1]
        average_ms = sum(step for step, _ in timed) / len(finals) * 1e3
        basis = f"{len(finals)} SAE(s) one after another x ({steps:,} steps x {average_ms:.1f} ms on average + {saved}) ({dtype}, activations {source})"
    costs["transfer training"] = StageCost(design.transfer.value, sent, seconds, basis)
    return costs


def harvest_cost(config: DistillConfig, machine: Machine, d_in: int, processes: int, design: Design, train_tokens: int, other_tokens: tuple[int, int, int]) -> StageCost:
    """The base model's passes: loading, the training activations (split over the processes; written
    to the cache unless streamed), the (x, g) sample (forward and backward: ~3 full forwards), the
    held-out activations and the spliced-loss baseline on the main process."""
    forward, full, spec = forward_flops(config), forward_flops(config, full=True), BASE_MODELS[config.model.model_id]
    attribution, held_out, ce = other_tokens
    load = spec.parameters * 2 / DISK_BYTES_PER_S
    train = 0.0
    if not design.streamed:
        train = max(machine.gemm_s(train_tokens / processes * forward, True), train_tokens * d_in * 2 / DISK_BYTES_PER_S)
    rest = machine.gemm_s(attribution / processes * 3 * full + held_out * forward + 2 * ce * full, True)
    basis = (
        f"{forward / 1e9:.1f} GFLOP per token to the hook, {full / 1e9:.1f} for the whole model ({spec.source}), bf16"
        + ("; training activations streamed in each stage" if design.streamed else f"; cache written at {DISK_BYTES_PER_S / 1e9:.0f} GB/s")
    )
    return StageCost("base model", None, load + train + rest, basis)


def main_process_costs(config: DistillConfig, machine: Machine, d_in: int, selected: int, evaluated: int, ce_tokens: int) -> dict[str, StageCost]:
    """Attribution and evaluation, on the main process alone: the encoder over the sample (and g's
    product with W_dec) per selected cycle, and per evaluated SAE the encoder over the held-out
    tokens plus the spliced and zero-ablated next-token losses (two full forwards)."""
    K = config.dictionary.num_latents
    attribution_tokens = config.harvest.attribution_tokens
    select = machine.gemm_s(2 * 2 * attribution_tokens * d_in * K, True) + machine.memory_s(PREACTIVATION_PASSES * attribution_tokens * K * FP32)
    evaluate = machine.gemm_s(2 * config.eval.tokens * d_in * K + 2 * ce_tokens * forward_flops(config, full=True), True)
    evaluate += machine.memory_s(PREACTIVATION_PASSES * config.eval.tokens * K * FP32)
    return {
        "attribution": StageCost("main process", None, selected * select, f"{selected} selection(s) x {select:.1f} s"),
        "evaluation": StageCost("main process", None, evaluated * evaluate, f"{evaluated} SAE(s) x {evaluate:.1f} s"),
    }
