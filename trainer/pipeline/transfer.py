"""The transfer stage (Algorithm 3): fresh DMSAEs from the distilled core at every k, and the SAEs
they are compared with (the controls and the plain Matryoshka baselines), each a stage folder under
transfer/ (``trainer.run.stages.final_saes``; the kinds: ``trainer.run.kinds``)."""

from __future__ import annotations

from itertools import groupby
from operator import attrgetter

from accelerate.utils import set_seed

from modeling_dmsae import DMSAEModel
from trainer.config import DistillConfig
from trainer.harvest.harvested import Harvest
from trainer.pipeline.context import RunContext
from trainer.pipeline.evaluation import evaluate, save_stage
from trainer.pipeline.training import Trained, shared_from, train_in_lockstep, train_stage
from trainer.run.kinds import Core, CoreRequest
from trainer.run.metrics_file import SAEMetrics
from trainer.run.parallelism import StageMode, deal, transfer_mode
from trainer.run.stages import FinalSAE, core_seed, cycle0_sae_config, final_saes, stage_seed


def transfer(run: RunContext, core: Core, harvest: Harvest) -> None:
    """Train, evaluate and save every final SAE not finished yet, a transfer seed at a time (the
    SAEs of one seed read the same batches: ``FinalSAE.data_stage``), one SAE after another on
    every process (DDP or latent-parallel) or dealt to the processes (SAE-parallel:
    ``trainer.run.parallelism``)."""
    mode = transfer_mode(run.config, run.accelerator.num_processes)
    for _, finals in groupby(final_saes(run.config), key=attrgetter("seed")):
        unfinished = [final for final in finals if not finished(run, final)]
        if mode is StageMode.SAE_PARALLEL:
            train_dealt(run, unfinished, core, harvest)
        else:
            for final in unfinished:
                conclude(run, final, train_final_sae(run, final, core, harvest, mode), harvest)


def finished(run: RunContext, final: FinalSAE) -> bool:
    """Whether its folder is saved (a kill may have landed before its checkpoint was removed)."""
    if not run.paths.transfer(final.name).exists():
        return False
    run.finish_stage(final.stage)
    return True


def initial_model(config: DistillConfig, final: FinalSAE, core: Core, d_in: int, normalization_factor: float) -> DMSAEModel:
    """A final SAE before training. Every kind goes through ``DMSAEModel.from_core`` (frozen core
    rows copied in, everything else freshly initialised, the decoder unrelated to the core rows),
    so the kinds differ only in the frozen rows their registry entry makes from C* (and the variant
    and k it names). Draws from the global RNG: seed it first (by the stage's name)."""
    cycle = config.cycles.num_cycles + 1
    start = final.kind.frozen_core(CoreRequest(core, cycle, core_seed(config, final), final.factor, config.transfer))
    sae_config = cycle0_sae_config(config, d_in).with_core(
        start.lineage, cycle=cycle, k=final.k, variant=final.variant, normalization_factor=normalization_factor
    )
    return DMSAEModel.from_core(sae_config, start.directions)


def fresh_model(run: RunContext, final: FinalSAE, core: Core, harvest: Harvest) -> DMSAEModel:
    """Its initial model on the run's device, seeded by its stage's name: the same SAE whatever
    else transfer.ks or .seeds list, and whichever process trains it."""
    set_seed(stage_seed(run.config, final.stage))
    return initial_model(run.config, final, core, harvest.d_in, harvest.normalization_factor).to(run.accelerator.device)


def train_final_sae(run: RunContext, final: FinalSAE, core: Core, harvest: Harvest, mode: StageMode) -> Trained:
    """One final SAE trained by every process (DDP or latent-parallel)."""
    model = fresh_model(run, final, core, harvest)
    with run.timer.timed("transfer training"):
        return train_stage(run, final.stage, model, run.config.transfer.tokens, harvest, final.data_stage, mode)


def train_dealt(run: RunContext, finals: list[FinalSAE], core: Core, harvest: Harvest) -> None:
    """The SAE-parallel transfer of one seed's unfinished SAEs: dealt to the processes (``deal``),
    each training its own in lockstep on the all-gathered global batches (the batches one process
    reads, so each comes out bit for bit as one process trains it); then each is broadcast from
    its process and evaluated and saved as in DDP, in ``final_saes`` order."""
    if not finals:
        return
    dealt = deal([final.k for final in finals], run.accelerator.num_processes)
    owner = {index: process for process, indices in enumerate(dealt) for index in indices}
    models = {finals[index].stage: fresh_model(run, finals[index], core, harvest) for index in dealt[run.accelerator.process_index]}
    with run.timer.timed("transfer training"):
        trained = train_in_lockstep(run, models, run.config.transfer.tokens, harvest, finals[0].data_stage, StageMode.SAE_PARALLEL)
    for index, final in enumerate(finals):
        own = trained.get(final.stage) or (fresh_model(run, final, core, harvest), {})
        conclude(run, final, shared_from(owner[index], own), harvest)


def conclude(run: RunContext, final: FinalSAE, trained: Trained, harvest: Harvest) -> None:
    """Evaluate a trained final SAE, save its folder and drop its checkpoint."""
    model, training_metrics = trained
    with run.timer.timed("evaluation"):
        metrics, evidence = evaluate(run, model, harvest, final.name, per_latent_evidence=True)
    sae_config = model.config
    metrics = SAEMetrics(
        {**metrics, "core_size": sae_config.core_size, "k": final.k, "k_noncore": sae_config.k_noncore, **training_metrics},
        final.kind.name,
        final.seed,
        final.factor,
    )
    save_stage(run, run.paths.transfer(final.name), model, metrics, evidence=evidence)
    run.finish_stage(final.stage)
