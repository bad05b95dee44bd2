"""Training checkpoints, one layout for both trainers: :class:`~trainer.sae.training.SAETrainer`
writes the whole SAE in one file; :class:`~trainer.sae.latent_parallel.LatentParallelTrainer` has
each process write its latents' shard and the main process an index naming them. Either loads into
either trainer on any number of processes: :func:`read_whole_checkpoint` assembles the whole SAE's
state, and each latent-parallel process keeps its range of it."""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import torch

from trainer.run.files import atomic_path

SHARDED_FORMAT = "latent-shards-1"  # the index's format tag
SHARDED_PARAMETERS = ("encoder", "b_enc", "W_dec")
"""DMSAEModel's parameters cut by latent, in its registration order (its optimiser state is
numbered so: these, then b_dec)."""
PARAMETER_ORDER = (*SHARDED_PARAMETERS, "b_dec")
DRIFT_SAMPLE_ROWS = 4096  # decoder rows kept from the initialisation (all of them at the default K = 4096)


def drift_rows(num_latents: int, core_size: int) -> torch.Tensor:
    """The trainable decoder rows whose start is kept, to measure how far training moved them."""
    trainable = torch.arange(core_size, num_latents)
    return trainable[:: max(1, math.ceil(len(trainable) / DRIFT_SAMPLE_ROWS))]


def shard_path(index: Path, step: int, start: int, stop: int) -> Path:
    """The file of latents [start, stop) of the checkpoint ``index`` at ``step``."""
    return index.with_name(f"{index.stem}.shard-{step:09d}-{start}-{stop}.pt")


def remove_stale_shards(index: Path, step: int) -> None:
    """Shard files of earlier checkpoints (the index names only ``step``'s)."""
    for stale in index.parent.glob(f"{index.stem}.shard-*"):
        if not stale.name.startswith(f"{index.stem}.shard-{step:09d}-"):
            stale.unlink()


def read_whole_checkpoint(path: Path, device: torch.device | str) -> dict:
    """A training checkpoint in the whole-SAE layout (``model`` and ``optimizer`` state dicts,
    ``scheduler``, ``tokens_since_fired``, ``steps_taken``, ``initial_decoder_rows`` with their
    ``drift_rows``, ``reader_state``), whichever trainer wrote it: a sharded index is assembled
    from its shards in latent order."""
    state = torch.load(path, map_location=device, weights_only=True)
    if state.get("format") != SHARDED_FORMAT:
        model = state["model"]
        return {**state, "drift_rows": drift_rows(model["W_dec"].shape[0], model["core_encoder"].shape[0])}
    shards = [torch.load(path.with_name(name), map_location=device, weights_only=True) for name in state["shards"]]
    joined = lambda key: torch.cat([shard[key] for shard in shards])  # noqa: E731
    adam = [_joined_moments([shard["adam"][name] for shard in shards]) for name in SHARDED_PARAMETERS]
    return {
        "model": {
            "core_encoder": joined("core_encoder"),
            **{name: torch.cat([shard["parameters"][name] for shard in shards]) for name in SHARDED_PARAMETERS},
            "b_dec": state["b_dec"],
        },
        "optimizer": {"state": dict(enumerate([*adam, state["b_dec_adam"]])), "param_groups": state["param_groups"]},
        "scheduler": state["scheduler"],
        "tokens_since_fired": joined("tokens_since_fired"),
        "steps_taken": state["steps_taken"],
        "initial_decoder_rows": joined("initial_decoder_rows"),
        "drift_rows": joined("drift_rows"),
        "reader_state": state["reader_state"],
    }


def _joined_moments(states: list[dict]) -> dict:
    """One Adam state from the shards' (their step counts are equal; the moments are concatenated)."""
    return {key: torch.cat([s[key] for s in states]) if states[0][key].dim() else states[0][key] for key in states[0]}


def host_copy(state: Any) -> Any:
    """``state`` with every tensor copied to host memory: a snapshot training cannot change."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {key: host_copy(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(host_copy(value) for value in state)
    return state


class BackgroundWriter:
    """Writes one checkpoint at a time in a thread of its own, so that training goes on while the
    file is written (at the paper's shape ~3.6 GB an SAE: seconds to a local disk, during which the
    other processes would wait). The next write, and :meth:`wait`, first let the previous one finish
    and raise its error, if it had one. The thread is not a daemon: a run stopped by an exception
    still completes the checkpoint it was writing."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def write(self, path: Path, state: dict) -> None:
        """Write a snapshot of ``state`` (copied to host memory now) to ``path``, atomically."""
        self.wait()
        snapshot = host_copy(state)
        self._thread = threading.Thread(target=self._write, args=(path, snapshot), name=f"checkpoint {path.parent.name}")
        self._thread.start()

    def _write(self, path: Path, state: dict) -> None:
        try:
            with atomic_path(path) as temporary:
                torch.save(state, temporary)
        except BaseException as error:  # handed to the training thread by wait()
            self._error = error

    def wait(self) -> None:
        """Return once the last checkpoint is on disk; raise the error its write met."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error
