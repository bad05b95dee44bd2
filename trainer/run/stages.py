"""What a run trains, from its configuration alone: the final SAEs (:func:`final_saes`), the
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
from trainer.run.kinds import (
    BASELINE,
    DMSAE_SPARSE_CORE,
    RANDOM_CORE,
    RANDOM_CORE_FIXED,
    RANDOM_CORE_SCALED,
    RANDOM_CORE_SPARSE,
    RESCALED_CORE,
    SAEKind,
    distilled_kind,
    kind_named,
    seed_suffix,
)
from trainer.run.metrics_file import SAEMetrics

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


class FinalSAE(NamedTuple):
    """One SAE of the transfer stage: its kind (``trainer.run.kinds``), sparsity k, seed (one of
    transfer.seeds) and, for a kind trained once per factor, its factor."""

    kind: SAEKind
    k: int
    seed: int = 0
    factor: float | None = None

    @classmethod
    def from_metrics(cls, metrics: SAEMetrics) -> FinalSAE:
        """The final SAE a transfer folder's metrics.json describes."""
        return cls(metrics.sae_kind, metrics.k, metrics.seed, metrics.factor)

    @property
    def name(self) -> str:
        """Its folder under transfer/."""
        return self.kind.folder_name(self.k, self.factor) + seed_suffix(self.seed)

    @property
    def label(self) -> str:
        return self.kind.label_for(self.factor)

    @property
    def stage(self) -> str:
        """Name of its training stage (checkpoints and logs); the seed is part of it, so
        :func:`stage_seed` draws another initialisation and random core for each seed."""
        return f"transfer-{self.name}"

    @property
    def data_stage(self) -> str:
        """The name its data order and calibration batches are seeded by (:func:`stage_seed`): its
        transfer seed's, not its own. Every final SAE of one seed reads the same tokens in the same
        order, so a control and the DMSAE it controls differ in their core alone, and the
        SAE-parallel transfer feeds all of them one all-gathered stream."""
        return "transfer" + seed_suffix(self.seed)

    @property
    def variant(self) -> str:
        return self.kind.variant


def core_seed(config: DistillConfig, final: FinalSAE) -> int:
    """The seed of a final SAE's random core: by its stage name, so each SAE draws its own; for a
    kind with the same core at every k, by run.seed and its transfer seed alone; for a kind that
    scales another's draws (``SAEKind.draws_as``), that kind's seed at the same k and transfer seed."""
    if final.kind.draws_as is not None:
        final = FinalSAE(kind_named(final.kind.draws_as), final.k, final.seed)
    name = final.kind.name + seed_suffix(final.seed) if final.kind.same_core_at_every_k else final.stage
    return stage_seed(config, name, "/random core")


Planned = tuple[SAEKind, int, float | None]  # a final SAE but its seed: kind, k, factor


def planned_controls(config: DistillConfig) -> list[Planned]:
    """The controls the settings ask for: the random core at the distillation k (Figure 3), there
    too in the sparse-core variant, the distilled core rescaled by each factor and (with the Figure-3
    control) the random core rescaled by the same factors; the random core
    that is the same at every k, at every k the dense-core DMSAE takes (transfer.ks and the
    distillation k), so that its consistency across k is measured over the same pairs of k."""
    transfer, k = config.transfer, config.cycles.k
    random = transfer.random_core_control
    planned: list[Planned] = [(RANDOM_CORE, k, None)] * random
    planned += [(RANDOM_CORE_SPARSE, k, None)] * (random and transfer.sparsity_matched and transfer.random_sparse_control)
    planned += [(RESCALED_CORE, k, factor) for factor in transfer.core_scale]
    planned += [(RANDOM_CORE_SCALED, k, factor) for factor in transfer.core_scale] * random
    planned += [(RANDOM_CORE_FIXED, kk, None) for kk in dict.fromkeys([*transfer.ks, k])] * transfer.random_core_every_k
    return planned


def final_saes(config: DistillConfig) -> list[FinalSAE]:
    """Every SAE the transfer stage trains, in training order: seed by seed (transfer.seeds), so
    that a run stopped early has whole seeds.

    The DMSAEs at each k in transfer.ks and variant; the kind each control
    (:func:`planned_controls`) controls, at its k; with transfer.sparsity_matched, the sparse-core DMSAE at the distillation k
    (global L0 = k, as the baseline's); the controls; the plain Matryoshka baseline (c = 0) at
    every k of transfer.baseline_ks and, with transfer.baseline, at every k trained above.
    """
    transfer, k = config.transfer, config.cycles.k
    planned: list[Planned] = [(distilled_kind(variant), kk, None) for kk in transfer.ks for variant in transfer.variants]
    asked = planned_controls(config)
    compared = [(kind_named(kind.controls), kk, factor if kind_named(kind.controls).takes_factor else None) for kind, kk, factor in asked]
    compared += [(DMSAE_SPARSE_CORE, k, None)] * transfer.sparsity_matched
    planned += [sae for sae in dict.fromkeys(compared) if sae not in planned and sae not in asked]
    planned += asked
    baseline_ks = {kk for _, kk, _ in planned} if transfer.baseline else set()
    planned += [(BASELINE, kk, None) for kk in sorted(baseline_ks | set(transfer.baseline_ks))]
    return [FinalSAE(kind, kk, seed, factor) for seed in transfer.seeds for kind, kk, factor in planned]


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
