"""``--run.dry_run``: validate a configuration and print the plan without loading any weights:
the stages, the base-model passes, the cache's disk per process, memory per process, and the
wall time per stage estimated from throughputs measured by ``bench/bench_throughputs.py`` on the
same kind of device (``trainer/report/throughputs.json``, shipped with the package; a kind or base
model never measured is said so). What the run trains comes from ``trainer.run.stages``."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import NamedTuple, Sequence

from modeling_dmsae import DMSAEConfig
from trainer.config import DistillConfig
from trainer.harvest.base_model import base_model_width, pretrained_source
from trainer.run.files import read_json
from trainer.run.metrics_file import METRICS
from trainer.report.cost_model import (
    BASE_MODELS,
    DISK_BYTES_PER_S,
    GEMM_EFFICIENCY,
    LINK_EFFICIENCY,
    MEMORY_EFFICIENCY,
    STEP_OVERHEAD_S,
    StageCost,
    designs,
    harvest_cost,
    machine_from,
    main_process_costs,
    step_shape,
    training_costs,
)
from trainer.run.parallelism import StageMode, bytes_per_step, cycle_mode, deal, transfer_mode
from trainer.run.stages import batch_shape, cycle0_sae_config, final_saes, planned_processes, steps_for
from trainer.sae import evidence

GIB = 1024**3
THROUGHPUTS_FILE = Path(__file__).resolve().parent / "throughputs.json"
SAE_SHAPE_FIELDS = ("d_in", "num_latents", "k", "batch_size")
STORAGE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
MAX_SCALING = 4  # the farthest an SAE shape's N d K may lie from a measured one to be scaled from it


def sae_training_bytes(sae: DMSAEConfig, batch_size: int, latent_shards: int = 1) -> int:
    """Peak bytes of one SAE training step per process (fp32): weights, gradients, Adam's two
    moments, the dense [B, K] pre-activations (kept and ReLU'd) and the [L+1, B, d] prefixes; with
    its latents cut into ``latent_shards`` (latent-parallel), the process's share of the latents."""
    latents = math.ceil(sae.num_latents / latent_shards)
    parameters = 2 * latents * sae.d_in + latents + sae.d_in
    activations = 2 * batch_size * latents + 3 * len(sae.group_sizes) * batch_size * sae.d_in
    return 4 * (4 * parameters + activations)


def stage_memory_bytes(config: DistillConfig, sae: DMSAEConfig, processes: int) -> dict[str, tuple[int, str]]:
    """Per training stage: the peak bytes of SAE training on one process in the stage's mode, and
    what a process holds there."""
    shape = batch_shape(config, processes)
    held: dict[str, tuple[int, str]] = {}
    for stage, mode in (("cycles", cycle_mode(config, processes)), ("transfer", transfer_mode(config, processes))):
        if mode is StageMode.LATENT_PARALLEL:
            held[stage] = (sae_training_bytes(sae, shape.micro_batch, processes), f"{mode.value}: 1/{processes} of the latents, {shape.micro_batch:,} tokens")
        elif mode is StageMode.SAE_PARALLEL:
            most = max(len(indices) for indices in deal([final.k for final in final_saes(config)], processes))
            held[stage] = (most * sae_training_bytes(sae, shape.micro_batch), f"{mode.value}: up to {most} whole SAE(s), {shape.micro_batch:,} tokens")
        else:
            held[stage] = (sae_training_bytes(sae, shape.per_process), f"{mode.value}: one whole SAE, {shape.per_process:,} tokens")
    return held


def describe_plan(config: DistillConfig, d_in: int | None = None, skipped: Sequence[str] = (), model_config_read: bool = True) -> str:
    """The run's stages with tokens, steps and the per-process memory of SAE training; ``skipped``:
    the checks a dry run without the Hub could not make."""
    d_in = d_in or config.dictionary.d_in or base_model_width(config.model)
    sae = cycle0_sae_config(config, d_in)
    shape = batch_shape(config, planned_processes(config))
    finals = final_saes(config)

    def stage(tokens: int) -> str:
        steps = steps_for(tokens, config) // shape.accumulation
        return f"{steps:,} steps ({tokens:,} tokens, {tokens // shape.processes:,} per process)"

    cycle0 = config.cycles.cycle0_checkpoint or f"train from scratch: {stage(config.cycles.tokens_per_cycle)}"
    lines = [
        f"DMSAE distillation plan ({shape.processes} process(es))",
        f"  batch           {shape.batch_size:,} tokens per optimisation step, all processes together: "
        f"{shape.accumulation} micro-batch(es) of {shape.per_process:,} tokens per process; {shape.lanes} data lanes",
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
            f"  cycles 1..{config.cycles.num_cycles}     {stage(config.cycles.tokens_per_cycle)} each; "
            f"select with tau = {config.cycles.tau}, q = {config.cycles.quantile}",
            f"  distilled core  C* = C({config.cycles.num_cycles}) ∩ C({config.cycles.num_cycles - 1})",
        ]
    lines.append(f"  transfer        {len(finals)} SAE(s), {stage(config.transfer.tokens)} each:")
    lines += [f"                    {final.name} ({final.label}, k = {final.k}, {final.variant})" for final in finals]
    lines.append(f"  metrics         held-out, of every SAE: {', '.join(m.column for m in METRICS.values() if m.measured)}")
    lines.append(
        f"  timeout         a process waits at most {_seconds(config.run.process_group_timeout_s)} for the others in a collective "
        "(--run.process_group_timeout_s), as while the main process works alone (selection, evaluation, report, push)"
    )
    if config.hub.repo_id:
        lines.append(f"  hub             {config.hub.repo_id} (one tag per cycle), finals as {config.hub.sae_repo_pattern}")
    lines += [f"  not checked     {note}" for note in skipped]
    return "\n".join(lines + describe_costs(config, d_in, model_config_read))


# ---- the cost plan ----------------------------------------------------------------------------


def device_kind() -> str:
    """This machine's kind of device as throughputs.json names it: the GPU's name
    (``cuda-nvidia-h100-80gb-hbm3``) or ``cpu-<cores>core``."""
    import torch

    if torch.cuda.is_available():
        return "cuda-" + "-".join(torch.cuda.get_device_name().lower().split())
    return f"cpu-{os.cpu_count()}core"


def base_model_key(config: DistillConfig) -> str:
    """A base model's entry in the throughput table: model, hook and context length."""
    return f"{config.model.model_id} @ {config.model.hook_module}, context {config.data.context_length}"


class Throughputs(NamedTuple):
    """Measured figures of one kind of device (see bench/bench_throughputs.py)."""

    kind: str
    measured: str
    base_model: dict | None
    sae: list[dict]


def load_throughputs(config: DistillConfig, kind: str) -> Throughputs | None:
    """The figures measured on ``kind`` (None when that kind was never measured)."""
    table = _throughput_table()
    if "sae" not in table.get(kind, {}):
        return None
    entry = table[kind]
    return Throughputs(kind, entry.get("measured", ""), entry["base_model"].get(base_model_key(config)), entry["sae"])


def _throughput_table() -> dict:
    return read_json(THROUGHPUTS_FILE) if THROUGHPUTS_FILE.exists() else {}


def load_specifications(kind: str) -> dict | None:
    """The published peak rates of ``kind`` (None when throughputs.json has none)."""
    return _throughput_table().get(kind, {}).get("specifications")


def sae_figures(throughputs: Throughputs, d_in: int, num_latents: int, k: int, batch_size: int) -> tuple[dict, str] | None:
    """The SAE figures at this shape, or those of the nearest measured shape within a factor
    ``MAX_SCALING`` of its encoder GEMM's N d K, scaled by it (the step's dominant cost), with a
    note saying so; None when no shape that close was measured (sparse work does not scale with
    N d K, so a farther extrapolation would be a guess)."""
    target = {"d_in": d_in, "num_latents": num_latents, "k": k, "batch_size": batch_size}
    work = lambda shape: shape["d_in"] * shape["num_latents"] * shape["batch_size"]  # noqa: E731
    close = [s for s in throughputs.sae if abs(math.log(work(s) / work(target))) <= math.log(MAX_SCALING)]
    if not close:
        return None
    nearest = min(close, key=lambda s: (abs(math.log(work(s) / work(target))), abs(s["k"] - k)))
    if all(nearest[name] == target[name] for name in SAE_SHAPE_FIELDS):
        return nearest, ""
    per_token = work(target) / work(nearest) * nearest["batch_size"] / batch_size
    scaled = {
        "step_s": nearest["step_s"] * work(target) / work(nearest),
        **{name: nearest[name] * per_token for name in ("calibration_s_per_token", "evaluation_s_per_token", "selection_s_per_token")},
    }
    shape = ", ".join(f"{name} = {nearest[name]}" for name in SAE_SHAPE_FIELDS)
    return scaled, f"scaled by N d K from the step measured at {shape}"


def cache_bytes(config: DistillConfig, d_in: int) -> int:
    """Bytes of the activation and attribution caches, all processes together."""
    contexts = config.harvest.context_ranges(config.data.context_length)
    per_value = STORAGE_BYTES.get(config.harvest.storage_dtype, 4)
    activations = len(contexts.train) * config.data.context_length * d_in * per_value
    attribution = 2 * config.harvest.attribution_tokens * d_in * per_value
    return activations + attribution


def _free_bytes(directory: Path) -> int | None:
    """Free space on the disk that holds ``directory`` (its nearest existing parent)."""
    for candidate in (directory, *directory.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return None


def _base_model_bytes(config: DistillConfig, processes: int) -> str:
    """The base model's weights per process, from its configuration alone (no weights loaded)."""
    try:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        source, kwargs = pretrained_source(config.model)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source, **kwargs))
    except (OSError, ValueError) as error:
        return f"not estimated: the configuration of {config.model.model_id} is unreadable here ({type(error).__name__})"
    model.tie_weights()  # tied embeddings count once (init_empty_weights leaves them untied)
    parameters = model.num_parameters()
    dtype = config.model.dtype if config.model.dtype != "auto" else "bfloat16 on GPUs, float32 on CPUs"
    return (
        f"{parameters / 1e9:.2f}B parameters: {parameters * 2 / GIB:.1f} GiB in 16 bits, {parameters * 4 / GIB:.1f} GiB "
        f"in float32 (model.dtype: {dtype}) on each of the {processes} process(es)"
    )


