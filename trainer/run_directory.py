"""The run directory: where every artifact lands, atomically, so a killed run loses nothing.

A stage's folder appears only once complete (written under a temporary name, then renamed),
so "the folder exists" means "the stage is done" and ``--resume`` skips it. Training
checkpoints live under ``checkpoints/<stage>/`` until their stage completes.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import yaml

if TYPE_CHECKING:  # run_directory is imported by the harvest, which distill_config imports
    from trainer.distill_config import DistillConfig

# Fields that say how to run, not what to compute: changing them never invalidates a run.
_NOT_PART_OF_THE_RUN = {("run", "resume"), ("run", "dry_run"), ("run", "log_with"), ("hub", "repo_id"), ("hub", "private"), ("hub", "max_attempts"), ("hub", "retry_wait_s")}


def write_json(path: Path, payload: Any) -> None:
    """Atomically write JSON (a temporary file of this process, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    temporary.write_text(json.dumps(payload, indent=2))
    os.replace(temporary, path)


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable list of the fields that differ between two nested config dicts."""
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"  {prefix}{key}: {a!r} -> {b!r}")
    return lines


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


@contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``path`` only if the block completes."""
    temporary = path.with_name(f".{path.name}.partial")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    yield temporary
    if path.exists():
        shutil.rmtree(path)
    os.replace(temporary, path)


def _comparable(config: DistillConfig) -> dict:
    fields = yaml.safe_load(config.to_yaml())
    for section, name in _NOT_PART_OF_THE_RUN:
        fields.get(section, {}).pop(name, None)
    return fields


class RunDirectory:
    """Paths of a run, and the resume rules."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    config_file = property(lambda self: self.root / "run_config.yaml")
    cache = property(lambda self: self.root / "cache")
    figures = property(lambda self: self.root / "figures")
    logs = property(lambda self: self.root / "logs")
    hub = property(lambda self: self.root / "hub")
    distilled_core = property(lambda self: self.root / "distilled_core")

    def cycle(self, t: int) -> Path:
        return self.root / "cycles" / f"cycle-{t:03d}"

    def transfer(self, name: str) -> Path:
        return self.root / "transfer" / name

    def checkpoint(self, stage: str) -> Path:
        return self.root / "checkpoints" / stage

    def start(self, config: DistillConfig) -> None:
        """Create the run, or check that ``--resume`` continues the same one."""
        if self.config_file.exists():
            if not config.run.resume:
                raise FileExistsError(
                    f"{self.root} already holds a run. Continue it with --run.resume true, or choose another "
                    "--run.output_dir"
                )
            saved = yaml.safe_load(self.config_file.read_text())
            for section, name in _NOT_PART_OF_THE_RUN:
                saved.get(section, {}).pop(name, None)
            differences = config_differences(saved, _comparable(config))
            if differences:
                raise ValueError(
                    f"refusing to resume {self.root} with a different configuration:\n" + "\n".join(differences)
                    + "\nResume with the original settings, or start a new run in another --run.output_dir"
                )
            return
        self.root.mkdir(parents=True, exist_ok=True)
        temporary = self.config_file.with_name(".run_config.yaml.tmp")
        temporary.write_text(config.to_yaml())
        os.replace(temporary, self.config_file)
