"""Whether the run needs the Hugging Face Hub before it loads anything, and whether the Hub can be
reached from here: a dry run on a login node or a laptop without network still prints the whole
plan, saying which checks it skipped. A real run checks everything (and refuses what it cannot
reach) before loading any weights."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from trainer.config import BaseModelConfig, DataConfig
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
