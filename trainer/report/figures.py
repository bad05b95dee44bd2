"""The PNG figures of a run: the paper's Figures 2, 3 and (an analogue of) 4, the attribution
coverage curves and feature consistency across sparsities; and of runs that differ in one setting of
the cycles (``bench/study/sweep.py``): Figures 5 and 6."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import NamedTuple, Sequence

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from trainer.report.spreads import Spread, spread  # noqa: E402
from trainer.run.kinds import FACTOR, KINDS, SAEKind  # noqa: E402
from trainer.run.files import atomic_path  # noqa: E402


def _save(figure, path: Path) -> Path:
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


def _lineage_bars(axis, core_origins: Sequence[Sequence[int]], origins: Sequence[int]) -> None:
    """Stacked bars: the size of each C(t), split by the cycle each of its latents first appeared in
    (``origins``: every origin cycle to colour, so that panels share colours)."""
    colors = plt.get_cmap("viridis", max(len(origins), 2))
    bottoms = [0] * len(core_origins)
    for n, origin in enumerate(origins):
        heights = [Counter(core)[origin] for core in core_origins]
        axis.bar(range(len(core_origins)), heights, bottom=bottoms, color=colors(n), label=f"first selected in cycle {origin}")
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    axis.set_xlabel("cycle t")
    axis.set_xticks(list(range(len(core_origins))))


def _origins(*runs: Sequence[Sequence[int]]) -> list[int]:
    return sorted({o for core_origins in runs for core in core_origins for o in core})


def core_lineage_figure(core_origins: Sequence[Sequence[int]], path: Path) -> Path:
    """Figure 2: size of each selected core C(t), stacked by the cycle each latent first appeared in.

    ``core_origins[t]`` lists the origin cycle of every latent of C(t).
    """
    figure, axis = plt.subplots(figsize=(7, 4))
    _lineage_bars(axis, core_origins, _origins(core_origins))
    axis.set_ylabel("latents in C(t)")
    axis.set_title("Selected core per cycle, by origin cycle")
    axis.legend(fontsize=7)
    return _save(figure, path)


def lineage_panels_figure(panels: dict[str, Sequence[Sequence[int]]], path: Path) -> Path:
    """Figure 6: Figure 2 for several runs side by side (one panel per run, titled by its key), on
    one y scale and one colour per origin cycle."""
    origins = _origins(*panels.values())
    figure, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels) + 1, 4), sharey=True, squeeze=False)
    for axis, (title, core_origins) in zip(axes[0], panels.items()):
        _lineage_bars(axis, core_origins, origins)
        axis.set_title(title, fontsize=9)
    axes[0][0].set_ylabel("latents in C(t)")
    axes[0][-1].legend(fontsize=7)
    figure.suptitle("Selected core per cycle, by origin cycle")
    return _save(figure, path)


class TrainingCurve(NamedTuple):
    """One logged quantity during one SAE's training."""

    label: str
    steps: Sequence[int]
    values: Sequence[float]


def training_curves_figure(curves: Sequence[TrainingCurve], ylabel: str, title: str, path: Path) -> Path:
    """Figure 5: one logged quantity during training for several SAEs (one line each, log scale)."""
    figure, axis = plt.subplots(figsize=(7, 4))
    colors = plt.get_cmap("viridis", max(len(curves), 2))
    for n, curve in enumerate(curves):
        axis.plot(curve.steps, curve.values, color=colors(n), label=curve.label)
    axis.set_yscale("log")
    axis.set_xlabel("training step")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.legend(fontsize=7)
    return _save(figure, path)


class CoreCurve(NamedTuple):
    """L0_core during the training of one final SAE."""

    kind: str  # the kind's label (trainer.run.kinds)
    seed: int
    steps: Sequence[int]
    values: Sequence[float]


DEFAULT_STYLE = ("tab:green", None)  # the cycles


def _kind_labelled(label: str) -> SAEKind | None:
    """The kind whose series ``label`` is (SAEKind.label_for: a kind with a factor has a label per
    factor); None for the cycles."""
    for kind in KINDS.values():
        before, _, after = kind.label.partition(FACTOR)
        if label == kind.label or (kind.takes_factor and label.startswith(before) and label.endswith(after)):
            return kind
    return None


def style(label: str) -> tuple[str, str | None]:
    """Colour and marker of a series, by its label: its kind's (every factor of a kind shares them)."""
    kind = _kind_labelled(label)
    return (kind.color, kind.marker) if kind else DEFAULT_STYLE


