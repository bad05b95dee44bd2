"""Are two runs' results the same? For a change that must not change behaviour (a refactor):

    .venv/bin/python bench/compare_runs.py RUN_A RUN_B

Compares every SAE and core of the two run folders (``model.safetensors``, ``config.json``,
``core.json``, ``core_directions.safetensors`` and each stage's ``metrics.json`` under cycles/,
distilled_core/ and transfer/) and the run's ``metrics.json``, byte for byte; prints each file that
differs or exists in one run only. A ``metrics.json`` whose bytes differ is compared key by key:
the keys one file has and the other lacks, and every value that differs (a format change that keeps
every value shows as keys added and removed only). Exits 1 if any weight, configuration or core
file differs, or any metric present in both files has another value.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any

RESULT_FILES = ("model.safetensors", "config.json", "core.json", "core_directions.safetensors", "metrics.json")
STAGE_FOLDERS = ("cycles", "distilled_core", "transfer")


def result_digests(run: Path) -> dict[str, str]:
    """sha256 of every result file, by its path in the run."""
    paths = [run / "metrics.json"] + [
        path for folder in STAGE_FOLDERS for path in sorted((run / folder).rglob("*")) if path.name in RESULT_FILES
    ]
    return {str(path.relative_to(run)): hashlib.sha256(path.read_bytes()).hexdigest() for path in paths if path.is_file()}


def same_value(a: Any, b: Any) -> bool:
    """Equal, NaN included (a cycle without a frozen core has a NaN carry-over)."""
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def json_differences(a: Any, b: Any, at: str = "") -> tuple[list[str], list[str], list[str]]:
    """(keys only in a, keys only in b, keys whose values differ), as dotted paths."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [], [], [] if same_value(a, b) else [at.rstrip(".") or "(the whole file)"]
    only_a, only_b, changed = [f"{at}{k}" for k in a if k not in b], [f"{at}{k}" for k in b if k not in a], []
    for key in (k for k in a if k in b):
        more = json_differences(a[key], b[key], f"{at}{key}.")
        only_a, only_b, changed = only_a + more[0], only_b + more[1], changed + more[2]
    return only_a, only_b, changed


def describe_metrics(name: str, run_a: Path, run_b: Path) -> tuple[str, bool]:
    """What differs between the two runs' copies of a metrics.json, and whether any value does."""
    only_a, only_b, changed = json_differences(*(json.loads((run / name).read_text()) for run in (run_a, run_b)))
    keys = lambda paths: sorted({p.split(".")[-1] for p in paths})  # noqa: E731  (the same key in every SAE of a run file)
    parts = [f"values differ: {', '.join(changed[:8])}{' ...' if len(changed) > 8 else ''}" if changed else "every shared value equal"]
    parts += [f"only in {run_a}: {', '.join(keys(only_a))}"] * bool(only_a) + [f"only in {run_b}: {', '.join(keys(only_b))}"] * bool(only_b)
    return f"{name}: {'; '.join(parts)}", bool(changed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    args = parser.parse_args()
    a, b = result_digests(args.run_a), result_digests(args.run_b)
    differing = sorted(name for name in set(a) | set(b) if a.get(name) != b.get(name))
    failed = False
    for name in differing:
        if name in a and name in b and name.endswith("metrics.json"):
            line, values_differ = describe_metrics(name, args.run_a, args.run_b)
            failed |= values_differ
        else:
            line, failed = f"{name}: {'differs' if name in a and name in b else f'only in {args.run_a if name in a else args.run_b}'}", True
        print(line)
    print(f"{len(set(a) | set(b)) - len(differing)} of {len(set(a) | set(b))} result files identical byte for byte")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
