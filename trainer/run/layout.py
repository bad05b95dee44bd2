"""Where everything of a run lives: the one description of the run folder. The trainer, the
report and ``hub_cards`` all find files through :class:`RunDirectory`.

    run_config.yaml            the configuration (a resume compares against it)
    cache/activations/         harvested training activations (unless --harvest.cache_dir)
    cache/attribution/         the (x, g) attribution sample
    contexts/                  the run's text tokenised once (trainer.harvest.context_index)
    held_out.safetensors       the held-out set, computed once (trainer.harvest.harvested)
    cycles/cycle-NNN/          cycle t's SAE, its metrics and the core C(t) it selected
    distilled_core/            C* = C(T) ∩ C(T-1)
    transfer/NAME/             each final SAE (names: trainer.run.stages.FinalSAE, trainer.run.kinds)
    checkpoints/STAGE/         training checkpoints of unfinished stages
    logs/STAGE.jsonl           training curves; logs/dmsae/: the tracker's (tensorboard) events
    figures/, metrics.json, SUMMARY.md, harvest.json, timings.json
    browser/                   the offline feature browser: index.html and data/
    hub/run/, hub/saes/NAME/   the Hub-ready folders

A stage's folder appears only once complete (``trainer.run.files.atomic_folder``), so "the folder
exists" means "the stage is done" and a resume skips it.

On several nodes the run folder must be one folder that every node shares: checkpoints, stage
folders, logs, the failure board (``logs/failures/``), ``contexts/`` and ``held_out.safetensors``
are written by one process (the main one, or the failing one) and read by the others. The cache may
be node-local: with ``{node}`` in ``--harvest.cache_dir`` each node keeps its own processes' shards
under its own manifest (``trainer.harvest.cache``); without, the cache folder must be shared too.
"""

from __future__ import annotations

import os
from pathlib import Path

from trainer.config import DistillConfig, parse_config
from trainer.errors import CorruptRunFileError
from trainer.run.files import read_json

# The files of a stage folder: an SAE (save_pretrained and its held-out metrics), and a core.
CORE_JSON, CORE_DIRECTIONS, METRICS_JSON = "core.json", "core_directions.safetensors", "metrics.json"
CORE_FILES = (CORE_JSON, CORE_DIRECTIONS)
# Every SAE's folder holds its latents' firing frequencies on the held-out tokens; a final SAE's
# also the whole per-latent evidence (format and file names: modeling_dmsae.evidence), as does its Hub folder.
FIRING_FREQUENCIES = "firing_frequencies.safetensors"
SAE_FILES = ("config.json", "model.safetensors", METRICS_JSON, FIRING_FREQUENCIES)
CYCLE_FILES = (*SAE_FILES, *CORE_FILES)
CACHE_KINDS = ("activations", "attribution")
FIGURES = {  # the run's figures, by what they show, as files under figures/
    "core_lineage": "core_lineage.png",
    "coverage_curve": "coverage_curve.png",
    "l0_core": "l0_core_distilled_vs_random.png",
    "every_core": "l0_core_every_core.png",
    "sparsity_fidelity": "sparsity_fidelity.png",
    "consistency": "consistency_across_sparsities.png",
    "dictionary_movement": "dictionary_movement.png",
}
TRACKER_PROJECT = "dmsae"  # the trackers' project name: tensorboard writes logs/dmsae/
BROWSER_FOLDER, BROWSER_INDEX = "browser", "index.html"  # the offline feature browser (trainer.report.browser)


def figure_file(name: str) -> str:
    """A figure's path relative to the run folder (and to the run repo on the Hub)."""
    return f"{FIGURES_FOLDER}/{FIGURES[name]}"


def cycle_stage(t: int) -> str:
    """Name of cycle t's stage: its folder, checkpoint and log."""
    return f"cycle-{t:03d}"


# The run repo on the Hub (hub_cards.publish writes it, trainer.harvest.hub_access reads a core from
# it): cycle t in folder and tag cycle-t, C* in distilled_core/ under the tag trainer.config.DISTILLED_TAG.
DISTILLED_FOLDER = "distilled_core"
FIGURES_FOLDER, RUN_CONFIG = "figures", "run_config.yaml"


def hub_cycle_folder(cycle: int) -> str:
    """Cycle t's folder (and tag) in the run repo: ``cycle-7``."""
    return f"cycle-{cycle}"


def cycle_number(folder: Path) -> int:
    return int(folder.name.split("-")[-1])


class RunDirectory:
    """Paths of a run."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    config_file = property(lambda self: self.root / RUN_CONFIG)
    cache = property(lambda self: self.root / "cache")
    figures = property(lambda self: self.root / FIGURES_FOLDER)
    logs = property(lambda self: self.root / "logs")
    hub = property(lambda self: self.root / "hub")
    hub_run = property(lambda self: self.root / "hub" / "run")
    hub_saes = property(lambda self: self.root / "hub" / "saes")
    distilled_core = property(lambda self: self.root / DISTILLED_FOLDER)
    metrics = property(lambda self: self.root / "metrics.json")
    summary = property(lambda self: self.root / "SUMMARY.md")
    harvest = property(lambda self: self.root / "harvest.json")
    timings = property(lambda self: self.root / "timings.json")
    contexts = property(lambda self: self.root / "contexts")
    held_out = property(lambda self: self.root / "held_out.safetensors")
    browser = property(lambda self: self.root / BROWSER_FOLDER)

    def configuration(self) -> DistillConfig:
        """The run's configuration, read from run_config.yaml by the CLI's own parser (the defaults
        for a folder without one)."""
        return parse_config(["--config", str(self.config_file)]) if self.config_file.exists() else DistillConfig()

    def figure(self, name: str) -> Path:
        return self.root / figure_file(name)

    def cycle(self, t: int) -> Path:
        return self.root / "cycles" / cycle_stage(t)

    def cycles(self) -> list[Path]:
        """The finished cycles' folders, by cycle number."""
        return sorted(self.root.joinpath("cycles").glob("cycle-*"), key=cycle_number)

    def transfer(self, name: str) -> Path:
        return self.root / "transfer" / name

    def transfers(self) -> list[Path]:
        """The finished final SAEs' folders, by name."""
        return sorted(p for p in self.root.joinpath("transfer").glob("*") if (p / "config.json").exists())

    def checkpoint(self, stage: str) -> Path:
        """The folder of a stage's training checkpoint (``checkpoint.pt``)."""
        return self.root / "checkpoints" / stage

    def log(self, stage: str) -> Path:
        return self.logs / f"{stage}.jsonl"

    def cache_dir(self, cache_dir: str | None = None) -> Path:
        """Where the caches are: ``--harvest.cache_dir`` when set, else the run's cache/."""
        return Path(cache_dir) if cache_dir else self.cache

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

    def harvest_complete(self, cache_dir: str | None = None) -> bool:
        """Whether the activation and attribution caches are both complete."""
        cache = self.cache_dir(cache_dir)
        try:  # an unreadable manifest is reported, with the fix, when the harvest opens the cache
            return all(read_json(cache / kind / "manifest.json").get("complete") for kind in CACHE_KINDS)
        except CorruptRunFileError:
            return False
