"""Defects found while reorganising trainer/ (issue 17), each pinned down."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from modeling_dmsae import DMSAEConfig, DMSAEModel
from trainer.config import DEFAULT_CONFIG, OptimizerConfig, parse_config
from trainer.report.summary import figure3_outcome, finals_table
from trainer.run.layout import RunDirectory
from trainer.run.kinds import BASELINE, DMSAE, DMSAE_SPARSE_CORE, RANDOM_CORE
from trainer.run.metrics_file import SAEMetrics
from trainer.run.stages import FinalSAE

ROOT = Path(__file__).resolve().parent.parent


def test_a_random_core_that_never_fired_early_does_not_crash_the_report(tmp_path):
    config = parse_config(["--run.output_dir", str(tmp_path)])
    paths = RunDirectory(tmp_path)
    k = config.cycles.k
    metrics = {}
    for run, curve in ((FinalSAE(DMSAE, k), [5.0] * 20), (FinalSAE(RANDOM_CORE, k), [0.0] * 10 + [3.0] * 10)):
        paths.logs.mkdir(parents=True, exist_ok=True)
        paths.log(run.stage).write_text("".join(json.dumps({"step": i, "l0_core": v}) + "\n" for i, v in enumerate(curve)))
        sae = DMSAEModel(DMSAEConfig(d_in=8, num_latents=64, group_sizes=[16, 48], k=4, core_size=0))
        sae.save_pretrained(paths.transfer(run.name))
        metrics[run.name] = SAEMetrics({"l0_core": curve[-1], "core_size": 0, "fve": 0.8, "loss_recovered": 0.97}, run.kind.name)
    outcome = figure3_outcome(paths, config, metrics)
    assert "from 0.0 (first tenth of training) to 3.0" in outcome and "did not fire in the first tenth" in outcome


def test_the_final_sae_table_is_ordered_by_kind_then_k():
    def m(k, kind):
        values = {"k": k, "core_size": 10 if kind.has_core else 0, "l0_core": 1.0, "l0_noncore": k, "l0": k + 1.0, "k_noncore": k,
                  "fve": 0.5, "dead_fraction": 0.0, "loss_recovered": 0.9}  # fmt: skip
        return SAEMetrics(values, kind.name)

    transfer = {
        "k-0016": m(16, DMSAE), "k-0064": m(64, DMSAE), "k-0032": m(32, DMSAE), "random-core-k-0032": m(32, RANDOM_CORE),
        "baseline-k-0064": m(64, BASELINE), "baseline-k-0016": m(16, BASELINE), "k-0032-sparse": m(32, DMSAE_SPARSE_CORE),
    }  # fmt: skip
    rows = [line.split(" | ")[0].lstrip("| ") for line in finals_table(transfer).splitlines()[2:]]
    assert rows == ["k-0016", "k-0032", "k-0064", "k-0032-sparse", "baseline-k-0016", "baseline-k-0064", "random-core-k-0032"]


def test_importing_the_harvest_leaves_the_umask_alone():
    """In a fresh process (a reload here would give the harvest's error classes new identities)."""
    probe = "import os\ndef refuse(mask):\n    raise SystemExit('the process umask was changed')\nos.umask = refuse\nimport trainer.harvest.cache\n"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_code_default_calibration_is_the_default_runs():
    assert OptimizerConfig().calibration_tokens == yaml.safe_load(DEFAULT_CONFIG.read_text())["optimizer"]["calibration_tokens"]


@pytest.mark.timeout(300)
def test_the_package_builds_without_warnings_and_ships_its_data(tmp_path):
    source = tmp_path / "source"  # a copy: an in-place build would leave build/ in the checkout
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md", "trainer", "hub_cards", "modeling_dmsae"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if (ROOT / name).is_dir() else {}))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(source)],
        capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "absent from the `packages`" not in result.stdout + result.stderr
    assert "Warning" not in result.stdout + result.stderr
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"trainer/configs/default.yaml", "trainer/report/throughputs.json", "hub_cards/templates/final_sae.md"} <= names
    assert not any("__pycache__" in name for name in names)