def _seconds(value: float) -> str:
    return f"{value:,.0f} s" if value < 5400 else f"{value / 3600:,.1f} h"


def cycle_counts(config: DistillConfig) -> tuple[int, int]:
    """(cycles trained, cycles selected from): none when the run starts from a saved core, cycle 0
    untrained when it is imported."""
    if config.transfer.core:
        return 0, 0
    return config.cycles.num_cycles + (0 if config.cycles.cycle0_checkpoint else 1), config.cycles.num_cycles + 1


def describe_costs(config: DistillConfig, d_in: int, model_config_read: bool = True) -> list[str]:
    """Base-model passes, disk, memory and wall time per stage of the run on
    ``plan.num_processes`` processes of ``plan.device_kind``."""
    processes = planned_processes(config)
    kind = device_kind() if config.plan.device_kind == "auto" else config.plan.device_kind
    ranges = config.harvest.context_ranges(config.data.context_length)
    context = config.data.context_length
    train_positions = len(ranges.train) * context
    attribution_positions = len(ranges.attribution) * context
    held_out_contexts = max(math.ceil(config.eval.tokens / context), config.eval.ce_contexts)
    finals = final_saes(config)
    trained_cycles, _ = cycle_counts(config)
    streamed = config.run.stream_activations
    lines = [f"cost plan       {processes} process(es) of kind {kind}"]
    activation_passes = 1 + (trained_cycles + len(finals) if streamed else 0)
    lines.append(
        f"  base model    {activation_passes + 1} passes: activations {'streamed for every SAE, ' if streamed else 'cached once, '}"
        f"{train_positions:,} tokens{f' x {activation_passes - 1} SAEs' if streamed else ''}; (x, g) once, "
        f"{attribution_positions:,} tokens (forward and backward); evaluation: {held_out_contexts * context:,} held-out tokens "
        f"once and {config.eval.ce_contexts * context:,} spliced-loss tokens per SAE"
    )
    cache_dir = Path(config.harvest.node_cache_dir(0) or Path(config.run.output_dir) / "cache")  # a node-local cache: this node's
    total = cache_bytes(config, d_in)
    free = _free_bytes(cache_dir)
    fits = "" if free is None else f"; {free / 1e9:,.0f} GB free at {cache_dir} on this machine"
    lines.append(
        f"  disk          cache at most {total / 1e9:,.1f} GB ({len(ranges.train) * context:,} tokens x d = {d_in} x "
        f"{config.harvest.storage_dtype}), {total / processes / 1e9:,.1f} GB per process{fits}"
        + ("; streaming: not written" if streamed else "")
    )
    if not streamed and free is not None and total / processes > free:
        lines.append("  warning       the cache does not fit there: set --harvest.cache_dir to a larger local disk or --run.stream_activations true")
    sae = cycle0_sae_config(config, d_in)
    base_model = _base_model_bytes(config, processes) if model_config_read else "not estimated (its configuration is on the Hub)"
    memory = "; ".join(f"{stage} ~{size / GIB:.2f} GiB ({what})" for stage, (size, what) in stage_memory_bytes(config, sae, processes).items())
    lines.append(
        f"  memory        SAE training per process (fp32 weights, grads, Adam, a micro-batch): {memory}; base model: {base_model}"
    )
    lines.append(_describe_evidence(config, sae.num_latents, len(finals)))
    lines.append(_describe_modes(config, d_in, processes))
    return lines + _describe_times(config, d_in, processes, kind)