def legend_order(label: str) -> tuple[int, str]:
    """The registry's order of kinds is the legend's; a kind's factors in the order of their labels."""
    kind = _kind_labelled(label)
    return (list(KINDS).index(kind.name) if kind else -1), label


def l0_core_figure(curves: Sequence[CoreCurve], path: Path) -> Path:
    """Figure 3: L0_core during training, distilled core against random core: every seed's
    trajectory, one colour per core, one line style per seed."""
    figure, axis = plt.subplots(figsize=(7, 4))
    seeds = sorted({curve.seed for curve in curves})
    styles = ["-", "--", ":", "-."]
    for curve in curves:
        n = seeds.index(curve.seed)
        label = curve.kind + (f", seed {curve.seed}" if len(seeds) > 1 else "")
        axis.plot(curve.steps, curve.values, color=style(curve.kind)[0], linestyle=styles[n % len(styles)], label=label)
    axis.set_xlabel("training step")
    axis.set_ylabel("L0 core (active core latents per token)")
    axis.set_title("Core usage during training: distilled vs random core" + (f" ({len(seeds)} seeds)" if len(seeds) > 1 else ""))
    axis.legend(fontsize=7)
    return _save(figure, path)


def every_core_figure(curves: Sequence[CoreCurve], path: Path) -> Path:
    """Figure 3's controls side by side: every frozen core's L0_core during training, the mean over
    its seeds; one colour per kind, one line style per factor of a kind."""
    by_label: dict[str, list[CoreCurve]] = {}
    for curve in curves:
        by_label.setdefault(curve.kind, []).append(curve)
    figure, axis = plt.subplots(figsize=(7, 4.5))
    styles, used = ["-", "--", ":", "-."], Counter()
    for label in sorted(by_label, key=legend_order):
        group = by_label[label]
        length = min(len(curve.values) for curve in group)
        mean = [sum(curve.values[i] for curve in group) / len(group) for i in range(length)]
        color = style(label)[0]
        axis.plot(group[0].steps[:length], mean, color=color, linestyle=styles[used[color] % len(styles)], label=label)
        used[color] += 1
    seeds = max(len(group) for group in by_label.values())
    axis.set_xlabel("training step")
    axis.set_ylabel("L0 core (active core latents per token)")
    axis.set_title("Core usage during training, every frozen core" + (f" (mean over {seeds} seeds)" if seeds > 1 else ""))
    axis.legend(fontsize=7)
    return _save(figure, path)


class MovementCurve(NamedTuple):
    """The median trainable decoder row's cosine to its initialisation during one SAE's training."""

    label: str  # the family ("cycle", "DMSAE (dense core)", ...)
    k: int
    seed: int
    steps: Sequence[int]
    values: Sequence[float]


def dictionary_movement_figure(curves: Sequence[MovementCurve], path: Path) -> Path:
    """How far each SAE's dictionary moved from its random initialisation during training: one line
    per SAE, coloured by family. Where the curves flatten, more steps stop moving the dictionary; a
    curve still near 1 is an SAE whose latents are mostly random directions."""
    figure, axis = plt.subplots(figsize=(7, 4))
    labelled = set()
    for curve in curves:
        color = style(curve.label)[0]
        axis.plot(curve.steps, curve.values, color=color, alpha=0.7, linewidth=1, label=None if curve.label in labelled else curve.label)
        labelled.add(curve.label)
    axis.axhline(0.5, color="gray", linestyle=":", linewidth=1)
    axis.set_ylim(0, 1.02)
    axis.set_xlabel("training step")
    axis.set_ylabel("median cosine of a trainable decoder row\nwith its initialisation")
    axis.set_title("How far training moved each dictionary")
    axis.legend(fontsize=7)
    return _save(figure, path)


def coverage_figure(curves: dict[str, Sequence[float]], tau: float, path: Path) -> Path:
    """Cumulative attribution coverage against the number of top-ranked candidates, per cycle."""
    figure, axis = plt.subplots(figsize=(7, 4))
    for name, coverage in curves.items():
        axis.plot(range(1, len(coverage) + 1), coverage, label=name)
    axis.axhline(tau, color="gray", linestyle="--", label=f"tau = {tau}")
    axis.set_xscale("log")
    axis.set_xlabel("top-ranked candidates (core + prefix-0)")
    axis.set_ylabel("fraction of total attribution")
    axis.set_title("Attribution coverage curves")
    axis.legend(fontsize=7)
    return _save(figure, path)


class SparsityPoint(NamedTuple):
    """One evaluated SAE on the sparsity-fidelity plane."""

    family: str  # the kind's label (trainer.run.kinds)
    k: int
    l0: float
    l0_noncore: float
    loss_recovered: float
    fve: float




