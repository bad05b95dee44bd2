"""Two CPU processes under `accelerate launch` (gloo): replicas stay identical, the core stays
frozen, and the whole distillation runs distributed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_distill import tiny_args, tiny_setup  # noqa: F401  (fixture)

WORKER = Path(__file__).with_name("ddp_worker.py")


def accelerate_launch(*args: str) -> str:
    """Run the worker on two CPU processes exactly as a user would launch a multi-GPU job."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(WORKER), *args,
    ]  # fmt: skip
    environment = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout


def test_ddp_replicas_stay_identical_and_core_frozen():
    assert "replicas identical" in accelerate_launch("replicas")


def test_distillation_runs_on_two_processes(tiny_setup, tmp_path):
    output = tmp_path / "run"
    accelerate_launch("distill", *tiny_args(tiny_setup, output, "--transfer.ks", "16", "--transfer.random_core_control", "false"))
    manifest = json.loads((output / "cache" / "activations" / "manifest.json").read_text())
    assert manifest["complete"]
    logged_steps = {json.loads(line)["step"] for line in (output / "logs" / "cycle-001.jsonl").read_text().splitlines()}
    assert logged_steps, "training logged nothing"
    assert (output / "transfer" / "k-0016-dense_core" / "model.safetensors").exists()
    assert json.loads((output / "distilled_core" / "core.json").read_text())["selected"]
