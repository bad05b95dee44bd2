"""What a run trains, from its configuration alone: the final SAEs (:func:`final_runs`), the
DMSAE configuration of cycle 0, the optimisation steps of a stage and the world size. The
pipeline, the report, the dry run and the checks before loading all read it here."""

from __future__ import annotations

import math
import os
import zlib
from typing import NamedTuple

from modeling_dmsae import DMSAEConfig
from modeling_dmsae.configuration_dmsae import matryoshka_group_sizes
from trainer.config import DistillConfig
from trainer.errors import ConfigError

CORE_KINDS = ("distilled", "random", "none")


def world_size() -> int:
    """Processes of this launch (``accelerate launch`` sets WORLD_SIZE), 1 for plain python: the
    one source of the process count the step counts, the calibration and the plan use."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def planned_processes(config: DistillConfig) -> int:
    """The processes the plan is for: plan.num_processes, or this launch's."""
    return config.plan.num_processes or world_size()


def stage_seed(config: DistillConfig, stage: str, purpose: str = "") -> int:
    """The seed of a stage's initialisation (``purpose`` ""), data order, calibration or random
    core: ``run.seed`` and the stage's name decide it, not its position, so the same named SAE comes
    out the same whatever else the run trains."""
    return zlib.crc32(f"{config.run.seed}/{stage}{purpose}".encode())


class BatchShape(NamedTuple):
    """How the global batch of ``cycles.batch_size`` tokens per optimisation step is cut: into
    ``accumulation`` micro-batches, each the same share of every data lane, each process taking
    the lanes ``p, p + P, ...``. None of the sizes but ``per_process`` depends on P."""

    batch_size: int
    """Tokens per optimisation step, all processes together."""
    accumulation: int
    lanes: int
    processes: int

    @property
    def micro_batch(self) -> int:
        """Tokens per micro-batch, all processes together (what BatchTopK selects over)."""
        return self.batch_size // self.accumulation

    @property
    def per_lane(self) -> int:
        return self.micro_batch // self.lanes

    @property
    def per_process(self) -> int:
        """Tokens of one process's micro-batch."""
        return self.micro_batch // self.processes

    def lanes_of(self, process_index: int) -> range:
        return range(process_index, self.lanes, self.processes)


def batch_shape(config: DistillConfig, processes: int | None = None) -> BatchShape:
    """The run's batch on ``processes`` (default: this launch's); ConfigError when they cannot share
    the data lanes evenly (config.validate has checked the batch against the lanes)."""
    processes = processes or world_size()
    lanes = config.cycles.data_lanes
    if lanes % processes:
        raise ConfigError(
            f"{processes} processes cannot share --cycles.data_lanes {lanes} evenly: launch a number of processes that "
            f"divides it, or set --cycles.data_lanes to a multiple of {processes} (another data order: the SAEs then "
            "differ from a run with the old value)"
        )
    return BatchShape(config.cycles.batch_size, config.run.gradient_accumulation_steps, lanes, processes)


def steps_for(tokens: int, config: DistillConfig) -> int:
    """Micro-batches (every process takes the same number) that consume ``tokens`` as a whole
    number of optimisation steps of ``cycles.batch_size`` tokens: independent of the world size."""
    accumulation = config.run.gradient_accumulation_steps
    return max(1, math.ceil(tokens / config.cycles.batch_size)) * accumulation


def calibration_batches(config: DistillConfig) -> int:
    """Micro-batches the inference threshold is calibrated on (optimizer.calibration_tokens, all
    processes together)."""
    return max(1, config.optimizer.calibration_tokens // batch_shape(config, 1).micro_batch)


class FinalRun(NamedTuple):
    """One SAE of the transfer stage: its folder under ``transfer/``, sparsity k, masking variant,
    which core it starts from: ``distilled`` (C*, Algorithm 3), ``random`` (the Figure-3
    control: random unit directions, frozen, of |C*| latents) or ``none`` (the plain Matryoshka
    baseline, c = 0), and its seed (one of transfer.seeds)."""

    name: str
    k: int
    variant: str
    core: str
    seed: int = 0

    @classmethod
    def of(cls, k: int, variant: str, core: str, seed: int = 0) -> FinalRun:
        """The final SAE at ``k``, ``variant``, ``core`` and ``seed``, named as its folder is."""
        name = {"distilled": f"k-{k:04d}-{variant}", "random": f"random-core-k-{k:04d}", "none": f"baseline-k-{k:04d}"}[core]
        return cls(name + (f"-seed-{seed}" if seed else ""), k, variant, core, seed)

    @classmethod
    def from_metrics(cls, metrics: dict) -> FinalRun:
        """The final SAE a transfer folder's metrics.json describes."""
        return cls.of(metrics["k"], metrics["variant"], metrics["core"], seed_of(metrics))

    @property
    def stage(self) -> str:
        """Name of its training stage (checkpoints and logs); the seed is part of it, so
        :func:`stage_seed` draws another initialisation, data order and random core for each seed."""
        return f"transfer-{self.name}"

    @property
    def comparison(self) -> tuple[int, str, str]:
        """What it is apart from its seed: the SAEs the report aggregates over seeds."""
        return self.k, self.variant, self.core


def seed_of(metrics: dict) -> int:
    """The transfer seed of a final SAE's metrics.json (one written before transfer seeds existed
    names none: seed 0)."""
    return metrics.get("seed", 0)


def final_runs(config: DistillConfig) -> list[FinalRun]:
    """Every SAE the transfer stage trains, in training order: seed by seed (transfer.seeds), so
    that a run stopped early has whole seeds.

    The DMSAEs at each k in transfer.ks and variant; with transfer.random_core_control, the
    dense distilled core against a random core at the distillation k (Figure 3); with
    transfer.sparsity_matched, the sparse-core variant at the distillation k (global L0 = k, as the
    baseline's); with transfer.baseline, a plain Matryoshka SAE (c = 0) at every k trained above.
    """
    transfer, k = config.transfer, config.cycles.k
    kinds = [(kk, variant, "distilled") for kk in transfer.ks for variant in transfer.variants]
    comparisons = [(k, "dense_core")] * transfer.random_core_control + [(k, "sparse_core")] * transfer.sparsity_matched
    for kk, variant in comparisons:
        if (kk, variant, "distilled") not in kinds:
            kinds.append((kk, variant, "distilled"))
    if transfer.random_core_control:
        kinds.append((k, "dense_core", "random"))
    if transfer.baseline:
        kinds += [(kk, "dense_core", "none") for kk in sorted({kk for kk, _, _ in kinds})]
    return [FinalRun.of(*kind, seed=seed) for seed in transfer.seeds for kind in kinds]


def cycle0_sae_config(config: DistillConfig, d_in: int) -> DMSAEConfig:
    """The DMSAE configuration of a from-scratch cycle 0 (validates the dictionary settings)."""
    dictionary = config.dictionary
    return DMSAEConfig(
        d_in=d_in,
        num_latents=dictionary.num_latents,
        core_size=0,
        group_sizes=matryoshka_group_sizes(dictionary.num_latents, dictionary.group_fractions),
        k=config.cycles.k,
        variant=config.cycles.variant,
        aux_k=dictionary.aux_k,
        aux_alpha=dictionary.aux_alpha,
        dead_tokens_threshold=dictionary.dead_tokens_threshold,
        base_model_id=config.model.model_id,
        base_model_file=config.model.model_file,
        hook_module=config.model.hook_module,
        mask_bos=config.data.mask_bos,
        max_norm_ratio=config.harvest.max_norm_ratio,
    )
