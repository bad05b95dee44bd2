"""The transfer stage (Algorithm 3): fresh DMSAEs from the distilled core at every k, and the SAEs
they are compared with (the controls and the plain Matryoshka baselines), each a stage folder under
transfer/ (``trainer.run.stages.final_saes``; the kinds: ``trainer.run.kinds``)."""

from __future__ import annotations

from accelerate.utils import set_seed

from modeling_dmsae import DMSAEModel
from trainer.config import DistillConfig
from trainer.harvest.harvested import Harvest
from trainer.pipeline.context import RunContext
from trainer.pipeline.evaluation import evaluate, save_stage
from trainer.pipeline.training import train_stage
from trainer.run.kinds import Core, CoreRequest
from trainer.run.metrics_file import SAEMetrics
from trainer.run.stages import FinalSAE, core_seed, cycle0_sae_config, final_saes, stage_seed


def transfer(run: RunContext, core: Core, harvest: Harvest) -> None:
    """Train, evaluate and save every final SAE not finished yet."""
    for final in final_saes(run.config):
        if run.paths.transfer(final.name).exists():
            run.finish_stage(final.stage)  # a kill may have landed before its checkpoint was removed
            continue
        set_seed(stage_seed(run.config, final.stage))  # by name: the same SAE whatever else transfer.ks or .seeds list
        train_final_sae(run, final, core, harvest)


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


def train_final_sae(run: RunContext, final: FinalSAE, core: Core, harvest: Harvest) -> None:
    model = initial_model(run.config, final, core, harvest.d_in, harvest.normalization_factor)
    with run.timer.timed("transfer training"):
        model, training_metrics = train_stage(run, final.stage, model.to(run.accelerator.device), run.config.transfer.tokens, harvest)
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
