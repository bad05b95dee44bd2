"""The kinds of final SAE a run trains, each declared once: the registry every room asks.

A kind says how its frozen core is made from the distilled core C*, which masking variant it
trains in, its folder and stage name, its Hub suffix, its report label and colour, and whether it
is the method, the baseline, or a control of another kind (a control differs from what it controls
in its frozen core alone). Adding a kind is one ``register_kind`` call here plus whatever is new
about it; the transfer stage, the report, the browser, the cards and the Hub names follow.

    kind                 folder (seed s > 0 adds -seed-s)   Hub suffix            frozen core
    dmsae-dense-core     k-KKKK-dense_core                 ""                    C*
    dmsae-sparse-core    k-KKKK-sparse_core                -sparse-core          C*
    random-core          random-core-k-KKKK                -random-core          random directions, C*'s row norms
    matryoshka-baseline  baseline-k-KKKK                   -baseline             none (c = 0)
    rescaled-core        rescaled-core-xF-k-KKKK           -rescaled-core-xF     C*'s rows x F (--transfer.core_scale)
    random-core-sparse   random-core-sparse-k-KKKK         -random-core-sparse   as random-core, sparse-core variant
    random-core-fixed    random-core-fixed-k-KKKK          -random-core-fixed    as random-core, the same at every k
    random-core-scaled   random-core-xF-k-KKKK             -random-core-xF       random-core's rows x F (--transfer.core_scale)

The random cores' row norms follow --transfer.random_core_norm (C*'s by default). A kind whose
folder holds ``{factor}`` is trained once per factor (``FinalSAE.factor``), its folder, Hub suffix,
label and card naming it (``F`` above).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from modeling_dmsae.configuration_dmsae import VARIANTS
from trainer.config import TransferConfig

DENSE_CORE, SPARSE_CORE = VARIANTS  # the model's masking variants (paper: dense core; ablation: sparse core)
METHOD, BASELINE_ROLE, CONTROL = "method", "baseline", "control"


class Core(NamedTuple):
    """A core to freeze into the next SAE: encoder directions [c, d] and their lineage (each row's
    [origin cycle, origin index])."""

    directions: torch.Tensor
    lineage: list[list[int]]


class CoreRequest(NamedTuple):
    """What a kind's frozen core is made from."""

    core: Core
    """The distilled core C*."""
    cycle: int
    """The cycle the SAE joins (the lineage of rows born there)."""
    seed: int
    """The seed drawn for its random core (``trainer.run.stages.core_seed``)."""
    factor: float | None
    """The SAE's factor, for a kind trained once per factor (``FinalSAE.factor``)."""
    transfer: TransferConfig
    """The transfer settings (--transfer.random_core_norm)."""


def distilled_core(request: CoreRequest) -> Core:
    """C* itself."""
    return request.core


def no_core(request: CoreRequest) -> Core:
    """No frozen latents (c = 0): a plain Matryoshka SAE."""
    return Core(request.core.directions[:0], [])


def rescaled_core(request: CoreRequest) -> Core:
    """C*'s rows times the SAE's factor: its directions and lineage, other norms."""
    core = request.core
    return Core((core.directions.float() * request.factor).to(core.directions.dtype), core.lineage)


MATCHED_NORM = "matched"
RANDOM_CORE_NORMS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    MATCHED_NORM: lambda gaussian, distilled_norms: torch.nn.functional.normalize(gaussian, dim=-1) * distilled_norms,
    "unit": lambda gaussian, distilled_norms: torch.nn.functional.normalize(gaussian, dim=-1),
    "gaussian": lambda gaussian, distilled_norms: gaussian,
}
"""--transfer.random_core_norm: each random row from its N(0, 1) draw and the norm of the distilled
row it stands in for (a number instead of a name: that many times the matched norms)."""


def random_directions(request: CoreRequest) -> Core:
    """The Figure-3 control: as many random directions as C* has (uniform on the sphere), with the
    row norms --transfer.random_core_norm asks for (default: each the norm of the distilled row it
    stands in for, so the directions are the only difference); their lineage says they were born in
    the SAE's cycle. Every norm setting scales the same draws."""
    core, norm = request.core, request.transfer.random_core_norm
    gaussian = torch.randn(core.directions.shape, generator=torch.Generator().manual_seed(request.seed))
    distilled_norms = core.directions.float().norm(dim=-1, keepdim=True)
    if norm in RANDOM_CORE_NORMS:
        directions = RANDOM_CORE_NORMS[norm](gaussian, distilled_norms)
    else:
        directions = RANDOM_CORE_NORMS[MATCHED_NORM](gaussian, distilled_norms) * float(norm)
    return Core(directions.to(core.directions.dtype), [[request.cycle, j] for j in range(len(core.lineage))])


