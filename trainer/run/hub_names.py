"""Where a run lives on the Hub, by name: the run repo and each final SAE's repo. The checks before
loading (every name valid before days of training) and the Hub code (``hub_cards``) read them here."""

from __future__ import annotations

import re

from huggingface_hub.utils import validate_repo_id

from modeling_dmsae import DMSAEConfig
from trainer.config import HubSettings
from trainer.errors import ConfigError
from trainer.run.kinds import seed_suffix
from trainer.run.layout import RunDirectory
from trainer.run.stages import FinalSAE

PLACEHOLDER_ORG = "your-org"


def run_repo_id(settings: HubSettings, paths: RunDirectory) -> str:
    """The run repo: ``--push-to-hub ORG/NAME``, or ``your-org/<run folder name>`` for folders built
    without one."""
    if settings.repo_id:
        try:
            validate_repo_id(settings.repo_id)
        except ValueError as error:
            raise ConfigError(f"--push-to-hub {settings.repo_id!r} is not a valid repo id: {error}") from None
        if "/" not in settings.repo_id:
            raise ConfigError(f"--push-to-hub must be ORG/NAME, got {settings.repo_id!r}")
        return settings.repo_id
    return f"{PLACEHOLDER_ORG}/{re.sub(r'[^A-Za-z0-9._-]+', '-', paths.root.resolve().name).strip('-.') or 'dmsae-run'}"


def short_model_name(base_model_id: str) -> str:
    """``google/gemma-2-2b`` -> ``gemma2``, ``meta-llama/Llama-3.1-8B`` -> ``llama3.1``,
    ``HuggingFaceTB/SmolLM2-135M`` -> ``smollm2``: the family and its version, no size."""
    parts = base_model_id.split("/")[-1].lower().split("-")
    family = parts[0]
    if len(parts) > 1 and re.fullmatch(r"\d+(\.\d+)*", parts[1]):
        family += parts[1]
    return family


def sae_repo_id(config: DMSAEConfig, final: FinalSAE, run_repo: str, settings: HubSettings) -> str:
    """The repo of the final SAE ``final``: ``{suffix}`` is its kind's Hub suffix (naming its factor,
    if it has one), then the seed's (as in its folder name)."""
    org, name = run_repo.split("/")
    try:
        repo_id = settings.sae_repo_pattern.format(
            org=org, name=name, model=settings.model_short_name or short_model_name(config.base_model_id),
            layer=config.hook_layer, k=config.k, variant=config.variant.replace("_", "-"), suffix=final.kind.hub_suffix_for(final.factor) + seed_suffix(final.seed),
        )  # fmt: skip
    except KeyError as error:
        raise ConfigError(
            f"--hub.sae_repo_pattern {settings.sae_repo_pattern!r} uses an unknown field {error}; "
            "known fields: org, name, model, layer, k, variant, suffix"
        ) from None
    validate_repo_id(repo_id)
    return repo_id
