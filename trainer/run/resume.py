"""The resume rules: whether a run folder may be continued with the settings given now.

A resume may change any setting that no finished (or started) work depends on, e.g. the
settings of a stage not yet started or the run folder's own path; the changes are logged and
``run_config.yaml`` is rewritten. Path settings are compared resolved.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from trainer.config import DistillConfig
from trainer.errors import ResumeRefusedError, RunExistsError
from trainer.run.files import write_text
from trainer.run.layout import RunDirectory

logger = logging.getLogger(__name__)

# Fields that say how or where to run, or what to publish, not what to compute: a resume may change them.
_NOT_PART_OF_THE_RUN = {
    ("run", "output_dir"), ("run", "resume"), ("run", "dry_run"), ("run", "log_with"), ("run", "checkpoint_every"),
    ("run", "log_every"), ("run", "process_group_timeout_s"), ("run", "prefetch_batches"), ("run", "parallelism"), ("model", "device"), ("hub", None),
    ("transfer", "ks"), ("transfer", "variants"), ("transfer", "random_core_control"),
    ("transfer", "sparsity_matched"), ("transfer", "baseline"), ("transfer", "core_scale"), ("transfer", "random_sparse_control"),
    ("transfer", "random_core_every_k"), ("transfer", "baseline_ks"), ("transfer", "seeds"), ("plan", None),
}  # fmt: skip
# (A final SAE is named, seeded and fed by its kind, k and transfer seed alone, so another list of ks,
# controls or seeds adds or leaves SAEs without changing those already trained.)
# (transfer.random_core_norm is part of the run: it changes the random cores already trained.)
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
    "cycles.data_lanes": ("cycles", "transfer"),
    "cycles.num_cycles": ("distilled_core", "transfer"),
    "transfer": ("transfer",),
}
# Settings holding local paths: compared resolved, so ./x, x/ and /abs/x are one setting.
_PATH_FIELDS = {("run", "output_dir"), ("model", "model"), ("data", "dataset"), ("data", "corpus_dir"), ("harvest", "cache_dir"), ("cycles", "cycle0_checkpoint"), ("transfer", "core")}


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


def _resolved(value: Any) -> Any:
    if isinstance(value, str) and value and Path(value).expanduser().exists():
        return str(Path(value).expanduser().resolve())
    return value


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


def _with_defaults(saved: dict) -> dict:
    """A saved configuration with the fields it lacks at their defaults: a field added to dmsae after
    the run began defaults to what runs did before it existed."""
    defaults = yaml.safe_load(DistillConfig().to_yaml())
    return {section: {**defaults.get(section, {}), **(saved.get(section) or {})} for section in {**defaults, **saved}}


def _decides(field: str) -> tuple[str, ...]:
    return _DECIDES.get(field, _DECIDES.get(field.split(".")[0], ()))


def start_run(paths: RunDirectory, config: DistillConfig, write: bool = True) -> None:
    """Create the run, or check that ``--resume`` continues the same one: a changed setting is
    refused only when finished (or started) work depends on it, and listed otherwise. A folder
    whose run failed before any work started is simply taken over. Every process checks; only
    ``write`` ones write."""
    if not paths.config_file.exists() or not paths.started_work():
        if write:
            write_text(paths.config_file, config.to_yaml())
        return
    if not config.run.resume:
        raise RunExistsError(f"{paths.root} already holds a run. Continue it with --run.resume true, or choose another --run.output_dir")
    saved = _with_defaults(yaml.safe_load(paths.config_file.read_text()))
    current = yaml.safe_load(config.to_yaml())
    differences = config_differences(_comparable(saved), _comparable(current))
    started = paths.started_work()
    refused = [line for line in differences if started & set(_decides(line.split(":")[0].strip()))]
    if refused:
        raise ResumeRefusedError(
            f"refusing to resume {paths.root}: finished work ({', '.join(sorted(started))}) depends on changed settings:\n"
            + "\n".join(refused)
            + "\nResume with the original settings, or start a new run in another --run.output_dir "
            f"(--harvest.cache_dir {paths.cache} reuses this run's harvest when the model, data and harvest settings are unchanged)"
        )
    changed = config_differences(_comparable(saved, _HOW_TO_RUN), _comparable(current, _HOW_TO_RUN))
    if changed and write:
        logger.warning("resuming %s with settings no finished work depends on changed:\n%s", paths.root, "\n".join(changed))
        write_text(paths.config_file, config.to_yaml())
