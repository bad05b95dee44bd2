"""Every metric a run records, declared once (the registry), and ``metrics.json``: its one typed
reader and writer.

A metric says its key, its name for people, its table column and number format, which direction is
better, and which SAEs have it. The report's tables, the table over seeds, the cards' model-index,
the browser and the dry run read it here. A new metric is one ``register_metric`` call plus the code
that measures it (``trainer.sae.metrics``).

Two files hold metrics: each SAE's stage folder has a ``metrics.json`` (:class:`SAEMetrics`), and
the run folder's ``metrics.json`` gathers them with the run-wide results (:class:`RunMetrics`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from trainer.errors import CorruptRunFileError
from trainer.run.files import read_json, write_json
from trainer.run.kinds import KINDS, SAEKind, kind_named, kind_of_legacy_metrics

METRICS_FORMAT = 1
"""The version of the metrics.json format; files written before it have none (format 0: the kind as
its "core" and "variant")."""
HIGHER, LOWER = "higher", "lower"
EVERY_SAE, TRAINED_SAES, CYCLES, FINAL_SAES = "every SAE", "every SAE trained by the run", "the cycles", "the final SAEs"


class Metric(NamedTuple):
    key: str
    """Its key in metrics.json."""
    label: str
    """Its name for people (model cards, the browser)."""
    column: str
    """Its column header in the report's tables."""
    format: str
    """How the report writes a value (a format spec)."""
    better: str | None
    """HIGHER, LOWER, or None for a count or a value without a better side."""
    scope: str
    """Which SAEs have it: EVERY_SAE, TRAINED_SAES (not an imported cycle 0), CYCLES or FINAL_SAES."""
    measured: bool = True
    """A measurement of the SAE (the cards' model-index), rather than a count describing the run."""

    def show(self, value: float) -> str:
        return format(value, self.format)


METRICS: dict[str, Metric] = {}


def register_metric(metric: Metric) -> Metric:
    if metric.key in METRICS or metric.key in ("format", "kind", "seed", "factor"):
        raise ValueError(f"a metric keyed {metric.key!r} is already registered (or the key is a field of metrics.json)")
    METRICS[metric.key] = metric
    return metric


for _metric in (
    Metric("fve", "Fraction of variance explained", "FVE", ".3f", HIGHER, EVERY_SAE),
    Metric("mse", "Mean squared error", "MSE", ".4g", LOWER, EVERY_SAE),
    Metric("l0_core", "L0 of the core", "L0 core", ".1f", None, EVERY_SAE),
    Metric("l0_core_above_threshold", "L0 of the core above the inference threshold", "L0 core > θ", ".1f", None, EVERY_SAE),
    Metric("l0_noncore", "L0 of the non-core latents", "L0 non-core", ".1f", None, EVERY_SAE),
    Metric("l0", "L0 (active latents per token)", "L0", ".1f", None, EVERY_SAE),
    Metric("dead_fraction", "Dead latent fraction", "dead", ".1%", LOWER, EVERY_SAE),
    Metric("eval_tokens", "Held-out tokens", "held-out tokens", ",", None, EVERY_SAE, measured=False),
    Metric("ce_loss_clean", "CE loss, clean", "CE clean", ".4g", None, EVERY_SAE),
    Metric("ce_loss_spliced", "CE loss, SAE spliced in", "CE spliced", ".4g", LOWER, EVERY_SAE),
    Metric("ce_loss_zero_ablated", "CE loss, zero ablation", "CE zero-ablated", ".4g", None, EVERY_SAE),
    Metric("loss_recovered", "CE loss recovered", "loss recovered", ".3f", HIGHER, EVERY_SAE),
    Metric("core_size", "Core size", "frozen core c", "d", None, EVERY_SAE, measured=False),
    Metric("k", "Sparsity target k", "k", "d", None, FINAL_SAES, measured=False),
    Metric("k_noncore", "Non-core sparsity target (Eq. 4)", "k non-core", "d", None, EVERY_SAE, measured=False),
    Metric("selected_core_size", "Selected core C(t)", "selected C(t)", "d", None, CYCLES, measured=False),
    Metric("carry_over", "Carry-over from the previous core", "carry-over", ".2f", None, CYCLES, measured=False),
    Metric("decoder_cosine_to_init", "Median decoder cosine to initialisation", "dec. cos to init", ".2f", None, TRAINED_SAES, measured=False),
):
    register_metric(_metric)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _registered(key: str) -> str:
    """``key``, or a KeyError naming where metrics are registered (a misspelt key fails loudly)."""
    if key not in METRICS:
        raise KeyError(f"{key!r} is not a registered metric (trainer/run/metrics_file.py)")
    return key


