"""The PNG figures of a run: the paper's Figures 2 and 3 and the attribution coverage curves."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def _save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp.png")
    figure.savefig(temporary, dpi=120, bbox_inches="tight")
    plt.close(figure)
    temporary.replace(path)
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
