"""The configuration of a distillation run: dataclasses whose field docstrings become the CLI.

``trainer/configs/*.yaml`` hold complete configurations (the embedded default and the
paper's); ``--config FILE`` loads one and ``--section.field value`` overrides any field.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import simple_parsing
import yaml

from hub_cards.publish import HubSettings
from modeling_dmsae.configuration_dmsae import SAEBENCH_GROUP_FRACTIONS, VARIANTS
from trainer.activations import HarvestConfig
from trainer.base_model import BaseModelConfig
from trainer.sae_training import OptimizerConfig
from trainer.text_corpus import DataConfig

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"
TRACKERS = ("tensorboard", "wandb", "trackio", "none")


class ConfigError(ValueError):
    """An impossible setting: the message names the field, the value and the fix, in one line."""


@dataclass
class DictionaryConfig:
    """Shape of every SAE of the run."""

    d_in: int | None = None
    """Width of the hooked activations; None: the base model's hidden size (read from its config)."""
    num_latents: int = 65536
    """Dictionary size K."""
    group_fractions: list[float] = field(default_factory=lambda: list(SAEBENCH_GROUP_FRACTIONS))
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
    """Tokens per optimisation step and per process."""
    cycle0_checkpoint: str | None = None
    """Cycle 0 from a published SAE: a dictionary_learning / SAEBench trainer folder or ae.pt, a SAELens folder, or a DMSAE save_pretrained folder. None: train one with c = 0."""


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
    core: str | None = None
    """Skip distillation and start from a saved core: a local distilled_core/ or cycle folder, or ORG/NAME@cycle-7 on the Hub."""


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
    """Kind of device the run will use, as named in bench/throughputs.json (e.g. cpu-2core, cuda-nvidia-h100-80gb-hbm3); auto: this machine's."""
    num_processes: int = 0
    """Processes (GPUs) the run will launch; 0: this launch's WORLD_SIZE (1 for plain python)."""


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
    """Optimisation steps between training checkpoints."""
    log_every: int = 10
    """Optimisation steps between logged metrics."""
    log_with: str = "tensorboard"
    """Accelerate tracker: tensorboard, wandb, trackio, or none."""
    gradient_accumulation_steps: int = 1
    """Batches accumulated per optimisation step."""


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
        cycles, transfer, run = self.cycles, self.transfer, self.run
        checks = [
            ("cycles.num_cycles", cycles.num_cycles >= 1, "must be >= 1: C* intersects the cores of cycles T and T-1"),
            ("cycles.tau", 0 < cycles.tau <= 1, "must be in (0, 1]: the attribution coverage of a core, 0.9 in the paper"),
            ("cycles.quantile", 0 <= cycles.quantile <= 1, "must be in [0, 1]: the per-token attribution quantile, 0.99 in the paper"),
            ("cycles.variant", cycles.variant in VARIANTS, f"must be one of {', '.join(VARIANTS)}"),
            ("transfer.variants", all(v in VARIANTS for v in transfer.variants), f"must be among {', '.join(VARIANTS)}"),
            ("transfer.ks", len(transfer.ks) > 0 and all(k > 0 for k in transfer.ks), "must be positive integers, e.g. --transfer.ks 16 64"),
            ("cycles.batch_size", cycles.batch_size > 0, "must be positive: tokens per step and process"),
            ("cycles.tokens_per_cycle", cycles.tokens_per_cycle >= cycles.batch_size, f"must cover one batch (--cycles.batch_size {cycles.batch_size}): raise it or lower the batch"),
            ("transfer.tokens", transfer.tokens >= cycles.batch_size, f"must cover one batch (--cycles.batch_size {cycles.batch_size}): raise it or lower the batch"),
            ("eval.tokens", self.eval.tokens > 0, "must be positive: the held-out tokens of every metric"),
            ("eval.ce_contexts", self.eval.ce_contexts > 0, "must be positive: the held-out contexts of the spliced loss"),
            ("run.log_with", run.log_with in TRACKERS, f"must be one of {', '.join(TRACKERS)}"),
            ("run.gradient_accumulation_steps", run.gradient_accumulation_steps >= 1, "must be >= 1"),
            ("run.checkpoint_every", run.checkpoint_every >= 1, "must be >= 1 (optimisation steps between checkpoints)"),
            ("run.log_every", run.log_every >= 1, "must be >= 1 (optimisation steps between logged metrics)"),
        ]
        for name, ok, requirement in checks:
            if not ok:
                section, field_name = name.split(".")
                value = getattr(getattr(self, section), field_name)
                shown = " ".join(map(str, value)) if isinstance(value, list) else value  # as typed on the command line
                raise ConfigError(f"--{name} {shown}: {requirement}")

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


# Short spellings of the most used options.
ALIASES = {"--push-to-hub": "--hub.repo_id", "--core": "--transfer.core", "--resume": "--run.resume", "--dry-run": "--run.dry_run"}
FLAGS = {"--resume", "--dry-run"}  # aliases that take no value


def expand_aliases(argv: list[str]) -> list[str]:
    expanded = []
    for arg in argv:
        name, equals, value = arg.partition("=")
        if name in ALIASES:
            expanded.append(ALIASES[name])
            if equals:
                expanded.append(value)
            elif name in FLAGS:
                expanded.append("true")
        else:
            expanded.append(arg)
    return expanded


def parse_config(argv: list[str]) -> DistillConfig:
    """``--config FILE`` (default: the embedded default) then ``--section.field value`` overrides
    (and the aliases --push-to-hub, --core, --resume, --dry-run)."""
    preparser = argparse.ArgumentParser(add_help=False)
    preparser.add_argument("--config", default=str(DEFAULT_CONFIG))
    known, overrides = preparser.parse_known_args(expand_aliases(argv))
    if not Path(known.config).is_file():
        raise ConfigError(f"--config {known.config}: no such file (shipped configs: {sorted(p.name for p in CONFIG_DIR.glob('*.yaml'))})")
    config = simple_parsing.parse(
        DistillConfig,
        config_path=known.config,
        args=overrides,
        argument_generation_mode=simple_parsing.ArgumentGenerationMode.NESTED,
        prog="accelerate launch trainer/distill.py [--config FILE]",
    )
    config.validate()
    return config