def _bf16(config: DistillConfig) -> bool:
    """Whether the run computes in bf16: plan.mixed_precision, or this launch's."""
    chosen = config.plan.mixed_precision
    return (os.environ.get("ACCELERATE_MIXED_PRECISION", "no") if chosen == "auto" else chosen) == "bf16"


def _megabytes(sent: float | None) -> str:
    return "" if sent is None else f"{sent / 1e6:,.2f} MB/step"


def _describe_modes(config: DistillConfig, d_in: int, processes: int) -> str:
    """Each SAE stage's mode (trainer.run.parallelism) and what one process sends per step in it."""
    shape = step_shape(config, d_in, processes, _bf16(config))
    modes = {"cycle training": cycle_mode(config, processes), "transfer training": transfer_mode(config, processes)}
    described = [f"{stage} {mode.value} ({_megabytes(bytes_per_step(mode, shape))})" for stage, mode in modes.items()]
    return (
        f"  modes         {'; '.join(described)}: bytes one process sends per optimisation step "
        f"(--run.parallelism {config.run.parallelism}, {'bf16' if shape.compute_bytes == 2 else 'fp32'} compute)"
    )


def _describe_evidence(config: DistillConfig, num_latents: int, saes: int) -> str:
    """The per-latent evidence beside every final SAE (a cycle keeps its firing frequencies only):
    its streaming buffers and its files."""
    size = evidence.evidence_bytes(num_latents) + 4 * config.eval.tokens  # + the held-out token ids
    return (
        f"  evidence      per-latent evidence of every final SAE (K = {num_latents:,}, top {evidence.TOP_N} and "
        f"{len(evidence.QUANTILES)} typical contexts of {evidence.window_length()} tokens): streaming buffers "
        f"~{evidence.evidence_working_bytes(num_latents) / GIB:.2f} GiB on the main process during evaluation; "
        f"files ~{size / 1e6:,.0f} MB per SAE, {saes * size / 1e9:,.2f} GB for the {saes} final SAEs"
    )


