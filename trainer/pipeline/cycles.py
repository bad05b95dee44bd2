"""Distillation (Algorithms 1 and 2): cycle 0, then cycles 1..T, each trained with the previous
core frozen and followed by attribution-guided selection of the next core; then the distilled
core C* = C(T) ∩ C(T-1) (Eq. 8). Each cycle is a stage folder; a finished one is loaded, never
recomputed."""

from __future__ import annotations

import torch
from accelerate.utils import broadcast_object_list, set_seed

from modeling_dmsae import DMSAEModel
from modeling_dmsae.configuration_dmsae import largest_core
from trainer.errors import ConfigError
from trainer.harvest.harvested import Harvest
from trainer.harvest.hub_access import resolve_checkpoint
from trainer.pipeline.context import RunContext
from trainer.pipeline.cores import (
    check_compatible,
    load_core,
    load_finished_cycle,
    read_cycle0_checkpoint,
    save_core,
    with_run_settings,
)
from trainer.pipeline.evaluation import evaluate, save_stage
from trainer.pipeline.training import train_stage
from trainer.run.files import atomic_folder, read_json
from trainer.run.kinds import Core
from trainer.run.layout import CORE_JSON, cycle_stage
from trainer.run.metrics_file import SAEMetrics
from trainer.run.parallelism import cycle_mode
from trainer.run.stages import cycle0_sae_config, stage_seed
from trainer.sae.selection import CoreSelection, distilled_core, select_core


def select(run: RunContext, sae: DMSAEModel, harvest: Harvest) -> CoreSelection:
    """Algorithm 2 on the main process, shared with every process (identical cores everywhere)."""
    result = [None]
    if run.is_main:
        c = run.config.cycles
        result[0] = select_core(sae, harvest.attribution_x, harvest.attribution_g, c.quantile, c.tau, c.batch_size)
    return broadcast_object_list(result)[0]


def cycle_zero(run: RunContext, harvest: Harvest) -> tuple[DMSAEModel, bool]:
    """(cycle-0 SAE, whether it still needs training): an imported checkpoint, or a fresh c = 0 SAE."""
    checkpoint = run.config.cycles.cycle0_checkpoint
    if checkpoint:
        model = read_cycle0_checkpoint(resolve_checkpoint(checkpoint))
        check_compatible(model.config, harvest.d_in, harvest.hook_layer, run.config)
        return with_run_settings(model, run.config), False
    sae_config = cycle0_sae_config(run.config, harvest.d_in)
    sae_config.normalization_factor = harvest.normalization_factor
    return DMSAEModel(sae_config), True


def train_cycle(run: RunContext, t: int, model: DMSAEModel, needs_training: bool, harvest: Harvest) -> tuple[DMSAEModel, list[int]]:
    """Train cycle t's SAE (Algorithm 1), select C(t) (Algorithm 2), evaluate, save; returns the
    trained SAE and C(t)."""
    stage, folder = cycle_stage(t), run.paths.cycle(t)
    training_metrics = {}
    if needs_training:
        with run.timer.timed("cycle training"):
            mode = cycle_mode(run.config, run.accelerator.num_processes)
            model, training_metrics = train_stage(run, stage, model, run.config.cycles.tokens_per_cycle, harvest, mode=mode)
    with run.timer.timed("attribution"):
        selection = select(run, model, harvest)
    with run.timer.timed("evaluation"):
        metrics, evidence = evaluate(run, model, harvest, stage)
    c = model.config.core_size
    metrics = SAEMetrics({
        **metrics,
        "core_size": c,
        "k_noncore": model.config.k_noncore,
        "selected_core_size": len(selection.selected),
        "carry_over": sum(j < c for j in selection.selected) / c if c else float("nan"),
        **training_metrics,
    })  # fmt: skip
    save_stage(run, folder, model, metrics, lambda partial: save_core(partial, t, selection, model, run.config), evidence)
    run.finish_stage(stage)
    run.publish(lambda publisher: publisher.push_cycle(t))
    return model, selection.selected


def check_core_fits(run: RunContext, t: int, model: DMSAEModel, selected: list[int]) -> None:
    """C(t) must fit in cycle t+1's dictionary, whose last Matryoshka group gives the core its
    latents (K is fixed). How many latents reach coverage tau is known only once C(t) is selected,
    so this is checked then; C(t) stays saved in its cycle folder."""
    limit = largest_core(model.config.group_sizes, model.config.core_size)
    if len(selected) > limit:
        raise ConfigError(
            f"--cycles.tau {run.config.cycles.tau}: cycle {t} selected {len(selected)} core latents, more than the "
            f"{limit} that fit in K = {model.config.num_latents}: the next cycle's core takes its latents from the last "
            f"Matryoshka group ({model.config.group_sizes[-1]} latents). Lower --cycles.tau, or give the last group more "
            "latents (--dictionary.group_fractions, --dictionary.num_latents)"
        )


def distill(run: RunContext, harvest: Harvest) -> Core:
    """Cycles 0..T, then C* = C(T) ∩ C(T-1)."""
    previous: tuple[DMSAEModel, list[int]] | None = None
    for t in range(run.config.cycles.num_cycles + 1):
        folder = run.paths.cycle(t)
        if folder.exists():  # finished before a restart
            model = load_finished_cycle(folder, t).to(run.accelerator.device)
            run.finish_stage(cycle_stage(t))  # a kill may have landed before its checkpoint was removed
            previous = (model, read_json(folder / CORE_JSON)["selected"])
            continue
        set_seed(stage_seed(run.config, cycle_stage(t)))
        if previous is None:
            model, needs_training = cycle_zero(run, harvest)
        else:
            check_core_fits(run, t - 1, *previous)
            model, needs_training = previous[0].next_cycle(previous[1], normalization_factor=harvest.normalization_factor), True
            previous = None  # cycle t-1's SAE is done once its core is copied: not kept through cycle t
        previous = train_cycle(run, t, model.to(run.accelerator.device), needs_training, harvest)
    return save_distilled_core(run, *previous)


def save_distilled_core(run: RunContext, final_model: DMSAEModel, final_selected: list[int]) -> Core:
    """C* = the latents of cycle T's frozen core that cycle T selects again (Eq. 8), saved once."""
    folder = run.paths.distilled_core
    finished = folder.exists()
    # Every process looks before the main one writes: nothing between here and the write is a
    # collective, so a slower process would otherwise find the folder and skip the barrier below.
    run.accelerator.wait_for_everyone()
    if not finished:
        num_cycles = run.config.cycles.num_cycles
        core_json = read_json(run.paths.cycle(num_cycles) / CORE_JSON)
        score_of = dict(zip(core_json["selected"], core_json["scores"]))
        indices = distilled_core(final_selected, final_model.config.core_size)
        if not indices:
            raise ConfigError(
                "the distilled core C* = C(T) ∩ C(T-1) is empty: cycle T re-selected none of its core. "
                "Train longer per cycle (--cycles.tokens_per_cycle), raise --cycles.tau, or use more cycles"
            )
        selection = CoreSelection(indices, [score_of[j] for j in indices], torch.tensor([]), torch.tensor([]))

        def write() -> None:
            with atomic_folder(folder) as partial:
                save_core(partial, num_cycles, selection, final_model, run.config)

        run.on_main(write)
    return load_core(folder)