def sparsity_fidelity_figure(points: Sequence[SparsityPoint], path: Path) -> Path:
    """Figure-4 analogue: loss recovered and FVE against measured held-out L0, global and non-core,
    one series per family (points labelled with their target k). With several seeds a point is the
    mean over them, its error bars the min-max range on both axes."""
    figure, axes = plt.subplots(2, 2, figsize=(10, 7), sharey="row")
    panels = [("loss_recovered", "loss recovered"), ("fve", "fraction of variance explained")]
    seeds = max(Counter((p.family, p.k) for p in points).values())
    for row, (metric, metric_label) in enumerate(panels):
        for col, (x_name, x_label) in enumerate([("l0", "L0 (global, Eq. 9)"), ("l0_noncore", "L0 non-core")]):
            axis = axes[row][col]
            for family in sorted({p.family for p in points}, key=legend_order):
                color, marker = style(family)
                ks = sorted({p.k for p in points if p.family == family})
                xs = [spread(getattr(p, x_name) for p in points if (p.family, p.k) == (family, k)) for k in ks]
                ys = [spread(getattr(p, metric) for p in points if (p.family, p.k) == (family, k)) for k in ks]
                order = sorted(range(len(ks)), key=lambda i: xs[i].mean)
                xs, ys, ks = [xs[i] for i in order], [ys[i] for i in order], [ks[i] for i in order]
                axis.errorbar(
                    [x.mean for x in xs], [y.mean for y in ys], xerr=_range_errors(xs), yerr=_range_errors(ys),
                    marker=marker, color=color, label=family, capsize=2,
                )
                for k, x, y in zip(ks, xs, ys):
                    axis.annotate(f"k={k}", (x.mean, y.mean), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
            axis.set_xscale("log", base=2)  # ticks at powers of two, where the target k values lie
            axis.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            axis.set_xlabel(f"measured {x_label}, held-out tokens")
            axis.set_ylabel(metric_label)
            axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    over = f"; mean and min-max over {seeds} seeds" if seeds > 1 else ""
    figure.suptitle(f"Sparsity-fidelity trade-off (held-out, inference threshold{over})")
    return _save(figure, path)


def _range_errors(values: Sequence[Spread]) -> list[list[float]]:
    """Matplotlib's asymmetric error bars for the min-max range around each mean (never negative:
    the mean of equal values can round a hair outside them)."""
    return [[max(0.0, v.mean - v.low) for v in values], [max(0.0, v.high - v.mean) for v in values]]


class ConsistencyBar(NamedTuple):
    """One pair of final SAEs of one family at different k, each value over the run's seeds."""

    label: str  # e.g. "DMSAE k=16 vs 32"
    core_matched: Spread  # fraction of core latents with a decoder match (cos >= 0.9)
    rest_matched: Spread
    core_mean_max_cosine: Spread
    rest_mean_max_cosine: Spread
    chance_mean_max_cosine: float  # what random directions reach against the same decoder


def consistency_figure(bars: Sequence[ConsistencyBar], path: Path) -> Path:
    """Feature consistency across sparsities: per pair of SAEs, the fraction of the smaller-k SAE's
    core and other latents whose decoder direction has a match in the other SAE (cos >= 0.9), and
    their mean max-cosine; error bars: the min-max range over seeds."""
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    positions = list(range(len(bars)))
    panels = [
        ("core_matched", "rest_matched", "fraction matched (cos >= 0.9)"),
        ("core_mean_max_cosine", "rest_mean_max_cosine", "mean max-cosine"),
    ]
    for axis, (core_field, rest_field, label) in zip(axes, panels):
        for offset, field_name, name in ((-0.2, core_field, "core (baseline: first |C*| latents)"), (0.2, rest_field, "rest")):
            values = [getattr(b, field_name) for b in bars]
            axis.bar([p + offset for p in positions], [v.mean for v in values], width=0.4, yerr=_range_errors(values), capsize=2, label=name)
        axis.set_xticks(positions, [b.label for b in bars], rotation=30, ha="right", fontsize=8)
        axis.set_ylim(0, 1.05)
        axis.set_ylabel(label)
    axes[1].scatter(positions, [b.chance_mean_max_cosine for b in bars], marker="_", s=600, color="black", label="random directions")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    seeds = bars[0].core_matched.n
    figure.suptitle("Feature consistency across sparsities (decoder directions)" + (f"; min-max over {seeds} seeds" if seeds > 1 else ""))
    return _save(figure, path)