def scaled_random_directions(request: CoreRequest) -> Core:
    """The random core's rows (its draws: ``SAEKind.draws_as``) times the SAE's factor: the control
    of the distilled core times that factor, the same scale with random directions."""
    random = random_directions(request)
    return Core((random.directions.float() * request.factor).to(random.directions.dtype), random.lineage)


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
    """Its folder under transfer/ and its stage name, a format of ``k``; holding ``{factor}``, the
    kind is trained once per factor and its Hub suffix, label and core origin name the factor too."""
    hub_suffix: str
    """What its Hub repo name adds (``{suffix}`` of --hub.sae_repo_pattern), before the seed's."""
    core_origin: str
    """Where its frozen core comes from, as its model card says."""
    color: str
    marker: str
    frozen_core: Callable[[CoreRequest], Core]
    """Its frozen core, made from C* (and the seed, factor and settings of the request)."""
    role: str = METHOD
    """METHOD (a DMSAE), BASELINE_ROLE (what every other kind is compared with) or CONTROL."""
    controls: str | None = None
    """For a control: the kind it differs from in its frozen core alone."""
    same_core_at_every_k: bool = False
    """Its random core is drawn from run.seed and the transfer seed alone, not from its stage name:
    the same directions at every k (to compare feature consistency across k with the DMSAE's)."""
    draws_as: str | None = None
    """Its random core is drawn with the seed of this kind's SAE at the same k and transfer seed (the
    same draws, which its frozen core then scales)."""

    @property
    def has_core(self) -> bool:
        return self.frozen_core is not no_core

    @property
    def keeps_distilled_core(self) -> bool:
        return self.frozen_core is distilled_core

    @property
    def takes_factor(self) -> bool:
        return FACTOR in self.folder

    @property
    def folder_pattern(self) -> str:
        """Its folder name with k shown as KKKK (and a factor as F), for people."""
        return with_factor(self.folder, None).replace("{k:04d}", "KKKK")

    def folder_name(self, k: int, factor: float | None = None) -> str:
        return with_factor(self.folder, factor).format(k=k)

    def hub_suffix_for(self, factor: float | None = None) -> str:
        return with_factor(self.hub_suffix, factor)

    def label_for(self, factor: float | None = None) -> str:
        return with_factor(self.label, factor)

    def core_origin_for(self, factor: float | None = None) -> str:
        return with_factor(self.core_origin, factor)


FACTOR = "{factor}"


def with_factor(text: str, factor: float | None) -> str:
    """``text`` naming ``factor`` where it holds ``{factor}`` (F when no factor is given: the kind in
    general). ``g`` spells a factor as typed (0.5, 2, 4), so a factor's SAE keeps its name."""
    return text.replace(FACTOR, "F" if factor is None else format(factor, "g"))


KINDS: dict[str, SAEKind] = {}


def register_kind(kind: SAEKind) -> SAEKind:
    if kind.name in KINDS:
        raise ValueError(f"an SAE kind named {kind.name!r} is already registered")
    if kind.controls is not None and kind.controls not in KINDS:
        raise ValueError(f"{kind.name!r} controls {kind.controls!r}, which is not registered (register it first)")
    if any((FACTOR in text) != kind.takes_factor for text in (kind.hub_suffix, kind.label)):
        raise ValueError(f"{kind.name!r}: a factor in its folder must be in its Hub suffix and label too (names stay unique)")
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
RESCALED_CORE = register_kind(SAEKind(
    name="rescaled-core", label="distilled core x{factor}", variant=DENSE_CORE, folder="rescaled-core-x{factor}-k-{k:04d}",
    hub_suffix="-rescaled-core-x{factor}", core_origin="the distilled core C* of that run, every row's norm times {factor} "
    "(same directions: a control of the core's scale)", color="tab:cyan", marker="D", frozen_core=rescaled_core,
    role=CONTROL, controls=DMSAE.name,
))  # fmt: skip
RANDOM_CORE_SPARSE = register_kind(SAEKind(
    name="random-core-sparse", label="random core (sparse core)", variant=SPARSE_CORE, folder="random-core-sparse-k-{k:04d}",
    hub_suffix="-random-core-sparse", core_origin="a random core of the same size in the sparse-core variant (the control of "
    "the sparse-core DMSAE)", color="tab:pink", marker="+", frozen_core=random_directions, role=CONTROL,
    controls=DMSAE_SPARSE_CORE.name,
))  # fmt: skip
RANDOM_CORE_FIXED = register_kind(SAEKind(
    name="random-core-fixed", label="random core, same at every k", variant=DENSE_CORE, folder="random-core-fixed-k-{k:04d}",
    hub_suffix="-random-core-fixed", core_origin="a random core of the same size, the same directions at every k (the "
    "control of feature consistency across k)", color="tab:orange", marker="v", frozen_core=random_directions,
    role=CONTROL, controls=DMSAE.name, same_core_at_every_k=True,
))  # fmt: skip
RANDOM_CORE_SCALED = register_kind(SAEKind(
    name="random-core-scaled", label="random core x{factor}", variant=DENSE_CORE, folder="random-core-x{factor}-k-{k:04d}",
    hub_suffix="-random-core-x{factor}", core_origin="the random core of that run and seed, every row's norm times {factor} "
    "(the control of the distilled core x{factor}: the same scale, random directions)", color="tab:olive", marker="1",
    frozen_core=scaled_random_directions, role=CONTROL, controls=RESCALED_CORE.name, draws_as=RANDOM_CORE.name,
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
