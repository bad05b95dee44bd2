"""Whole-run figures: wall time of the default distillation split by stage.

    .venv/bin/python bench/bench_distill.py [--keep DIR] [distill.py overrides ...]

Runs ``trainer/distill.py`` (the embedded default unless overridden) in a fresh run directory,
then prints the wall time of each kind of work from the run's ``timings.json`` (harvest,
cycle training, attribution, evaluation, transfer training, report) and the total, with the
machine's speed measured just before (machines of one kind differ up to 3x between sessions) and
the load average after (other jobs on the machine slow every stage).
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


def machine_speed(size: int = 1024, repeats: int = 20) -> float:
    """fp32 matrix-multiply throughput of this machine in GFLOP/s, at torch's default threads."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


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
    accounted = sum(timings.values())
    print("| stage | wall time (s) | share |")
    print("|---|---:|---:|")
    for stage, seconds in timings.items():
        print(f"| {stage} | {seconds:.0f} | {seconds / total:.0%} |")
    print(f"| other (start-up, model load, report) | {total - accounted:.0f} | {(total - accounted) / total:.0%} |")
    print(f"| **total** | **{total:.0f}** | 100% |")
    load = " / ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"\nmachine: {speed:.0f} GFLOP/s fp32 matmul before the run; load average (1/5/15 min) after it: {load}")


if __name__ == "__main__":
    main()
