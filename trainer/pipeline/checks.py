"""Everything that can be checked before the base model's weights are loaded or anything is
written: the folders, the dataset, every sparsity against K, the cycle-0 checkpoint. A dry run
checks the same."""

from __future__ import annotations

import os
from pathlib import Path

from hub_cards.publish import resolve_core
from modeling_dmsae.configuration_dmsae import hook_layer_index
from trainer.config import DistillConfig
from trainer.errors import ConfigError, CorruptRunFileError
from trainer.harvest.base_model import base_model_width
from trainer.harvest.text_corpus import load_text_dataset
from trainer.pipeline.cores import check_compatible, load_core, read_cycle0_checkpoint
from trainer.run.layout import RunDirectory
from trainer.run.plan import cycle0_sae_config, final_runs


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


def check_sparsities(config: DistillConfig, d_in: int) -> None:
    """Every k of every stage against K (and the core size when it is known): the DMSAE configs the
    stages will build, built now."""
    K = config.dictionary.num_latents
    try:
        base = cycle0_sae_config(config, d_in)
    except ValueError as error:
        raise ConfigError(f"--cycles.k {config.cycles.k} with --dictionary.num_latents {K}: {error}") from None
    core_size = known_core_size(config)
    for run in final_runs(config):
        c = 0 if run.core == "none" else core_size or 0
        try:
            base.with_core([[0, j] for j in range(c)], cycle=1, k=run.k, variant=run.variant)
        except ValueError as error:
            core = f"a core of {c} latents" if core_size is not None or run.core == "none" else "the smallest possible core"
            raise ConfigError(
                f"--transfer.ks {run.k} ({run.name}) is impossible with --dictionary.num_latents {K} and {core}: {error}. "
                "Lower --transfer.ks or raise --dictionary.num_latents"
            ) from None


def check_paths(config: DistillConfig) -> None:
    """The output folder, the cycle-0 checkpoint and the dataset, before anything is loaded."""
    output = Path(config.run.output_dir).expanduser()
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--run.output_dir {output} is a file, not a folder: choose another --run.output_dir")
    parent = next(p for p in [output, *output.parents] if p.exists())
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"--run.output_dir {output}: {parent} is not writable: choose another --run.output_dir")
    checkpoint = config.cycles.cycle0_checkpoint
    if checkpoint and not Path(checkpoint).exists():
        raise ConfigError(
            f"--cycles.cycle0_checkpoint {checkpoint}: no such file or folder (a SAEBench / dictionary_learning trainer "
            "folder or ae.pt, a SAELens folder, or a DMSAE folder)"
        )
    load_text_dataset(config.data)  # streamed: opens the files (or the Hub id), reads nothing


def check_before_loading(config: DistillConfig) -> int:
    """Everything a dry run checks, every run checks before loading the base model or writing
    anything: returns the activation width d."""
    check_paths(config)
    hook_layer = check_hook_layer(config)
    d_in = config.dictionary.d_in or base_model_width(config.model)
    check_sparsities(config, d_in)
    if config.cycles.cycle0_checkpoint and not config.transfer.core:
        try:
            sae = read_cycle0_checkpoint(config.cycles.cycle0_checkpoint)
        except (ValueError, KeyError, OSError, CorruptRunFileError) as error:
            raise ConfigError(f"--cycles.cycle0_checkpoint {config.cycles.cycle0_checkpoint}: {error}") from None
        check_compatible(sae.config, d_in, hook_layer, config)
    return d_in
