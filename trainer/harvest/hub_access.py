"""What a run reads from the Hugging Face Hub besides the base model and the text: a published core
(``--transfer.core ORG/NAME@cycle-7``) and a published cycle-0 SAE (``--cycles.cycle0_checkpoint
ORG/NAME[@REVISION][:SUBFOLDER]``), both through the converter's download; and whether the run needs
the Hub before it loads anything, and whether the Hub can be reached from here: a dry run on a login
node or a laptop without network still prints the whole plan, saying which checks it skipped. A real
run checks everything (and refuses what it cannot reach) before loading any weights."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from huggingface_hub.utils import validate_repo_id

from modeling_dmsae.convert_checkpoints import HUB_FOLDER_SPEC, HubDownloadError, HubFolder, download_hub_folder, parse_hub_folder
from trainer.config import DISTILLED_TAG, BaseModelConfig, DataConfig
from trainer.errors import ConfigError
from trainer.run.layout import CORE_FILES, DISTILLED_FOLDER
from trainer.harvest.text_corpus import local_data_files

PROBE_TIMEOUT_S = 3.0


def model_on_hub(model: BaseModelConfig) -> bool:
    """The base model's configuration comes from the Hub (not the embedded default or a local path)."""
    return bool(model.model) and not os.path.exists(os.path.expanduser(model.model))


def dataset_on_hub(data: DataConfig) -> bool:
    return bool(data.dataset) and local_data_files(data.dataset) is None


def hub_unreachable(timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the Hub cannot be reached from here (offline mode, no name resolution, no connection),
    or None when a TCP connection to its endpoint opens within ``timeout_s``: one quick probe
    instead of huggingface_hub's retries, which take half a minute to give up."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout_s).close()
    except OSError as error:
        return f"{constants.ENDPOINT} is unreachable from here ({type(error).__name__}: {error})"
    return None


def parse_core_spec(spec: str) -> HubFolder:
    """``ORG/NAME@cycle-7`` -> cycle 7's core (tag cycle-7, folder cycle-7/); ``ORG/NAME`` or
    ``ORG/NAME@distilled`` -> the distilled core."""
    repo_id, _, revision = spec.partition("@")
    revision = revision or DISTILLED_TAG
    try:
        validate_repo_id(repo_id)
    except ValueError as error:
        raise ConfigError(f"--core {spec!r} is neither a local folder nor ORG/NAME[@cycle-T]: {error}") from None
    if re.fullmatch(r"cycle-\d+", revision):
        return HubFolder(repo_id, revision, revision)
    if revision == DISTILLED_TAG:
        return HubFolder(repo_id, DISTILLED_TAG, DISTILLED_FOLDER)
    raise ConfigError(f"--core {spec!r}: the revision must be cycle-<t> or {DISTILLED_TAG}, got {revision!r}")


def fetch(setting: str, folder: HubFolder, files: list[str] | None = None, **hub_options) -> Path:
    """The Hub folder a setting names, downloaded (see download_hub_folder); a failure is a ConfigError
    naming the setting."""
    try:
        return download_hub_folder(folder, files, **hub_options)
    except HubDownloadError as error:
        raise ConfigError(f"{setting}: {error}") from None


def resolve_core(spec: str | Path, cache_dir: str | Path | None = None, token: str | None = None) -> Path:
    """A local folder holding ``core.json`` and ``core_directions.safetensors`` for ``spec``: an
    existing local folder, or ``ORG/NAME@cycle-7`` / ``ORG/NAME[@distilled]`` fetched into the HF cache
    (works offline with HF_HUB_OFFLINE=1 once cached)."""
    if Path(spec).is_dir():
        folder = Path(spec)
    else:
        core = parse_core_spec(str(spec))
        files = [*CORE_FILES, "config.json"]
        folder = fetch(f"--core {spec}", core, files, cache_dir=cache_dir, token=token)
    missing = [name for name in CORE_FILES if not (folder / name).exists()]
    if missing:
        raise ConfigError(f"--core {spec}: {folder} has no {', '.join(missing)}; is it a DMSAE run's core folder?")
    return folder


def checkpoint_on_hub(spec: str) -> HubFolder | None:
    """The Hub folder ``--cycles.cycle0_checkpoint`` names, or None for a local path; refuses what is neither."""
    if Path(spec).exists():
        return None
    folder = parse_hub_folder(spec)
    if folder is None:
        raise ConfigError(
            f"--cycles.cycle0_checkpoint {spec}: no such file or folder (a SAEBench / dictionary_learning trainer "
            f"folder or ae.pt, a SAELens folder, or a DMSAE folder), nor a Hub folder {HUB_FOLDER_SPEC}"
        )
    return folder


def resolve_checkpoint(spec: str) -> str:
    """The local path of the cycle-0 checkpoint: ``spec`` itself, or the Hub folder it names, fetched
    into the HF cache (read from it offline, with HF_HUB_OFFLINE=1)."""
    folder = checkpoint_on_hub(spec)
    return spec if folder is None else str(fetch(f"--cycles.cycle0_checkpoint {spec} (not a local path)", folder))