@dataclass(frozen=True)
class SAEMetrics:
    """The metrics.json of one SAE's stage folder: a cycle (no kind) or a final SAE (its kind, seed
    and, for a kind trained once per factor, its factor). ``values`` holds registered metrics only,
    in the order they were measured."""

    values: dict[str, float]
    kind: str | None = None
    seed: int = 0
    factor: float | None = None

    def __post_init__(self) -> None:
        unknown = [key for key in self.values if key not in METRICS]
        if unknown:
            raise ValueError(f"unregistered metric(s) {', '.join(unknown)}: register them in trainer/run/metrics_file.py")
        if self.kind is not None:
            kind_named(self.kind)

    def __getitem__(self, key: str) -> float:
        return self.values[_registered(key)]

    def get(self, key: str, default: float | None = None) -> float | None:
        return self.values.get(_registered(key), default)

    def has(self, key: str) -> bool:
        return key in self.values

    @property
    def sae_kind(self) -> SAEKind:
        if self.kind is None:
            raise ValueError("a cycle's metrics name no kind of final SAE")
        return KINDS[self.kind]

    @property
    def label(self) -> str:
        """The final SAE's kind for people, naming its factor."""
        return self.sae_kind.label_for(self.factor)

    @property
    def k(self) -> int:
        return int(self["k"])

    def to_json(self) -> dict[str, Any]:
        identity = {"kind": self.kind, "seed": self.seed} if self.kind is not None else {}
        factor = {"factor": self.factor} if self.factor is not None else {}  # only kinds with one: other files as before
        return {"format": METRICS_FORMAT, **identity, **factor, **self.values}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SAEMetrics:
        """Any format: a file without "format" names its kind by "core" and "variant"."""
        data = dict(data)
        version = data.pop("format", 0)
        if version > METRICS_FORMAT:
            raise ValueError(f"metrics.json format {version} is newer than this dmsae reads ({METRICS_FORMAT}): upgrade dmsae")
        kind, seed, factor = data.pop("kind", None), data.pop("seed", 0), data.pop("factor", None)
        if version == 0 and "core" in data:
            kind = kind_of_legacy_metrics(data.pop("core"), data.pop("variant")).name
        return cls(data, kind, seed, factor)

    @classmethod
    def read(cls, path: Path, fix: str | None = None) -> SAEMetrics:
        fix = fix or f"delete {path.parent} and rerun with --run.resume true to compute it again"
        try:
            return cls.from_json(read_json(path, fix))
        except (ValueError, KeyError, AttributeError) as error:
            raise CorruptRunFileError(f"{path} is not an SAE's metrics.json ({error}): {fix}") from None

    def write(self, path: Path) -> None:
        write_json(path, self.to_json())


@dataclass
class RunMetrics:
    """The run folder's metrics.json: every SAE's metrics, feature consistency across sparsities and
    the Figure-3 outcome in words."""

    cycles: dict[str, SAEMetrics] = field(default_factory=dict)
    transfer: dict[str, SAEMetrics] = field(default_factory=dict)
    consistency: list[dict] = field(default_factory=list)
    figure3: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": METRICS_FORMAT,
            "cycles": {name: m.to_json() for name, m in self.cycles.items()},
            "transfer": {name: m.to_json() for name, m in self.transfer.items()},
            "consistency": self.consistency,
            "figure3": self.figure3,
        }

    @classmethod
    def read(cls, path: Path) -> RunMetrics:
        data = read_json(path, f"rerun the report: {path} is written again from the stage folders")
        return cls(
            {name: SAEMetrics.from_json(m) for name, m in data["cycles"].items()},
            {name: SAEMetrics.from_json(m) for name, m in data["transfer"].items()},
            data.get("consistency") or [],
            data.get("figure3"),
        )

    def write(self, path: Path) -> None:
        write_json(path, self.to_json())
