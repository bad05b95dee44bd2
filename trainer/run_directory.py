"""The run directory: where every artifact lands, atomically, so a killed run loses nothing.

A stage's folder appears only once complete (written under a temporary name, then renamed),
so "the folder exists" means "the stage is done" and ``--resume`` skips it. Training
checkpoints live under ``checkpoints/<stage>/`` until their stage completes.

A resume may change any setting that no finished (or started) work depends on, e.g. the
settings of a stage not yet started or the run folder's own path; the changes are logged and
``run_config.yaml`` is rewritten. Path settings are compared resolved.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import yaml

if TYPE_CHECKING:  # run_directory is imported by the harvest, which distill_config imports
    from trainer.distill_config import DistillConfig

logger = logging.getLogger(__name__)

# Fields that say how or where to run, or what to publish, not what to compute: a resume may change them.
_NOT_PART_OF_THE_RUN = {
    ("run", "output_dir"), ("run", "resume"), ("run", "dry_run"), ("run", "log_with"), ("run", "checkpoint_every"),
    ("run", "log_every"), ("model", "device"), ("hub", None), ("transfer", "ks"), ("transfer", "variants"), ("transfer", "random_core_control"),
    ("transfer", "sparsity_matched"), ("transfer", "baseline"), ("plan", None),
}  # fmt: skip
_HOW_TO_RUN = {("run", "resume"), ("run", "dry_run")}  # never worth listing as a change
# The work each setting decides ("section" or "section.field", the most specific wins): a resume may
# change a setting only while none of that work is finished or under way.
_DECIDES = {
    "model": ("harvest", "cycles", "transfer"),
    "data": ("harvest", "cycles", "transfer"),
    "harvest": ("harvest", "cycles", "transfer"),
    "dictionary": ("cycles", "transfer"),
    "optimizer": ("cycles", "transfer"),
    "eval": ("cycles", "transfer"),
    "run": ("cycles", "transfer"),
    "cycles": ("cycles",),
    "cycles.k": ("cycles", "transfer"),
    "cycles.batch_size": ("cycles", "transfer"),
    "cycles.num_cycles": ("distilled_core", "transfer"),
    "transfer": ("transfer",),
}
# Settings holding local paths: compared resolved, so ./x, x/ and /abs/x are one setting.
_PATH_FIELDS = {("run", "output_dir"), ("model", "model"), ("data", "dataset"), ("data", "corpus_dir"), ("harvest", "cache_dir"), ("cycles", "cycle0_checkpoint"), ("transfer", "core")}


class CorruptRunFileError(RuntimeError):
    """A file of the run is missing, truncated or unreadable; the message says what to delete or rerun."""


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


def require_files(folder: Path, names: tuple[str, ...], fix: str) -> None:
    """CorruptRunFileError naming the missing files of a finished stage's folder and the fix."""
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise CorruptRunFileError(f"{folder} is incomplete ({', '.join(missing)} missing): {fix}")


def _resolved(value: Any) -> Any:
    if isinstance(value, str) and value and Path(value).expanduser().exists():
        return str(Path(value).expanduser().resolve())
    return value


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


def _comparable(fields: dict, dropped: set = _NOT_PART_OF_THE_RUN) -> dict:
    """The fields except ``dropped`` (default: those that decide no result), local paths resolved."""
    fields = {section: dict(values) for section, values in fields.items()}
    for section, name in dropped:
        if name is None:
            fields.pop(section, None)
        else:
            fields.get(section, {}).pop(name, None)
    for section, name in _PATH_FIELDS:
        if name in fields.get(section, {}):
            fields[section][name] = _resolved(fields[section][name])
    return fields


def _decides(field: str) -> tuple[str, ...]:
    return _DECIDES.get(field, _DECIDES.get(field.split(".")[0], ()))


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

    def started_work(self) -> set[str]:
        """The kinds of work (harvest, cycles, distilled_core, transfer) finished or under way."""
        checkpoints = [p.name for p in self.root.joinpath("checkpoints").glob("*")]
        started = {
            "harvest": any(self.cache.glob("*/manifest.json")),
            "cycles": any(self.root.joinpath("cycles").glob("cycle-*")) or any(n.startswith("cycle-") for n in checkpoints),
            "distilled_core": self.distilled_core.exists(),
            "transfer": any(self.root.joinpath("transfer").glob("*")) or any(n.startswith("transfer-") for n in checkpoints),
        }
        return {work for work, yes in started.items() if yes}

    def start(self, config: DistillConfig, write: bool = True) -> None:
        """Create the run, or check that ``--resume`` continues the same one: a changed setting is
        refused only when finished (or started) work depends on it, and listed otherwise. A folder
        whose run failed before any work started is simply taken over. Every process checks; only
        ``write`` ones write."""
        if not self.config_file.exists() or not self.started_work():
            if write:
                self._write_config(config)
            return
        if not config.run.resume:
            raise FileExistsError(
                f"{self.root} already holds a run. Continue it with --run.resume true, or choose another --run.output_dir"
            )
        saved = yaml.safe_load(self.config_file.read_text())
        current = yaml.safe_load(config.to_yaml())
        differences = config_differences(_comparable(saved), _comparable(current))
        started = self.started_work()
        refused = [line for line in differences if started & set(_decides(line.split(":")[0].strip()))]
        if refused:
            raise ValueError(
                f"refusing to resume {self.root}: finished work ({', '.join(sorted(started))}) depends on changed settings:\n"
                + "\n".join(refused)
                + "\nResume with the original settings, or start a new run in another --run.output_dir "
                f"(--harvest.cache_dir {self.cache} reuses this run's harvest when the model, data and harvest settings are unchanged)"
            )
        changed = config_differences(_comparable(saved, _HOW_TO_RUN), _comparable(current, _HOW_TO_RUN))
        if changed and write:
            logger.warning("resuming %s with settings no finished work depends on changed:\n%s", self.root, "\n".join(changed))
            self._write_config(config)

    def _write_config(self, config: DistillConfig) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        temporary = self.config_file.with_name(".run_config.yaml.tmp")
        temporary.write_text(config.to_yaml())
        os.replace(temporary, self.config_file)

    def harvest_complete(self, cache_dir: str | None = None) -> bool:
        """Whether the activation and attribution caches are both complete."""
        cache = Path(cache_dir) if cache_dir else self.cache
        try:  # an unreadable manifest is reported, with the fix, when the harvest opens the cache
            return all(read_json(cache / kind / "manifest.json").get("complete") for kind in ("activations", "attribution"))
        except (OSError, ValueError):
            return False

    def previous_timings(self) -> dict[str, float]:
        """timings.json of the processes before a resume (empty for a new run)."""
        try:
            return read_json(self.root / "timings.json")
        except (OSError, ValueError):  # none yet, or cut short: the timings restart, the run does not
            return {}
