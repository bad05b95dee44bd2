"""The kinds of final SAE a run trains, each declared once: the registry every room asks.

A kind says how its frozen core is made from the distilled core C*, which masking variant it
trains in, its folder and stage name, its Hub suffix, its report label and colour, and whether it
is the method, the baseline, or a control of another kind (a control differs from what it controls
in its frozen core alone). Adding a kind is one ``register_kind`` call here plus whatever is new
about it; the transfer stage, the report, the browser, the cards and the Hub names follow.

    kind                 folder (seed s > 0 adds -seed-s)   Hub suffix      frozen core
    dmsae-dense-core     k-KKKK-dense_core                 ""              C*
    dmsae-sparse-core    k-KKKK-sparse_core                -sparse-core    C*
    random-core          random-core-k-KKKK                -random-core    random directions, C*'s row norms
    matryoshka-baseline  baseline-k-KKKK                   -baseline       none (c = 0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from modeling_dmsae.configuration_dmsae import VARIANTS

DENSE_CORE, SPARSE_CORE = VARIANTS  # the model's masking variants (paper: dense core; ablation: sparse core)
METHOD, BASELINE_ROLE, CONTROL = "method", "baseline", "control"


class Core(NamedTuple):
    """A core to freeze into the next SAE: encoder directions [c, d] and their lineage (each row's
    [origin cycle, origin index])."""

    directions: torch.Tensor
    lineage: list[list[int]]


def distilled_core(core: Core, cycle: int, seed: int) -> Core:
    """C* itself."""
    return core


def no_core(core: Core, cycle: int, seed: int) -> Core:
    """No frozen latents (c = 0): a plain Matryoshka SAE."""
    return Core(core.directions[:0], [])


def random_directions(core: Core, cycle: int, seed: int) -> Core:
    """The Figure-3 control: as many random directions as ``core`` has, each with the norm of the
    distilled row it stands in for (uniform on the sphere, then scaled), so the directions are the
    only difference; their lineage says they were born in ``cycle``."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(core.directions.shape, generator=generator), dim=-1)
    norms = core.directions.float().norm(dim=-1, keepdim=True)
    return Core((directions * norms).to(core.directions.dtype), [[cycle, j] for j in range(len(core.lineage))])


@dataclass(frozen=True)
class SAEKind:
    """One kind of final SAE."""

    name: str
    """Its name in metrics.json, the browser's data and the tests."""
    label: str
    """Its name for people: report tables, figure legends, the browser."""
    variant: str
    """The masking variant it trains in (dense_core or sparse_core)."""
    folder: str
    """Its folder under transfer/ and its stage name, a format of ``k``."""
    hub_suffix: str
    """What its Hub repo name adds (``{suffix}`` of --hub.sae_repo_pattern), before the seed's."""
    core_origin: str
    """Where its frozen core comes from, as its model card says."""
    color: str
    marker: str
    frozen_core: Callable[[Core, int, int], Core]
    """Its frozen core from (C*, the cycle the SAE joins, the seed drawn for it)."""
    role: str = METHOD
    """METHOD (a DMSAE), BASELINE_ROLE (what every other kind is compared with) or CONTROL."""
    controls: str | None = None
    """For a control: the kind it differs from in its frozen core alone."""

    @property
    def has_core(self) -> bool:
        return self.frozen_core is not no_core

    @property
    def keeps_distilled_core(self) -> bool:
        return self.frozen_core is distilled_core

    @property
    def folder_pattern(self) -> str:
        """Its folder name with k shown as KKKK, for people."""
        return self.folder.replace("{k:04d}", "KKKK")


KINDS: dict[str, SAEKind] = {}


def register_kind(kind: SAEKind) -> SAEKind:
    if kind.name in KINDS:
        raise ValueError(f"an SAE kind named {kind.name!r} is already registered")
    if kind.controls is not None and kind.controls not in KINDS:
        raise ValueError(f"{kind.name!r} controls {kind.controls!r}, which is not registered (register it first)")
    KINDS[kind.name] = kind
    return kind


def kind_named(name: str) -> SAEKind:
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown SAE kind {name!r}; the kinds are {', '.join(KINDS)}") from None


DISTILLED = "the distilled core C* of that run"
DMSAE = register_kind(SAEKind(
    name="dmsae-dense-core", label="DMSAE (dense core)", variant=DENSE_CORE, folder="k-{k:04d}-" + DENSE_CORE, hub_suffix="",
    core_origin=DISTILLED, color="tab:blue", marker="o", frozen_core=distilled_core,
))  # fmt: skip
DMSAE_SPARSE_CORE = register_kind(SAEKind(
    name="dmsae-sparse-core", label="DMSAE (sparse core)", variant=SPARSE_CORE, folder="k-{k:04d}-" + SPARSE_CORE,
    hub_suffix="-sparse-core", core_origin=DISTILLED, color="tab:purple", marker="s", frozen_core=distilled_core,
))  # fmt: skip
BASELINE = register_kind(SAEKind(
    name="matryoshka-baseline", label="Matryoshka baseline", variant=DENSE_CORE, folder="baseline-k-{k:04d}", hub_suffix="-baseline",
    core_origin="no core (c = 0)", color="tab:gray", marker="^", frozen_core=no_core, role=BASELINE_ROLE,
))  # fmt: skip
RANDOM_CORE = register_kind(SAEKind(
    name="random-core", label="random core", variant=DENSE_CORE, folder="random-core-k-{k:04d}", hub_suffix="-random-core",
    core_origin="a random core of the same size (the control of paper Figure 3)", color="tab:red", marker="x",
    frozen_core=random_directions, role=CONTROL, controls=DMSAE.name,
))  # fmt: skip


def distilled_kind(variant: str) -> SAEKind:
    """The DMSAE kind trained from C* in ``variant`` (--transfer.variants)."""
    return next(kind for kind in KINDS.values() if kind.role == METHOD and kind.variant == variant)


def seed_suffix(seed: int) -> str:
    """What a seed other than 0 adds to a final SAE's folder, stage and Hub repo name."""
    return f"-seed-{seed}" if seed else ""


def kind_of_legacy_metrics(core: str, variant: str) -> SAEKind:
    """The kind a metrics.json written before kinds existed describes by its "core" and "variant"."""
    if core == "none":
        return BASELINE
    if core == "random":
        return RANDOM_CORE
    return distilled_kind(variant)
