"""Where does training stop moving the dictionaries? The table behind a run's
``figures/dictionary_movement.png``, as numbers:

    .venv/bin/python bench/study/movement.py runs/study

For every kind of SAE (the cycles, then each family at each k), the median trainable decoder row's
cosine with its initialisation at each tenth of training, averaged over the SAEs of that kind (the
seeds), with the smallest and largest at the end; and the last tenth's fall, which says whether more
steps would still move it. Reads the run's logs and metrics.json only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from statistics import fmean

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout, like the other benchmarks

from trainer.report.summary import movement_curves  # noqa: E402
from trainer.run.layout import RunDirectory  # noqa: E402
from trainer.run.metrics_file import RunMetrics  # noqa: E402

TENTHS = [i / 10 for i in range(1, 11)]


def at_fraction(steps: list[int], values: list[float], fraction: float) -> float:
    """The logged value nearest to ``fraction`` of the way through training."""
    target = fraction * steps[-1]
    return values[min(range(len(steps)), key=lambda i: abs(steps[i] - target))]


def movement_table(run: Path) -> str:
    paths = RunDirectory(run)
    transfer = RunMetrics.read(paths.metrics).transfer
    kinds: dict[str, list] = {}
    curves = movement_curves(paths, transfer)
    families = list(dict.fromkeys(curve.label for curve in curves))  # the report's order: cycles, DMSAEs, ..., baselines
    for curve in sorted(curves, key=lambda c: (families.index(c.label), c.k)):
        kinds.setdefault(f"{curve.label}, k = {curve.k}", []).append(curve)
    header = ["SAEs", "n", *(f"{int(f * 100)}%" for f in TENTHS), "end: min, max", "fall over the last tenth"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for kind, curves in kinds.items():
        means = [fmean(at_fraction(list(c.steps), list(c.values), f) for c in curves) for f in TENTHS]
        ends = [c.values[-1] for c in curves]
        cells = [kind, str(len(curves)), *(f"{m:.2f}" for m in means), f"{min(ends):.2f}, {max(ends):.2f}", f"{means[-2] - means[-1]:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished run's folder")
    print(movement_table(parser.parse_args().run))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
