"""The PNG figures of a run: the paper's Figures 2, 3 and (an analogue of) 4, the attribution
coverage curves and feature consistency across sparsities."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import NamedTuple, Sequence

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from trainer.run.files import atomic_path  # noqa: E402


def _save(figure, path: Path) -> Path:
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


def core_lineage_figure(core_origins: Sequence[Sequence[int]], path: Path) -> Path:
    """Figure 2: size of each selected core C(t), stacked by the cycle each latent first appeared in.

    ``core_origins[t]`` lists the origin cycle of every latent of C(t).
    """
    cycles = range(len(core_origins))
    origins = sorted({o for core in core_origins for o in core})
    colors = plt.get_cmap("viridis", max(len(origins), 2))
    figure, axis = plt.subplots(figsize=(7, 4))
    bottoms = [0] * len(core_origins)
    for n, origin in enumerate(origins):
        heights = [Counter(core)[origin] for core in core_origins]
        axis.bar(cycles, heights, bottom=bottoms, color=colors(n), label=f"first selected in cycle {origin}")
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    axis.set_xlabel("cycle t")
    axis.set_ylabel("latents in C(t)")
    axis.set_title("Selected core per cycle, by origin cycle")
    axis.set_xticks(list(cycles))
    axis.legend(fontsize=7)
    return _save(figure, path)


def l0_core_figure(curves: dict[str, tuple[Sequence[int], Sequence[float]]], path: Path) -> Path:
    """Figure 3: L0_core during training for each named run (distilled core vs random core)."""
    figure, axis = plt.subplots(figsize=(7, 4))
    for name, (steps, values) in curves.items():
        axis.plot(steps, values, label=name)
    axis.set_xlabel("training step")
    axis.set_ylabel("L0 core (active core latents per token)")
    axis.set_title("Core usage during training: distilled vs random core")
    axis.legend()
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

    family: str  # e.g. "DMSAE (dense core)", "Matryoshka baseline"
    k: int
    l0: float
    l0_noncore: float
    loss_recovered: float
    fve: float


FAMILY_STYLES = {
    "DMSAE (dense core)": ("tab:blue", "o"),
    "DMSAE (sparse core)": ("tab:purple", "s"),
    "Matryoshka baseline": ("tab:gray", "^"),
    "random core": ("tab:red", "x"),
}


def sparsity_fidelity_figure(points: Sequence[SparsityPoint], path: Path) -> Path:
    """Figure-4 analogue: loss recovered and FVE against measured held-out L0, global and non-core,
    one series per family (points labelled with their target k)."""
    figure, axes = plt.subplots(2, 2, figsize=(10, 7), sharey="row")
    panels = [("loss_recovered", "loss recovered"), ("fve", "fraction of variance explained")]
    for row, (metric, metric_label) in enumerate(panels):
        for col, (x_name, x_label) in enumerate([("l0", "L0 (global, Eq. 9)"), ("l0_noncore", "L0 non-core")]):
            axis = axes[row][col]
            for family, (color, marker) in FAMILY_STYLES.items():
                series = sorted((p for p in points if p.family == family), key=lambda p: getattr(p, x_name))
                if not series:
                    continue
                xs, ys = [getattr(p, x_name) for p in series], [getattr(p, metric) for p in series]
                axis.plot(xs, ys, marker=marker, color=color, label=family)
                for p, x, y in zip(series, xs, ys):
                    axis.annotate(f"k={p.k}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
            axis.set_xscale("log", base=2)  # ticks at powers of two, where the target k values lie
            axis.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            axis.set_xlabel(f"measured {x_label}, held-out tokens")
            axis.set_ylabel(metric_label)
            axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.suptitle("Sparsity-fidelity trade-off (held-out, inference threshold)")
    return _save(figure, path)


class ConsistencyBar(NamedTuple):
    """One pair of final SAEs of one family at different k."""

    label: str  # e.g. "DMSAE k=16 vs 32"
    core_matched: float  # fraction of core latents with a decoder match (cos >= 0.9)
    rest_matched: float
    core_mean_max_cosine: float
    rest_mean_max_cosine: float
    chance_mean_max_cosine: float  # what random directions reach against the same decoder


def consistency_figure(bars: Sequence[ConsistencyBar], path: Path) -> Path:
    """Feature consistency across sparsities: per pair of SAEs, the fraction of the smaller-k SAE's
    core and other latents whose decoder direction has a match in the other SAE (cos >= 0.9), and
    their mean max-cosine."""
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    positions = list(range(len(bars)))
    panels = [
        ("core_matched", "rest_matched", "fraction matched (cos >= 0.9)"),
        ("core_mean_max_cosine", "rest_mean_max_cosine", "mean max-cosine"),
    ]
    for axis, (core_field, rest_field, label) in zip(axes, panels):
        axis.bar([p - 0.2 for p in positions], [getattr(b, core_field) for b in bars], width=0.4, label="core (baseline: first |C*| latents)")
        axis.bar([p + 0.2 for p in positions], [getattr(b, rest_field) for b in bars], width=0.4, label="rest")
        axis.set_xticks(positions, [b.label for b in bars], rotation=30, ha="right", fontsize=8)
        axis.set_ylim(0, 1.05)
        axis.set_ylabel(label)
    axes[1].scatter(positions, [b.chance_mean_max_cosine for b in bars], marker="_", s=600, color="black", label="random directions")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    figure.suptitle("Feature consistency across sparsities (decoder directions)")
    return _save(figure, path)