class StageTimes(NamedTuple):
    """The plan's wall time per stage: seconds, or why a stage was not estimated."""

    stages: dict[str, float | str]
    notes: list[str]
    measured: str
    """When and how the throughputs behind the estimate were measured."""


def estimate_stage_times(config: DistillConfig, d_in: int, processes: int, kind: str) -> StageTimes | None:
    """Wall time per stage (the stage names of the run's timings.json) from the throughputs measured
    on ``kind``; None when that kind was never measured."""
    throughputs = load_throughputs(config, kind)
    if throughputs is None:
        return None
    trained_cycles, selected_cycles = cycle_counts(config)
    base, context = throughputs.base_model, config.data.context_length
    ranges = config.harvest.context_ranges(context)
    held_out_tokens = max(math.ceil(config.eval.tokens / context), config.eval.ce_contexts) * context
    ce_tokens = config.eval.ce_contexts * context
    stages: dict[str, float | str] = {}
    notes: list[str] = []
    if base is None:
        stages["harvest"] = f"not estimated: {base_model_key(config)} never measured on {kind}"
    else:
        harvest = (
            base["load_s"]
            + len(ranges.train) * context / processes / base["activation_tokens_per_s"]
            + len(ranges.attribution) * context / processes / base["attribution_tokens_per_s"]
            + held_out_tokens / base["activation_tokens_per_s"]
            + 2 * ce_tokens / base["full_forward_tokens_per_s"]
        )
        stages["harvest"] = harvest
    batch = batch_shape(config, processes).per_process
    calibration_tokens = config.optimizer.calibration_tokens / processes

    def sae_time(k: int, tokens: int) -> tuple[float, dict] | None:
        found = sae_figures(throughputs, d_in, config.dictionary.num_latents, k, batch)
        if found is None:
            return None
        figures, note = found
        if note and note not in notes:
            notes.append(note)
        return steps_for(tokens, config) * figures["step_s"] + calibration_tokens * figures["calibration_s_per_token"], figures

    cycle = sae_time(config.cycles.k, config.cycles.tokens_per_cycle)
    transfers = [sae_time(final.k, config.transfer.tokens) for final in final_saes(config)]
    if cycle is None or None in transfers:
        stages["SAE training"] = (
            f"not estimated: no SAE step measured on {kind} within {MAX_SCALING}x of d = {d_in}, "
            f"K = {config.dictionary.num_latents}, N = {batch} tokens per process"
        )
    else:
        stages["cycle training"] = trained_cycles * cycle[0]
        stages["attribution"] = selected_cycles * config.harvest.attribution_tokens * cycle[1]["selection_s_per_token"]
        evaluated = [cycle[1]] * selected_cycles + [figures for _, figures in transfers]
        spliced = ce_tokens / base["full_forward_tokens_per_s"] if base else 0.0
        stages["evaluation"] = sum(config.eval.tokens * f["evaluation_s_per_token"] + spliced for f in evaluated)
        stages["transfer training"] = sum(seconds for seconds, _ in transfers)
    return StageTimes(stages, notes, throughputs.measured)


