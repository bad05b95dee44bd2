"""Two CPU processes under `accelerate launch` (gloo): replicas stay identical, the core stays
frozen, and the whole distillation runs distributed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from test_distill import tiny_args, tiny_setup  # noqa: F401  (fixture)
from trainer import distill

WORKER = Path(__file__).with_name("ddp_worker.py")


def kill_launched(marker: str) -> None:
    """SIGKILL every process of one launch: the launcher's group, and the workers, which torchrun
    starts in sessions of their own (found by the marker in their environment)."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker.encode() in (proc / "environ").read_bytes().split(b"\0"):
                os.kill(int(proc.name), signal.SIGKILL)
        except OSError:  # gone meanwhile, or not ours to read
            continue


def launch_two(*args: str, timeout: float = 240) -> tuple[int | None, str, str]:
    """Run the worker on two CPU processes exactly as a user would launch a multi-GPU job:
    (exit status, stdout, stderr); the status is None when the launch hung past ``timeout`` and
    was killed."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(WORKER), *args,
    ]  # fmt: skip
    launch_id = uuid.uuid4().hex
    # The checkout under test, not whichever one the environment has installed.
    pythonpath = os.pathsep.join(filter(None, [str(WORKER.parent.parent), os.environ.get("PYTHONPATH")]))
    environment = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "DMSAE_TEST_LAUNCH": launch_id, "PYTHONPATH": pythonpath}
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment, start_new_session=True
    ) as launch:
        try:
            stdout, stderr = launch.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_launched(f"DMSAE_TEST_LAUNCH={launch_id}")
            stdout, stderr = launch.communicate(timeout=60)
            return None, stdout, stderr
    return launch.returncode, stdout, stderr


def single_process(*args: str) -> None:
    """Run the worker on one plain process, importing the checkout under test."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent.parent)}
    subprocess.run([sys.executable, str(WORKER), *args], check=True, env=environment, timeout=240)


def accelerate_launch(*args: str, finished: Callable[[str], bool]) -> None:
    """Launch two processes and require them to finish. ``finished(stdout)`` says whether the work
    itself completed. torch 2.13's gloo can deadlock while tearing the process group down
    (trainer.distill.shut_down makes it rare); a launch that finished its work and then hangs in
    teardown is killed and counts as passed."""
    status, stdout, stderr = launch_two(*args)
    if status is None:
        assert finished(stdout), "the two-process launch hung before finishing:\n" + stderr[-5000:]
        return
    assert status == 0 and finished(stdout), stdout[-3000:] + stderr[-5000:]


def test_ddp_replicas_stay_identical_and_core_frozen():
    accelerate_launch("replicas", finished=lambda stdout: "replicas identical" in stdout)


