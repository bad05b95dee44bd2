"""The end of a run: all metrics in one file, the figures, and SUMMARY.md saying what each file is."""

from __future__ import annotations

import json
from pathlib import Path

from trainer.distill_config import DistillConfig
from trainer.distill_plan import FinalRun, final_runs
from trainer.figures import core_lineage_figure, coverage_figure, l0_core_figure
from trainer.run_directory import RunDirectory, read_json, write_json


def _log_curve(path: Path, name: str) -> tuple[list[int], list[float]]:
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r["step"] for r in records], [r[name] for r in records]


def _cycle_folders(paths: RunDirectory) -> list[Path]:
    return sorted((paths.root / "cycles").glob("cycle-*")) if (paths.root / "cycles").exists() else []


def collect_metrics(paths: RunDirectory, runs: list[FinalRun]) -> dict:
    """{"cycles": {name: metrics}, "transfer": {name: metrics}}."""
    metrics = {"cycles": {}, "transfer": {}}
    for folder in _cycle_folders(paths):
        metrics["cycles"][folder.name] = read_json(folder / "metrics.json")
    for run in runs:
        folder = paths.transfer(run.name)
        if folder.exists():
            metrics["transfer"][run.name] = read_json(folder / "metrics.json")
    return metrics


def draw_figures(config: DistillConfig, paths: RunDirectory) -> list[Path]:
    figures = []
    cores = [read_json(folder / "core.json") for folder in _cycle_folders(paths)]
    if cores:
        origins = [[origin for origin, _ in core["lineage"]] for core in cores]
        figures.append(core_lineage_figure(origins, paths.figures / "core_lineage.png"))
        curves = {f"cycle {core['cycle']}": core["coverage_curve"] for core in cores}
        figures.append(coverage_figure(curves, config.cycles.tau, paths.figures / "coverage_curve.png"))
    k = config.cycles.k
    distilled = paths.logs / f"transfer-k-{k:04d}-dense_core.jsonl"
    random_core = paths.logs / f"transfer-random-core-k-{k:04d}.jsonl"
    if distilled.exists() and random_core.exists():
        curves = {
            "distilled core": _log_curve(distilled, "l0_core"),
            "random core": _log_curve(random_core, "l0_core"),
        }
        figures.append(l0_core_figure(curves, paths.figures / "l0_core_distilled_vs_random.png"))
    return figures


SUMMARY = """# DMSAE distillation run

Configuration: `run_config.yaml` (resume with `--config run_config.yaml --run.resume true`).

| path | what it is |
|---|---|
| `cycles/cycle-NNN/` | cycle t's SAE (`AutoModel.from_pretrained`), `core.json` (the selected core C(t): latent indices by descending attribution, their scores, lineage `[origin_cycle, origin_index]`, coverage curve), `core_directions.safetensors` (the selected encoder rows, the next cycle's frozen core) and `metrics.json` (held-out metrics) |
| `distilled_core/` | C* = C(T) ∩ C(T-1): `core.json` and `core_directions.safetensors`, the input of the transfer stage (`--transfer.core`) |
| `transfer/k-KKKK-VARIANT/` | the final SAEs: fresh DMSAEs trained from C* at sparsity k (Algorithm 3), with `metrics.json` |
| `transfer/random-core-k-KKKK/` | the Figure-3 control: a random core of the same size |
| `metrics.json` | every metric of every SAE above |
| `figures/core_lineage.png` | Figure 2: size of C(t) per cycle, coloured by the cycle each latent first appeared in |
| `figures/l0_core_distilled_vs_random.png` | Figure 3: L0 of the core during training, distilled vs random core |
| `figures/coverage_curve.png` | attribution coverage curve of each cycle's selection, with tau |
| `logs/STAGE.jsonl` | training curves (loss, L0 core / non-core, dead fraction) every `run.log_every` steps; tensorboard events beside |
| `hub/` | the exact folders pushed to the Hub, with their model cards |
| `cache/` | harvested activations and the (x, g) attribution sample (reused by every cycle and by a resumed run) |
| `checkpoints/` | training checkpoints of unfinished stages (`--run.resume true` continues from them) |

Metrics (held-out tokens, inference mode): FVE, MSE (per element), L0 core / non-core / all,
dead fraction (never firing on held-out tokens), next-token loss clean / spliced / zero-ablated
and loss recovered, core size and carry-over (the fraction of a cycle's core it selects again).
"""


def write_report(config: DistillConfig, paths: RunDirectory) -> None:
    write_json(paths.root / "metrics.json", collect_metrics(paths, final_runs(config)))
    draw_figures(config, paths)
    (paths.root / "SUMMARY.md").write_text(SUMMARY)