def _describe_times(config: DistillConfig, d_in: int, processes: int, kind: str) -> list[str]:
    """The plan's wall-time lines; what was never measured is said so."""
    estimate = estimate_stage_times(config, d_in, processes, kind)
    specifications = load_specifications(kind)
    if estimate is None and specifications is not None:
        return _describe_from_specifications(config, d_in, processes, kind, specifications)
    if estimate is None:
        return [
            f"  wall time     not estimated: no throughputs measured on {kind} "
            f"(run python bench/bench_throughputs.py --config ... on one; measured kinds are in {THROUGHPUTS_FILE.name})"
        ]
    stages = estimate.stages
    lines = [f"  wall time     from throughputs measured on {kind} ({estimate.measured})"]
    lines += [f"    {stage:<18}{_seconds(value) if isinstance(value, float) else value}" for stage, value in stages.items()]
    known = [value for value in stages.values() if isinstance(value, float)]
    if known:
        lines.append(f"    {'total' if len(known) == len(stages) else 'total (known part)':<18}{_seconds(sum(known))}")
    lines += [f"    note: {note}" for note in estimate.notes]
    return lines


def _stage_costs(config: DistillConfig, d_in: int, processes: int, specifications: dict, design) -> dict[str, StageCost | str]:
    """Every stage of ``design`` priced from the published rates (the stage names of timings.json)."""
    machine = machine_from(specifications)
    trained_cycles, selected_cycles = cycle_counts(config)
    context = config.data.context_length
    ranges = config.harvest.context_ranges(context)
    held_out = max(math.ceil(config.eval.tokens / context), config.eval.ce_contexts) * context
    ce_tokens = config.eval.ce_contexts * context
    costs: dict[str, StageCost | str] = {}
    if config.model.model_id in BASE_MODELS:
        other = (len(ranges.attribution) * context, held_out, ce_tokens)
        costs["harvest"] = harvest_cost(config, machine, d_in, processes, design, len(ranges.train) * context, other)
    else:
        costs["harvest"] = f"not estimated: the size of {config.model.model_id} is not in the cost model's BASE_MODELS"
    training = training_costs(config, machine, d_in, processes, design, trained_cycles)
    main = main_process_costs(config, machine, d_in, selected_cycles, selected_cycles + len(final_saes(config)), ce_tokens)
    return {**costs, "cycle training": training["cycle training"], **main, "transfer training": training["transfer training"]}


