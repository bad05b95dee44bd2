"""The study's sweeps: bench/study/sweep.py (runs that differ in one setting, side by side) and the
length control's configuration."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import yaml

from test_distill import finished_run, tiny_setup  # noqa: F401 (fixtures)
from trainer.config import parse_config
from trainer.run.kinds import BASELINE, DMSAE
from trainer.run.stages import final_saes

STUDY = Path(__file__).parent.parent / "bench" / "study"


def _sweep_module():
    spec = importlib.util.spec_from_file_location("sweep", STUDY / "sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _copy_with_tau(run: Path, target: Path, tau: float) -> Path:
    """A copy of ``run`` whose configuration says another tau (its results are the run's: only the
    reader is tested)."""
    shutil.copytree(run, target)
    settings = yaml.safe_load((target / "run_config.yaml").read_text())
    settings["cycles"]["tau"] = tau
    settings["run"]["output_dir"] = str(target)
    (target / "run_config.yaml").write_text(yaml.safe_dump(settings))
    return target


def test_the_sweep_lists_each_runs_cores_and_final_saes(finished_run, tmp_path):  # noqa: F811
    sweep = _sweep_module()
    other = _copy_with_tau(finished_run, tmp_path / "tau-0.5", 0.5)
    text = sweep.sweep_summary([finished_run, other], ["cycles.tau"], tmp_path / "out")
    assert (tmp_path / "out" / "SUMMARY.md").read_text() == text + "\n"
    cores = [json.loads((folder / "core.json").read_text())["selected"] for folder in sorted((finished_run / "cycles").iterdir())]
    distilled = len(json.loads((finished_run / "distilled_core" / "core.json").read_text())["selected"])
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| tau = ") and ":" not in line}
    assert set(rows) == {"tau = 0.9", "tau = 0.5"}
    header = next(line for line in text.splitlines() if line.startswith("| run |")).strip("| ").split(" | ")
    cells = dict(zip(header, rows["tau = 0.9"].strip("| ").split(" | ")))
    assert [int(cells[f"C({t}) (carry-over)"].split(" ")[0]) for t in range(len(cores))] == [len(core) for core in cores]
    last = json.loads((finished_run / "cycles" / f"cycle-{len(cores) - 1:03d}" / "core.json").read_text())
    assert cells[f"C({len(cores) - 1}) / candidates"] == f"{len(cores[-1]) / last['candidate_pool_size']:.0%}"
    assert int(cells["C*"]) == distilled
    finals = json.loads((finished_run / "metrics.json").read_text())["transfer"]
    for label in ("tau = 0.9", "tau = 0.5"):
        assert all(f"| {label}: {name} |" in text for name in finals), "every final SAE of every run"
    for figure in ("core_lineage.png", "reconstruction_loss.png"):
        assert (tmp_path / "out" / figure).stat().st_size > 0 and f"]({figure})" in text


def test_the_sweep_refuses_runs_that_differ_in_another_setting(finished_run, tmp_path):  # noqa: F811
    sweep = _sweep_module()
    other = _copy_with_tau(finished_run, tmp_path / "tau-0.5", 0.5)
    with pytest.raises(SystemExit, match=r"differ in more than --vary cycles.k: cycles.tau: 0.9 -> 0.5"):
        sweep.sweep_summary([finished_run, other], ["cycles.k"], tmp_path / "out")
    assert not (tmp_path / "out").exists(), "refused before writing anything"


def test_the_length_config_is_the_controls_with_four_times_the_training_at_matched_l0():
    """bench/study/length.yaml: the controls' settings but for the final SAEs' tokens (4x), the
    output folder and which SAEs: the dense DMSAE at k = 32 and the baseline at k = 128."""
    controls, length = (parse_config(["--config", str(STUDY / name)]) for name in ("controls.yaml", "length.yaml"))
    controls_only = {"random_core_control", "sparsity_matched", "baseline", "core_scale", "random_sparse_control", "baseline_ks"}
    for section in vars(length):
        for name, value in vars(getattr(length, section)).items():
            changed = (section, name) in {("transfer", "tokens"), ("run", "output_dir")} or (section == "transfer" and name in controls_only)
            assert changed or value == getattr(getattr(controls, section), name), f"{section}.{name}"
    assert length.transfer.tokens == 4 * controls.transfer.tokens and length.run.output_dir != controls.run.output_dir
    trained = [(final.kind, final.k, final.seed) for final in final_saes(length)]
    assert trained == [(kind, k, seed) for seed in (0, 1, 2) for kind, k in ((DMSAE, 32), (BASELINE, 128))]
    assert {(f.kind, f.k, f.seed) for f in final_saes(controls)} >= set(trained), "the SAEs of the controls, trained longer"
