"""Are two runs' results the same bytes? For a change that must not change behaviour (a refactor):

    .venv/bin/python bench/compare_runs.py RUN_A RUN_B

Compares every SAE and core of the two run folders (``model.safetensors``, ``config.json``,
``core.json``, ``core_directions.safetensors`` and each stage's ``metrics.json`` under cycles/,
distilled_core/ and transfer/) and the run's ``metrics.json``, byte for byte; prints each file that
differs or exists in one run only, and exits 1 if any does.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

RESULT_FILES = ("model.safetensors", "config.json", "core.json", "core_directions.safetensors", "metrics.json")
STAGE_FOLDERS = ("cycles", "distilled_core", "transfer")


def result_digests(run: Path) -> dict[str, str]:
    """sha256 of every result file, by its path in the run."""
    paths = [run / "metrics.json"] + [
        path for folder in STAGE_FOLDERS for path in sorted((run / folder).rglob("*")) if path.name in RESULT_FILES
    ]
    return {str(path.relative_to(run)): hashlib.sha256(path.read_bytes()).hexdigest() for path in paths if path.is_file()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    args = parser.parse_args()
    a, b = result_digests(args.run_a), result_digests(args.run_b)
    differing = sorted(name for name in set(a) | set(b) if a.get(name) != b.get(name))
    for name in differing:
        where = "differs" if name in a and name in b else f"only in {args.run_a if name in a else args.run_b}"
        print(f"{name}: {where}")
    print(f"{len(set(a) | set(b)) - len(differing)} of {len(set(a) | set(b))} result files identical")
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
