"""The transfer stage (Algorithm 3): fresh DMSAEs from the distilled core at every k, and the
comparison SAEs (the random-core control, the sparse-core variant, the plain Matryoshka
baselines), each a stage folder under transfer/ (``trainer.run.plan.final_runs``)."""

from __future__ import annotations

from accelerate.utils import set_seed

from modeling_dmsae import DMSAEModel
from trainer.config import DistillConfig
from trainer.harvest.run_data import RunData
from trainer.pipeline.context import RunContext
from trainer.pipeline.cores import Core, random_core
from trainer.pipeline.evaluation import evaluate, save_stage
from trainer.pipeline.training import train_stage
from trainer.run.plan import FinalRun, cycle0_sae_config, final_runs, stage_seed


def transfer(run: RunContext, core: Core, data: RunData) -> None:
    """Train, evaluate and save every final SAE not finished yet."""
    for final in final_runs(run.config):
        if run.paths.transfer(final.name).exists():
            run.finish_stage(final.stage)  # a kill may have landed before its checkpoint was removed
            continue
        set_seed(stage_seed(run.config, final.stage))  # by name: the same SAE whatever else transfer.ks or .seeds list
        train_final_sae(run, final, core, data)


def initial_model(config: DistillConfig, final: FinalRun, core: Core, d_in: int, normalization_factor: float) -> DMSAEModel:
    """A final SAE before training. Every kind goes through ``DMSAEModel.from_core`` (frozen core
    rows copied in, everything else freshly initialised, the decoder unrelated to the core rows),
    so the distilled core, the random-core control and the baseline (no core) differ only in the
    frozen rows. Draws from the global RNG: seed it first (by the stage's name)."""
    cycle = config.cycles.num_cycles + 1
    start = {
        "distilled": core,
        "random": random_core(core, cycle, stage_seed(config, final.stage, "/random core")),
        "none": Core(core.directions[:0], []),
    }[final.core]
    sae_config = cycle0_sae_config(config, d_in).with_core(
        start.lineage, cycle=cycle, k=final.k, variant=final.variant, normalization_factor=normalization_factor
    )
    return DMSAEModel.from_core(sae_config, start.directions)


def train_final_sae(run: RunContext, final: FinalRun, core: Core, data: RunData) -> None:
    model = initial_model(run.config, final, core, data.d_in, data.normalization_factor)
    with run.timer.timed("transfer training"):
        model, training_metrics = train_stage(run, final.stage, model.to(run.accelerator.device), run.config.transfer.tokens, data)
    with run.timer.timed("evaluation"):
        metrics, evidence = evaluate(run, model, data, final.name, per_latent_evidence=True)
    sae_config = model.config
    metrics.update(
        core_size=sae_config.core_size, k=final.k, k_noncore=sae_config.k_noncore, core=final.core, variant=final.variant, seed=final.seed,
        **training_metrics,
    )
    save_stage(run, run.paths.transfer(final.name), model, metrics, evidence=evidence)
    run.finish_stage(final.stage)