def _stage_line(stage: str, cost: StageCost | str) -> list[str]:
    if isinstance(cost, str):
        return [f"    {stage:<18}{cost}"]
    return [f"    {stage:<18}{cost.mode:<16}{_megabytes(cost.bytes_per_step):>16}  {_seconds(cost.seconds):>9}", f"      rests on: {cost.basis}"]


def _total(costs: dict[str, StageCost | str]) -> str:
    known = [cost.seconds for cost in costs.values() if isinstance(cost, StageCost)]
    return _seconds(sum(known)) + ("" if len(known) == len(costs) else " (known part)")


def _describe_from_specifications(config: DistillConfig, d_in: int, processes: int, kind: str, specifications: dict) -> list[str]:
    """The wall time of a kind never measured, estimated from its published rates: per stage its
    mode, bytes per step, time and basis, for this run's design and for plain DDP."""
    planned, plain = designs(config, processes, _bf16(config))
    ours, today = (_stage_costs(config, d_in, processes, specifications, design) for design in (planned, plain))
    lines = [
        f"  wall time     estimated from specifications of {kind} (no throughputs measured on it): "
        f"stage, mode, bytes one process sends per optimisation step, time",
        *[line for stage, cost in ours.items() for line in _stage_line(stage, cost)],
        f"    {'total':<18}{_total(ours)} on the node",
        f"    {'plain DDP':<18}{_total(today)} on the node: every SAE stage DDP, fp32, activations read from disk, checkpoints written by the main process while the others wait, priced the same way:",
        *[line for stage, cost in today.items() if stage.endswith("training") for line in _stage_line(stage, cost)],
        f"    assumed: GEMMs at {GEMM_EFFICIENCY:.0%} of peak, memory at {MEMORY_EFFICIENCY:.0%}, collectives at "
        f"{LINK_EFFICIENCY:.0%} of the link rate, {STEP_OVERHEAD_S * 1e3:.0f} ms of launches per SAE step, a local disk "
        f"at {DISK_BYTES_PER_S / 1e9:.0f} GB/s (trainer/report/cost_model.py)",
    ]
    return lines + [f"    source: {source}" for source in specifications.get("sources", [])]