def test_two_processes_train_the_same_sae_as_one(tmp_path):
    """1 process on batches of 2B tokens and 2 gloo processes on B each: the same steps to the same
    weights (global BatchTopK, AuxK variance, dead counts and b_dec's median over both batches)."""
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    single_process("global-batch", str(one))
    accelerate_launch("global-batch", str(two), finished=lambda stdout: "global batches trained" in stdout and two.exists())
    single, double = torch.load(one, weights_only=True), torch.load(two, weights_only=True)
    assert single["aux_losses"].gt(0).any(), "AuxK never ran: the test would not cover its variance"
    torch.testing.assert_close(double["losses"], single["losses"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(double["aux_losses"], single["aux_losses"], rtol=1e-4, atol=1e-6)
    assert torch.equal(double["tokens_since_fired"], single["tokens_since_fired"])
    torch.testing.assert_close(double["threshold"], single["threshold"], rtol=1e-5, atol=1e-6)
    for name, tensor in single["state"].items():
        torch.testing.assert_close(double["state"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_distillation_runs_on_two_processes_to_the_same_saes_as_on_one(tiny_setup, tmp_path):
    """The batch is global and the data go by lane: one config on 1 and on 2 processes trains the
    same SAEs (up to the summation order of the gradient's all-reduce) and selects the same cores."""
    args = ("--transfer.ks", "16", "--transfer.random_core_control", "false", "--transfer.sparsity_matched", "false")
    two, one = tmp_path / "two", tmp_path / "one"
    accelerate_launch("distill", *tiny_args(tiny_setup, two, *args), finished=lambda stdout: (two / "SUMMARY.md").exists())
    manifest = json.loads((two / "cache" / "activations" / "manifest.json").read_text())
    assert manifest["complete"]
    logged_steps = {json.loads(line)["step"] for line in (two / "logs" / "cycle-001.jsonl").read_text().splitlines()}
    assert logged_steps, "training logged nothing"
    assert json.loads((two / "distilled_core" / "core.json").read_text())["selected"]
    assert distill.main(tiny_args(tiny_setup, one, *args)) == 0
    assert_the_same_saes(one, two)


def assert_the_same_saes(one: Path, two: Path) -> None:
    """The SAEs and cores of a run on one process (``one``) and on two (``two``) are the same, up
    to the summation order of the gradient's all-reduce."""
    for stage in ("cycles/cycle-000", "cycles/cycle-001", "cycles/cycle-002", "transfer/baseline-k-0016"):
        single, double = load_file(one / stage / "model.safetensors"), load_file(two / stage / "model.safetensors")
        for name, tensor in single.items():
            torch.testing.assert_close(double[name], tensor, rtol=1e-4, atol=1e-5, msg=f"{stage} {name}")
    # The DMSAE starts from cores that differ by the cycles' summation order (~3e-8): a BatchTopK
    # near-tie can turn that into a few decoder entries ~1e-4 apart (measured: 0.01% of them beyond
    # 1e-5). Its own training, SAE-parallel on 2 processes, is bit for bit one process's
    # (tests/test_sae_parallel.py).
    single, double = (load_file(run / "transfer" / "k-0016-dense_core" / "model.safetensors") for run in (one, two))
    for name, tensor in single.items():
        apart = (double[name] - tensor).abs()
        assert apart.max() < 1e-3 and (apart > 1e-5).float().mean() < 1e-3, f"transfer {name}: {apart.max():.2e} apart"
    for t in range(3):
        core = lambda run: json.loads((run / "cycles" / f"cycle-{t:03d}" / "core.json").read_text())["selected"]  # noqa: E731
        assert core(one) == core(two), f"cycle {t}"


def test_a_failure_on_the_main_process_ends_both_with_the_cause(tiny_setup, tmp_path):
    """Rank 0 fails in work it does alone while rank 1 waits in a collective: both exit promptly,
    rank 1 naming rank 0's error rather than a closed connection."""
    failed_at = tmp_path / "failed_at"
    status, stdout, stderr = launch_two("fail-on-main", str(failed_at), *tiny_args(tiny_setup, tmp_path / "run"), timeout=200)
    ended = time.time()
    assert status not in (None, 0), stderr[-5000:]
    assert ended - float(failed_at.read_text()) < 30, "the processes did not end promptly after the failure"
    assert "RuntimeError: injected failure in a main-only step" in stderr  # process 0's own traceback
    assert "distill.py: error: process 0 stopped the run: RuntimeError: injected failure in a main-only step" in stderr
    assert "Connection closed by peer" not in stderr


REPORT_S = 8.0


def test_a_main_only_phase_longer_than_the_process_group_timeout_ends_the_run(tmp_path):
    """The report, on the main process alone, takes REPORT_S while the other process waits in its
    barrier: --run.process_group_timeout_s reaches the process group. Shorter than the phase, the
    waiting process times out and both end at once, well before the phase would have finished;
    longer, the run ends well."""
    began = tmp_path / "began"
    status, stdout, stderr = launch_two("main-only-phase", "2", str(REPORT_S), str(began), str(tmp_path / "short"), timeout=120)
    ended = time.time()
    assert status not in (None, 0), stdout[-3000:] + stderr[-5000:]
    assert ended - float(began.read_text()) < REPORT_S - 1, "the timeout did not cut the wait short"
    assert "distill.py: error: process 1 stopped the run" in stderr, stderr[-5000:]  # process 0 ended too, mid-report
    accelerate_launch("main-only-phase", "60", str(REPORT_S), str(began), str(tmp_path / "long"), finished=lambda out: "report written" in out)
