"""Whole-run figures: wall time of the default distillation split by stage.

    .venv/bin/python bench/bench_distill.py [--keep DIR] [distill.py overrides ...]

Runs ``trainer/distill.py`` (the embedded default unless overridden) in a fresh run directory,
then prints the wall time of each kind of work from the run's ``timings.json`` (harvest,
cycle training, attribution, evaluation, transfer training, report) and the total, beside what the
``--dry-run`` cost plan estimated for each from ``trainer/report/throughputs.json``, with the machine's speed
measured just before (machines of one kind differ up to 3x between sessions) and the load average
after (other jobs on the machine slow every stage).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def machine_speed(size: int = 1024, repeats: int = 20) -> float:
    """fp32 matrix-multiply throughput of this machine in GFLOP/s, at torch's default threads."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def planned_seconds(overrides: list[str], run_dir: Path) -> dict[str, float]:
    """The cost plan's seconds per stage for this run on this machine (empty when not estimated)."""
    from trainer.config import parse_config
    from trainer.harvest.base_model import base_model_width
    from trainer.report.dry_run import device_kind, estimate_stage_times
    from trainer.run.stages import planned_processes

    config = parse_config(["--run.output_dir", str(run_dir), *overrides])
    width = config.dictionary.d_in or base_model_width(config.model)
    estimate = estimate_stage_times(config, width, planned_processes(config), device_kind())
    return {} if estimate is None else {stage: value for stage, value in estimate.stages.items() if isinstance(value, float)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", help="run directory to keep (default: a temporary one)")
    args, overrides = parser.parse_known_args()
    speed = machine_speed()
    with tempfile.TemporaryDirectory() as scratch:
        run_dir = Path(args.keep or Path(scratch) / "run")
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, str(ROOT / "trainer" / "distill.py"), "--run.output_dir", str(run_dir), "--run.log_with", "none", *overrides],
            check=True,
        )
        total = time.perf_counter() - start
        timings = json.loads((run_dir / "timings.json").read_text())
        plan = planned_seconds(overrides, run_dir)
    accounted = sum(timings.values())

    def against_plan(planned: float | None, measured: float) -> str:
        return "| | " if planned is None or measured <= 0 else f"| {planned:.0f} | {planned / measured - 1:+.0%} "

    print("| stage | wall time (s) | share | plan (s) | plan vs measured |")
    print("|---|---:|---:|---:|---:|")
    for stage, seconds in timings.items():
        print(f"| {stage} | {seconds:.0f} | {seconds / total:.0%} {against_plan(plan.get(stage), seconds)}|")
    print(f"| other (start-up, report) | {total - accounted:.0f} | {(total - accounted) / total:.0%} | | |")
    print(f"| **total** | **{total:.0f}** | 100% {against_plan(sum(plan.values()) if plan else None, total)}|")
    load = " / ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"\nmachine: {speed:.0f} GFLOP/s fp32 matmul before the run; load average (1/5/15 min) after it: {load}")


if __name__ == "__main__":
    main()
