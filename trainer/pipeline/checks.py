"""Everything that can be checked before the base model's weights are loaded or anything is
written: the folders, the dataset, every sparsity against K, the batch against the processes and
data lanes, the Hub repo names, the cycle-0 checkpoint. A dry run checks the same, except what
needs a Hub it cannot reach: it says what it skipped."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from modeling_dmsae.configuration_dmsae import hook_layer_index
from trainer.config import DistillConfig
from trainer.errors import ConfigError, CorruptRunFileError
from trainer.harvest.base_model import base_model_width
from trainer.harvest.cache import shard_count
from trainer.harvest.hub_access import checkpoint_on_hub, dataset_on_hub, hub_unreachable, model_on_hub, resolve_checkpoint, resolve_core
from trainer.harvest.text_corpus import load_text_dataset
from trainer.pipeline.cores import check_compatible, load_core, read_cycle0_checkpoint
from trainer.run.hub_names import run_repo_id, sae_repo_id
from trainer.run.layout import RunDirectory
from trainer.run.stages import batch_shape, cycle0_sae_config, final_saes, planned_processes


def known_core_size(config: DistillConfig) -> int | None:
    """Size of the core the transfer stage will start from, when it is known before any training."""
    if config.transfer.core:
        return len(load_core(resolve_core(config.transfer.core)).lineage)
    finished = RunDirectory(config.run.output_dir).distilled_core
    return len(load_core(finished).lineage) if config.run.resume and finished.exists() else None


def check_hook_layer(config: DistillConfig) -> int:
    try:
        return hook_layer_index(config.model.hook_module)
    except ValueError as error:
        raise ConfigError(f"--model.hook_module {config.model.hook_module}: {error}") from None


def _final_sae_configs(config: DistillConfig, d_in: int, core_size: int | None):
    """(final SAE, its core size, a function building the DMSAE configuration it will have) for
    every final SAE: a core of ``core_size`` latents (none when the size is not known yet)."""
    base = cycle0_sae_config(config, d_in)
    for final in final_saes(config):
        c = (core_size or 0) if final.kind.has_core else 0
        yield final, c, lambda c=c, final=final: base.with_core([[0, j] for j in range(c)], cycle=1, k=final.k, variant=final.variant)


def check_sparsities(config: DistillConfig, d_in: int) -> None:
    """Every k of every stage against K (and the core size when it is known): the DMSAE configs the
    stages will build, built now."""
    K = config.dictionary.num_latents
    try:
        cycle0_sae_config(config, d_in)
    except ValueError as error:
        raise ConfigError(f"--cycles.k {config.cycles.k} with --dictionary.num_latents {K}: {error}") from None
    core_size = known_core_size(config)
    for final, c, build in _final_sae_configs(config, d_in, core_size):
        try:
            build()
        except ValueError as error:
            core = f"a core of {c} latents" if core_size is not None or not final.kind.has_core else "the smallest possible core"
            raise ConfigError(
                f"--transfer.ks {final.k} ({final.name}) is impossible with --dictionary.num_latents {K} and {core}: {error}. "
                "Lower --transfer.ks or raise --dictionary.num_latents"
            ) from None


def check_hub_names(config: DistillConfig, d_in: int) -> None:
    """With --push-to-hub: the run repo and every final SAE's repo are valid Hub names, before
    days of training rather than at the first push."""
    if not config.hub.repo_id:
        return
    run_repo = run_repo_id(config.hub, RunDirectory(config.run.output_dir))
    for final, _, build in _final_sae_configs(config, d_in, known_core_size(config)):
        try:
            sae_repo_id(build(), final, run_repo, config.hub)
        except ValueError as error:
            raise ConfigError(
                f"--hub.sae_repo_pattern {config.hub.sae_repo_pattern!r} makes an invalid repo id for {final.name}: {error}"
            ) from None


def check_batch(config: DistillConfig) -> None:
    """The processes share the data lanes evenly, and every lane holds a training shard."""
    batch_shape(config, planned_processes(config))
    shards = shard_count(config.harvest.context_ranges(config.data.context_length).train, config.harvest)
    if shards < config.cycles.data_lanes:
        raise ConfigError(
            f"--cycles.data_lanes {config.cycles.data_lanes}: the training activations make only {shards} shards of "
            f"{config.harvest.contexts_per_shard} contexts, so some lane would be empty. Lower --cycles.data_lanes or "
            "--harvest.contexts_per_shard, or raise --harvest.train_tokens"
        )


def check_paths(config: DistillConfig) -> None:
    """The output folder and the cycle-0 checkpoint, before anything is loaded."""
    output = Path(config.run.output_dir).expanduser()
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--run.output_dir {output} is a file, not a folder: choose another --run.output_dir")
    parent = next(p for p in [output, *output.parents] if p.exists())
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"--run.output_dir {output}: {parent} is not writable: choose another --run.output_dir")
    if config.cycles.cycle0_checkpoint:
        checkpoint_on_hub(config.cycles.cycle0_checkpoint)  # refuses what is neither a path nor a Hub folder


class Preflight(NamedTuple):
    """What the checks before loading found: the activation width d, and the checks a dry run
    skipped because the Hub is unreachable (a real run skips none)."""

    d_in: int
    skipped: list[str]
    model_config_read: bool
    """Whether the base model's configuration can be read (the plan's model size needs it)."""


def check_before_loading(config: DistillConfig) -> Preflight:
    """Everything a dry run checks, every run checks before loading the base model or writing
    anything. Only a dry run skips, saying so, what needs a Hub it cannot reach."""
    check_paths(config)
    hook_layer = check_hook_layer(config)
    check_batch(config)
    checkpoint = config.cycles.cycle0_checkpoint if not config.transfer.core else None
    checkpoint_from_hub = bool(checkpoint) and checkpoint_on_hub(checkpoint) is not None
    needs_hub = dataset_on_hub(config.data) or model_on_hub(config.model) or checkpoint_from_hub
    offline = hub_unreachable() if config.run.dry_run and needs_hub else None
    skipped = []
    if offline and model_on_hub(config.model):
        skipped.append(f"the configuration of {config.model.model_id} was not read: its size is not estimated")
    if offline and dataset_on_hub(config.data):
        skipped.append(f"the dataset {config.data.dataset} was not opened")
    else:
        load_text_dataset(config.data)  # streamed: opens the files (or the Hub id), reads nothing
    if config.dictionary.d_in:
        d_in = config.dictionary.d_in
    elif offline and model_on_hub(config.model):  # a local model's width needs no Hub
        raise ConfigError(f"the width of {config.model.model_id} needs its configuration from the Hub ({offline}): set --dictionary.d_in")
    else:
        d_in = base_model_width(config.model)
    check_sparsities(config, d_in)
    check_hub_names(config, d_in)
    if offline and checkpoint_from_hub:
        skipped.append(f"the cycle-0 checkpoint {checkpoint} was not read")
    elif checkpoint:
        local = resolve_checkpoint(checkpoint)  # a download's failure names the setting already
        try:
            sae = read_cycle0_checkpoint(local)
        except (ValueError, KeyError, OSError, CorruptRunFileError) as error:
            raise ConfigError(f"--cycles.cycle0_checkpoint {checkpoint}: {error}") from None
        check_compatible(sae.config, d_in, hook_layer, config)
    if skipped:
        skipped.append(f"the Hub: {offline}. A real run checks these before loading anything")
    return Preflight(d_in, skipped, not (offline and model_on_hub(config.model)))
