"""The transfer stage (Algorithm 3): fresh DMSAEs from the distilled core at every k, and the
comparison SAEs (the random-core control, the sparse-core variant, the plain Matryoshka
baselines), each a stage folder under transfer/ (``trainer.run.plan.final_runs``)."""

from __future__ import annotations

from accelerate.utils import set_seed

from modeling_dmsae import DMSAEModel
from trainer.harvest.run_data import RunData
from trainer.pipeline.context import RunContext
from trainer.pipeline.cores import Core
from trainer.pipeline.evaluation import evaluate, save_stage
from trainer.pipeline.training import train_stage
from trainer.run.plan import FinalRun, cycle0_sae_config, final_runs


def transfer(run: RunContext, core: Core, data: RunData) -> None:
    """Train, evaluate and save every final SAE not finished yet."""
    for index, final in enumerate(final_runs(run.config)):
        if run.paths.transfer(final.name).exists():
            run.finish_stage(final.stage)  # a kill may have landed before its checkpoint was removed
            continue
        set_seed(run.config.run.seed + 1000 + index)
        train_final_sae(run, final, core, data)


def train_final_sae(run: RunContext, final: FinalRun, core: Core, data: RunData) -> None:
    cycle = run.config.cycles.num_cycles + 1
    lineage = {"distilled": core.lineage, "random": [[cycle, j] for j in range(len(core.lineage))], "none": []}[final.core]
    sae_config = cycle0_sae_config(run.config, data.d_in).with_core(
        lineage, cycle=cycle, k=final.k, variant=final.variant, normalization_factor=data.normalization_factor
    )
    # The random control keeps the random unit directions DMSAEModel initialises its core with.
    model = DMSAEModel.from_core(sae_config, core.directions) if final.core == "distilled" else DMSAEModel(sae_config)
    with run.timer.timed("transfer training"):
        model, training_metrics = train_stage(run, final.stage, model.to(run.accelerator.device), run.config.transfer.tokens, data)
    with run.timer.timed("evaluation"):
        metrics, evidence = evaluate(run, model, data, final.name, per_latent_evidence=True)
    metrics.update(
        core_size=sae_config.core_size, k=final.k, k_noncore=sae_config.k_noncore, core=final.core, variant=final.variant, **training_metrics
    )
    save_stage(run, run.paths.transfer(final.name), model, metrics, evidence=evidence)
    run.finish_stage(final.stage)
