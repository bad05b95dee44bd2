"""Runs that differ in one setting of the cycles, side by side: the paper's Figure 5 (the attribution
coverage tau) and Figure 6 (the cycles' k) at the study's scale.

    .venv/bin/python bench/study/sweep.py --vary cycles.tau --out bench/study/results/tau \\
        runs/study-tau-0.3 runs/study-tau-0.5 runs/study-tau-0.7 runs/study-tau-0.9

Refuses runs whose configurations differ in anything but the settings named by ``--vary`` (and
where their output goes), so that the sweep is a control of that setting alone. Writes ``SUMMARY.md``
in ``--out``: per run, every cycle's selected core C(t) with its carry-over, C* and the held-out
metrics of its final SAEs; and two figures: the cores per cycle by origin cycle, one panel per run
(Figure 6), and each final SAE's training reconstruction loss (Figure 5). Reads the run folders only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout, like the other benchmarks

from trainer.report.figures import TrainingCurve, lineage_panels_figure, training_curves_figure  # noqa: E402
from trainer.report.summary import core_origins, finals_table, markdown_table, metric_cell  # noqa: E402
from trainer.run.files import read_json, write_text  # noqa: E402
from trainer.run.layout import CORE_JSON, RUN_CONFIG, RunDirectory  # noqa: E402
from trainer.run.logs import read_curve  # noqa: E402
from trainer.run.metrics_file import RunMetrics, SAEMetrics  # noqa: E402
from trainer.run.stages import FinalSAE  # noqa: E402

WHERE_IT_GOES = {"run.output_dir"}
"""Settings that may differ between the runs of a sweep: they change where results go, not what they are."""


def flat_settings(run: Path) -> dict[str, object]:
    """The run's run_config.yaml as ``section.field: value``."""
    sections = yaml.safe_load((run / RUN_CONFIG).read_text())
    return {f"{section}.{name}": value for section, fields in sections.items() for name, value in (fields or {}).items()}


def check_one_setting_varies(settings: dict[Path, dict[str, object]], vary: list[str]) -> None:
    """Refuse runs (their flat settings, by folder) that differ in a setting not named by ``vary``,
    naming it and the runs."""
    (first_run, first), *others = settings.items()
    for run, other in others:
        differ = sorted(key for key in first.keys() | other.keys() if first.get(key) != other.get(key))
        unexpected = [key for key in differ if key not in WHERE_IT_GOES and key not in vary]
        if unexpected:
            changes = "; ".join(f"{key}: {first.get(key)!r} -> {other.get(key)!r}" for key in unexpected)
            raise SystemExit(f"{first_run} and {run} differ in more than --vary {' '.join(vary)}: {changes}. "
                             f"Compare runs that differ in one setting, or name it in --vary.")  # fmt: skip


def setting_label(settings: dict[str, object], vary: list[str]) -> str:
    return ", ".join(f"{key.split('.')[-1]} = {settings.get(key)}" for key in vary)


def cores_table(runs: dict[str, RunDirectory], cores: dict[str, list[dict]], metrics: dict[str, RunMetrics]) -> str:
    """Per run: |C(t)| with the carry-over from C(t-1); the share of its candidates (core +
    prefix-0) the last C(t) takes, which says how concentrated the attribution is; C* and the last
    cycle's held-out FVE."""
    cycles = max(len(m.cycles) for m in metrics.values())
    rows = []
    for label, paths in runs.items():
        carry_overs = (metric_cell(m, "carry_over") for m in metrics[label].cycles.values())
        cells = [f"{len(core['selected'])}" + (f" ({carry})" if carry else "") for core, carry in zip(cores[label], carry_overs)]
        share = len(cores[label][-1]["selected"]) / cores[label][-1]["candidate_pool_size"]
        distilled = len(read_json(paths.distilled_core / CORE_JSON)["selected"])
        fve = list(metrics[label].cycles.values())[-1]["fve"]
        rows.append([label, *cells, *[""] * (cycles - len(cells)), f"{share:.0%}", str(distilled), f"{fve:.3f}"])
    last_cycle = cycles - 1
    header = ["run", *(f"C({t}) (carry-over)" for t in range(cycles)), f"C({last_cycle}) / candidates", "C*", f"cycle {last_cycle} FVE"]
    return markdown_table(header, rows)


def every_final_sae(metrics: dict[str, RunMetrics]) -> dict[str, SAEMetrics]:
    """Every final SAE of every run, named "run: SAE"."""
    return {f"{label}: {name}": m for label, run in metrics.items() for name, m in run.transfer.items()}


def reconstruction_curves(runs: dict[str, RunDirectory], metrics: dict[str, RunMetrics]) -> list[TrainingCurve]:
    """Each final SAE's logged training reconstruction loss, labelled by run (and SAE where a run has several)."""
    curves = []
    for label, paths in runs.items():
        transfer = metrics[label].transfer
        for name, m in transfer.items():
            curve_label = label if len(transfer) == 1 else f"{label}: {name}"
            curves.append(TrainingCurve(curve_label, *read_curve(paths.log(FinalSAE.from_metrics(m).stage), "reconstruction_loss")))
    return curves


def sweep_summary(runs: list[Path], vary: list[str], out: Path) -> str:
    settings = {run: flat_settings(run) for run in runs}
    check_one_setting_varies(settings, vary)
    labelled = {setting_label(settings[run], vary): RunDirectory(run) for run in runs}
    metrics = {label: RunMetrics.read(paths.metrics) for label, paths in labelled.items()}
    cores = {label: [read_json(folder / CORE_JSON) for folder in paths.cycles()] for label, paths in labelled.items()}
    out.mkdir(parents=True, exist_ok=True)
    lineage = lineage_panels_figure({label: core_origins(run_cores) for label, run_cores in cores.items()}, out / "core_lineage.png")
    curves = training_curves_figure(
        reconstruction_curves(labelled, metrics), "training reconstruction loss\n(sum over Matryoshka prefixes)",
        f"Final SAEs during training, by {', '.join(vary)}", out / "reconstruction_loss.png",
    )  # fmt: skip
    differences = "\n".join(f"- {label}: `{paths.root}`" for label, paths in labelled.items())
    text = "\n\n".join([
        f"# Runs by {', '.join(vary)}",
        f"Runs (identical configurations but for {', '.join(vary)} and their folders):\n\n{differences}",
        "## Selected cores per cycle\n\n|C(t)|, and in brackets the fraction of C(t-1) selected again (carry-over); "
        "the share of the last cycle's candidates (its core and first Matryoshka group) that reach coverage tau.\n\n"
        + cores_table(labelled, cores, metrics) + f"\n\n![cores per cycle]({lineage.name})",
        "## Final SAEs (held out)\n\n" + finals_table(every_final_sae(metrics)) + f"\n\n![training reconstruction loss]({curves.name})",
    ])  # fmt: skip
    write_text(out / "SUMMARY.md", text + "\n")
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="finished run folders")
    parser.add_argument("--vary", nargs="+", required=True, help="the settings the runs differ in, e.g. cycles.tau")
    parser.add_argument("--out", type=Path, required=True, help="folder for SUMMARY.md and the figures")
    args = parser.parse_args()
    print(sweep_summary(args.runs, args.vary, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
