"""The SAEs and cores a stage starts from: a saved core C(t) or C*, a finished cycle, a published
cycle-0 SAE."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from modeling_dmsae import DMSAEConfig, DMSAEModel
from modeling_dmsae.convert_checkpoints import from_checkpoint
from trainer.config import DistillConfig
from trainer.errors import ConfigError, CorruptRunFileError
from trainer.run.files import read_json, require_files, write_json
from trainer.run.kinds import Core
from trainer.run.layout import CORE_DIRECTIONS, CORE_FILES, CORE_JSON, CYCLE_FILES
from trainer.run.stages import cycle0_sae_config
from trainer.sae.selection import CoreSelection
from trainer.sae.training import check_finite_weights


def save_core(folder: Path, cycle: int, selection: CoreSelection, model: DMSAEModel, config: DistillConfig) -> None:
    """core.json (indices, scores, lineage, coverage) and core_directions.safetensors."""
    lineage = model.lineage()[selection.selected].tolist()
    write_json(
        folder / CORE_JSON,
        {
            "cycle": cycle,
            "selected": selection.selected,
            "scores": selection.scores,
            "lineage": lineage,
            "coverage_curve": selection.coverage_curve.tolist(),
            "candidate_pool_size": len(selection.pool_scores),
            "tau": config.cycles.tau,
            "q": config.cycles.quantile,
        },
    )
    directions = model.encoder_weight.detach()[selection.selected].float().cpu().contiguous()
    save_file({"core_directions": directions}, str(folder / CORE_DIRECTIONS))


def load_core(folder: Path) -> Core:
    """A core saved by :func:`save_core` (a cycle folder or distilled_core/)."""
    fix = f"delete {folder} and rerun with --run.resume true to compute it again"
    require_files(folder, CORE_FILES, fix)
    directions = load_file(str(folder / CORE_DIRECTIONS))["core_directions"]
    if not torch.isfinite(directions).all():
        raise CorruptRunFileError(f"{folder / CORE_DIRECTIONS} holds NaN/Inf: delete {folder} and compute it again")
    return Core(directions, read_json(folder / CORE_JSON, fix)["lineage"])


def load_finished_cycle(folder: Path, t: int) -> DMSAEModel:
    """The SAE of a cycle finished before a restart, or what to delete when its folder is damaged."""
    fix = f"delete {folder} and rerun with --run.resume true: cycle {t} is trained again"
    require_files(folder, CYCLE_FILES, fix)
    try:
        return check_finite_weights(DMSAEModel.from_pretrained(folder), str(folder))
    except Exception as error:
        raise CorruptRunFileError(f"{folder} is unreadable ({type(error).__name__}: {error}): {fix}") from None


def read_cycle0_checkpoint(path: str) -> DMSAEModel:
    """A published SAE as cycle 0: a DMSAE folder, or whatever convert_checkpoints imports."""
    config_file = Path(path) / "config.json"
    fix = "point --cycles.cycle0_checkpoint at a complete checkpoint folder"
    is_dmsae = config_file.is_file() and read_json(config_file, fix).get("model_type") == "dmsae"
    return check_finite_weights(DMSAEModel.from_pretrained(path) if is_dmsae else from_checkpoint(path), path)


# What the run's configuration decides for every cycle, whatever a cycle-0 checkpoint was trained with.
RUN_SETTINGS = ("k", "variant", "aux_k", "aux_alpha", "dead_tokens_threshold", "mask_bos", "max_norm_ratio")


def with_run_settings(model: DMSAEModel, config: DistillConfig) -> DMSAEModel:
    """An imported cycle-0 SAE with the run's k, variant, AuxK and dead-latent settings (and the
    positions it masks: BOS, massive norm), which the attribution of C(0) and, through
    ``next_cycle``, every later cycle use. A threshold calibrated
    at another k is dropped: cycle 0's held-out metrics then take BatchTopK over each batch."""
    wanted = {name: getattr(cycle0_sae_config(config, model.config.d_in), name) for name in RUN_SETTINGS}
    if model.config.k != wanted["k"]:
        model.config.threshold = -1.0
    for name, value in wanted.items():
        setattr(model.config, name, value)
    model.config.validate_dmsae()
    return model


def check_compatible(sae: DMSAEConfig, d_in: int, hook_layer: int, config: DistillConfig) -> None:
    """Refuse, before any training, a cycle-0 checkpoint that reads other activations, or that was
    trained at another k than the run's cycles (unless --cycles.accept_checkpoint_k)."""
    if sae.k != config.cycles.k and not config.cycles.accept_checkpoint_k:
        raise ConfigError(
            f"--cycles.cycle0_checkpoint {config.cycles.cycle0_checkpoint} was trained at k = {sae.k}, the run's cycles "
            f"train at --cycles.k {config.cycles.k}: set --cycles.k {sae.k}, or add --cycles.accept_checkpoint_k true "
            f"to select its core and train every later cycle at k = {config.cycles.k}"
        )
    problems = []
    if sae.d_in != d_in:
        problems.append(f"its width d = {sae.d_in}, the base model's hidden size is {d_in}")
    if sae.hook_layer != hook_layer:
        problems.append(f"it reads layer {sae.hook_layer} ({sae.hook_name}), the run hooks {config.model.hook_module}")
    ours, theirs = config.model.model_id.lower().split("/")[-1], (sae.base_model_id or "").lower().split("/")[-1]
    if theirs and ours != theirs:
        problems.append(f"it was trained on {sae.base_model_id}, the run reads {config.model.model_id}")
    if problems:
        raise ConfigError(
            f"--cycles.cycle0_checkpoint {config.cycles.cycle0_checkpoint} does not match the run: "
            + "; ".join(problems) + ". Point --model.model / --model.hook_module at what it was trained on, or drop the checkpoint"
        )
