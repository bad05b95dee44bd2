"""``--run.dry_run``: validate a configuration and print the plan without loading any weights."""

from __future__ import annotations

import math
import os
from typing import NamedTuple

from modeling_dmsae import DMSAEConfig
from modeling_dmsae.configuration_dmsae import matryoshka_group_sizes
from trainer.distill_config import DistillConfig

GIB = 1024**3


def world_size() -> int:
    """Processes of this launch (``accelerate launch`` sets WORLD_SIZE), 1 for plain python."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def steps_for(tokens: int, config: DistillConfig) -> int:
    """Micro-batches per process that consume ``tokens`` across all processes (a whole number of
    optimiser steps under gradient accumulation)."""
    accumulation = config.run.gradient_accumulation_steps
    per_step = config.cycles.batch_size * world_size() * accumulation
    return max(1, math.ceil(tokens / per_step)) * accumulation


class FinalRun(NamedTuple):
    """One SAE of the transfer stage: its folder under ``transfer/``, sparsity k, masking variant,
    and which core it starts from: ``distilled`` (C*, Algorithm 3), ``random`` (the Figure-3
    control: random unit directions, frozen, of |C*| latents) or ``none`` (the plain Matryoshka
    baseline, c = 0)."""

    name: str
    k: int
    variant: str
    core: str

    @property
    def stage(self) -> str:
        """Name of its training stage (checkpoints and logs)."""
        return f"transfer-{self.name}"


def final_runs(config: DistillConfig) -> list[FinalRun]:
    """Every SAE the transfer stage trains, in training order.

    The DMSAEs at each k in transfer.ks and variant; with transfer.random_core_control, the
    dense distilled core against a random core at the distillation k (Figure 3); with
    transfer.sparsity_matched, the sparse-core variant at the distillation k (global L0 = k, as the
    baseline's); with transfer.baseline, a plain Matryoshka SAE (c = 0) at every k trained above.
    """
    transfer, k = config.transfer, config.cycles.k
    runs = [FinalRun(f"k-{kk:04d}-{variant}", kk, variant, "distilled") for kk in transfer.ks for variant in transfer.variants]
    comparisons = [(k, "dense_core")] * transfer.random_core_control + [(k, "sparse_core")] * transfer.sparsity_matched
    for kk, variant in comparisons:
        if (kk, variant) not in {(r.k, r.variant) for r in runs}:
            runs.append(FinalRun(f"k-{kk:04d}-{variant}", kk, variant, "distilled"))
    if transfer.random_core_control:
        runs.append(FinalRun(f"random-core-k-{k:04d}", k, "dense_core", "random"))
    if transfer.baseline:
        runs += [FinalRun(f"baseline-k-{kk:04d}", kk, "dense_core", "none") for kk in sorted({r.k for r in runs})]
    return runs


def cycle0_sae_config(config: DistillConfig, d_in: int, hook_layer: int | None = None) -> DMSAEConfig:
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
        hook_layer=hook_layer,
    )


def base_model_width(config: DistillConfig) -> int:
    """The base model's hidden size from its configuration alone (no weights)."""
    from transformers import AutoConfig

    from trainer.base_model import pretrained_source

    source, kwargs = pretrained_source(config.model)
    try:
        model_config = AutoConfig.from_pretrained(source, **kwargs)
    except OSError as error:
        raise ValueError(
            f"cannot read the configuration of {config.model.model_id} to learn the activation width ({error}). "
            "Set --dictionary.d_in (e.g. 2304 for Gemma-2-2B) or make the model reachable"
        ) from error
    return model_config.get_text_config().hidden_size


def sae_training_bytes(sae: DMSAEConfig, batch_size: int) -> int:
    """Peak bytes of one SAE training step per process (fp32): weights, gradients, Adam's two
    moments, the dense [B, K] pre-activations (kept and ReLU'd) and the [L+1, B, d] prefixes."""
    parameters = 2 * sae.num_latents * sae.d_in + sae.num_latents + sae.d_in
    activations = 2 * batch_size * sae.num_latents + 3 * len(sae.group_sizes) * batch_size * sae.d_in
    return 4 * (4 * parameters + activations)


def describe_plan(config: DistillConfig, d_in: int | None = None) -> str:
    """The run's stages with tokens, steps and the per-process memory of SAE training."""
    d_in = d_in or config.dictionary.d_in or base_model_width(config)
    sae = cycle0_sae_config(config, d_in)
    cycle_steps = steps_for(config.cycles.tokens_per_cycle, config)
    transfer_steps = steps_for(config.transfer.tokens, config)
    finals = final_runs(config)
    cycle0 = config.cycles.cycle0_checkpoint or f"train from scratch ({cycle_steps} steps)"
    lines = [
        f"DMSAE distillation plan ({world_size()} process(es), batch {config.cycles.batch_size} tokens per process)",
        f"  base model      {config.model.model_id} at {config.model.hook_module} (d = {d_in})",
        f"  dataset         {config.data.dataset or 'embedded offline corpus'}, context {config.data.context_length}",
        f"  dictionary      K = {sae.num_latents}, groups {sae.group_sizes}, k = {sae.k} ({sae.variant})",
        f"  harvest         {config.harvest.train_tokens:,} training tokens, {config.harvest.attribution_tokens:,} "
        f"attribution tokens (x, g), {config.eval.tokens:,} held-out tokens",
    ]
    if config.transfer.core:
        lines.append(f"  distillation    skipped: core from {config.transfer.core}")
    else:
        lines += [
            f"  cycle 0         {cycle0}; select C(0) from the first {sae.group_sizes[0]} latents",
            f"  cycles 1..{config.cycles.num_cycles}     {cycle_steps} steps each ({config.cycles.tokens_per_cycle:,} tokens); "
            f"select with tau = {config.cycles.tau}, q = {config.cycles.quantile}",
            f"  distilled core  C* = C({config.cycles.num_cycles}) ∩ C({config.cycles.num_cycles - 1})",
        ]
    lines.append(f"  transfer        {len(finals)} SAE(s), {transfer_steps} steps each:")
    lines += [f"                    {run.name} (k = {run.k}, {run.variant}, core: {run.core})" for run in finals]
    memory = sae_training_bytes(sae, config.cycles.batch_size)
    lines.append(f"  memory          SAE training ~{memory / GIB:.2f} GiB per process (fp32 weights, grads, Adam, batch)")
    if config.hub.repo_id:
        lines.append(f"  hub             {config.hub.repo_id} (one tag per cycle), finals as {config.hub.sae_repo_pattern}")
    return "\n".join(lines)
