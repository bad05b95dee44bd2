"""Whole-run figures: wall time of the default distillation split by stage.

    .venv/bin/python bench/bench_distill.py [--keep DIR] [distill.py overrides ...]

Runs ``trainer/distill.py`` (the embedded default unless overridden) in a fresh run directory,
then prints the wall time of each kind of work from the run's ``timings.json`` (harvest,
cycle training, attribution, evaluation, transfer training) and the total.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", help="run directory to keep (default: a temporary one)")
    args, overrides = parser.parse_known_args()
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


if __name__ == "__main__":
    main()
