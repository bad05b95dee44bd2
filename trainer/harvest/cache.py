"""Activations and attribution samples from the base model, cached on disk once per run.

Neither depends on the SAE, so every distillation cycle reuses them.

Public API:

- Its settings are ``trainer.config.HarvestConfig`` (token budgets, batch sizes, cache directory,
  storage dtype, seed); ``HarvestConfig.context_ranges`` lays the packed contexts out as disjoint
  ranges: SAE training, then the attribution sample, then everything after for held-out evaluation.
- :func:`harvest_activations` ``(model, tokenizer, base, data, cfg)``: with ``cfg.cache_dir``, harvests
  (or resumes, or just opens) the activation cache and returns an :class:`ActivationCache`;
  without, returns an :class:`ActivationStream` that harvests while it is read (runs too large to
  cache). Both have ``batches(batch_size, seed=0) -> Iterator[Tensor [N, d] float32]``.
- :func:`harvest_attribution_sample` ``(model, tokenizer, base, data, cfg) -> AttributionSample``:
  ``x_u`` and ``g_u = dL/dx_u`` at sampled token positions (Algorithm 2, line 1), from the base
  model alone, cached under ``cfg.cache_dir`` too. ``L`` is the **sum** of the next-token
  cross-entropies of the context (see ``trainer.harvest.base_model``), so ``g`` is not scaled by the batch
  or context size.

Cache layout (one directory per kind, ``<cache_dir>/activations`` and ``<cache_dir>/attribution``)::

    manifest.json              what wrote the cache; "complete": true once every shard is there
    shard_000000.safetensors   tensors "x" (and "g") of contexts_per_shard consecutive contexts

Shard ``s`` holds contexts ``first + s * contexts_per_shard ...``; process ``s % num_processes``
writes it, and reads it as part of data lane ``s % cycles.data_lanes`` (the process count divides
the lanes), so under Accelerate each process harvests and reads only its own shards, and neither
the cache's content nor the batches depend on the number of processes. Activation rows in a shard are shuffled (seeded by the shard),
mixing the tokens of all its contexts: the shard is the shuffle buffer. A shard is written to a
temporary file and renamed, so a killed harvest leaves only whole shards; rerunning skips them.
The manifest records the model (a fingerprint of its weights), hook, tokenizer, data and layout;
a cache written by anything else is refused.

A node-local cache (``{node}`` in ``--harvest.cache_dir``, see ``HarvestConfig.cache_dir``) is one
folder per node holding the shards of that node's processes: the node's first process writes its
manifest, naming the shards it holds ("shards"; "num_shards" counts the whole cache's), and checks
its folder complete; the processes gather the attribution sample and the position census. A shared
cache's manifest is the main process's and its folder holds every shard.

The contexts come from a :data:`~trainer.harvest.context_index.ContextSource`: the run passes its
context index (the text tokenised once); without one they are tokenised here.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from itertools import groupby, islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

import torch
from accelerate.utils import gather_object
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from modeling_dmsae.interventions import kept_positions  # the one rule, shared with the SAE's splice
from trainer.config import BaseModelConfig, DataConfig, HarvestConfig
from trainer.errors import ConfigError, CorruptRunFileError, EmptyDatasetError, UserError
from trainer.harvest.base_model import (
    IGNORE_INDEX,
    capture_activations,
    check_context_length,
    model_fingerprint,
    next_token_gradients,
    next_token_targets,
    resolve_hook_module,
)
from trainer.harvest.context_index import ContextSource, tokenising_source, tokenizer_fingerprint
from trainer.harvest.text_corpus import ContextSharding, PackedContext, context_batches, describe_data, node_index, process_state
from trainer.run.files import read_json, write_bytes, write_json

STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
MANIFEST = "manifest.json"
CACHE_FORMAT = 2  # 2: BOS prepended by default, massive-norm positions excluded, position census
# Manifest entries that describe a cache without deciding its content: never compared.
INFO_KEYS = ("model_id", "compute_dtype", "complete", "num_shards", "shards", "num_rows", "census", "positions", "shard_bytes")
REHARVEST = "delete that file and rerun with --run.resume true: the harvest recomputes only the missing shard"


class AttributionSample(NamedTuple):
    """Sampled positions u: activations x_u and gradients g_u = dL/dx_u of the summed next-token loss."""

    x: Tensor  # [U, d] float32
    g: Tensor  # [U, d] float32


class NonFiniteActivationsError(UserError, FloatingPointError):
    """NaN or Inf in harvested activations or gradients."""


class CacheMismatchError(ConfigError):
    """The cache directory holds a cache written by another model, hook, tokenizer or data."""


class IncompleteCacheError(CorruptRunFileError, FileNotFoundError):
    """The cache is missing or still being written."""


class CorruptShardError(CorruptRunFileError):
    """A cache shard that is truncated, unreadable or holds NaN/Inf."""


# ---------------------------------------------------------------------------------------------
# Which positions reach the SAE

PROFILED_POSITIONS = 4  # the norm profile reports the first positions of every context


@dataclass
class PositionCensus:
    """What the harvest did with the context positions it read, and their activation-norm profile."""

    positions: int = 0
    special_tokens: int = 0
    """Excluded by the data settings: BOS, padding (and EOS with data.mask_eos)."""
    massive_norm: int = 0
    """Excluded by harvest.max_norm_ratio."""
    median_norm_sum: float = 0.0
    batches: int = 0
    position_norm_sums: list[float] = field(default_factory=lambda: [0.0] * PROFILED_POSITIONS)
    position_counts: list[int] = field(default_factory=lambda: [0] * PROFILED_POSITIONS)

    def add(self, hidden: Tensor, token_mask: Tensor, kept: Tensor) -> None:
        norms = hidden.float().norm(dim=-1)
        self.positions += token_mask.numel()
        self.special_tokens += int((~token_mask).sum())
        self.massive_norm += int((token_mask & ~kept).sum())
        if token_mask.any():
            self.median_norm_sum += float(norms[token_mask].median())
            self.batches += 1
        for position in range(min(PROFILED_POSITIONS, norms.shape[1])):
            self.position_norm_sums[position] += float(norms[:, position].sum())
            self.position_counts[position] += norms.shape[0]

    def merge(self, other: PositionCensus) -> PositionCensus:
        pairs = zip(self.position_norm_sums, other.position_norm_sums)
        return PositionCensus(
            self.positions + other.positions,
            self.special_tokens + other.special_tokens,
            self.massive_norm + other.massive_norm,
            self.median_norm_sum + other.median_norm_sum,
            self.batches + other.batches,
            [a + b for a, b in pairs],
            [a + b for a, b in zip(self.position_counts, other.position_counts)],
        )

    def report(self) -> dict:
        """What the manifest and the run summary show."""
        return {
            "positions": self.positions,
            "kept": self.positions - self.special_tokens - self.massive_norm,
            "excluded": {"special_tokens": self.special_tokens, "massive_norm": self.massive_norm},
            "median_norm": self.median_norm_sum / max(self.batches, 1),
            "mean_norm_at_position": [s / max(n, 1) for s, n in zip(self.position_norm_sums, self.position_counts)],
        }


class HarvestedShard(NamedTuple):
    tensors: dict[str, Tensor]
    census: PositionCensus


# ---------------------------------------------------------------------------------------------
# Reading


def _shard_paths(directory: Path) -> list[Path]:
    """Finished shards only: temporary files have another suffix."""
    return sorted(directory.glob("shard_*.safetensors"))


def held_shards(manifest: dict) -> list[int]:
    """The shards a complete cache folder holds (every shard, unless it is a node's)."""
    return manifest.get("shards", list(range(manifest["num_shards"])))


def _read_manifest(directory: Path) -> dict | None:
    path = directory / MANIFEST
    if not path.exists():
        return None
    return read_json(path, fix=f"delete {directory} and rerun with --run.resume true to harvest again")


def _rows_summary(rows: Tensor) -> str:
    listed = ", ".join(str(r) for r in rows[:5].tolist())
    return f"{len(rows)} rows ({listed}{', ...' if len(rows) > 5 else ''})"


def _unreadable(path: Path, error: Exception) -> CorruptShardError:
    return CorruptShardError(f"cache shard {path} is unreadable ({error}): {REHARVEST}")


def read_shard(path: Path) -> dict[str, Tensor]:
    """A shard's tensors as float32, refusing an unreadable file or NaN/Inf rows with the file named.

    The finiteness check is one sum per tensor (NaN and Inf propagate into it), on the float32
    copy reading makes anyway; the exact per-row scan runs only when the sum is not finite.
    """
    try:
        tensors = {name: tensor.float() for name, tensor in load_file(path).items()}
    except Exception as error:  # safetensors reports truncation as SafetensorError, missing files as OSError
        raise _unreadable(path, error) from None
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor.sum()):
            bad = (~torch.isfinite(tensor)).reshape(len(tensor), -1).any(1).nonzero().squeeze(1)
            if len(bad):
                raise CorruptShardError(f"cache shard {path} holds NaN/Inf in tensor {name!r}, {_rows_summary(bad)}: {REHARVEST}")
    return tensors


def _check_shard_sizes(directory: Path, manifest: dict, shards: list[Path]) -> None:
    """The length check: every shard has the size the harvest recorded (caches written before
    sizes were recorded are read as they are)."""
    for path in shards:
        expected = manifest.get("shard_bytes", {}).get(path.name)
        if expected is not None and path.stat().st_size != expected:
            raise CorruptShardError(
                f"cache shard {path} has {path.stat().st_size} bytes, the harvest wrote {expected} (truncated or overwritten): {REHARVEST}"
            )


class ActivationCache:
    """A complete activation cache on disk: ``batches`` reads it as shuffled [N, d] batches."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        manifest = _read_manifest(self.directory)
        if manifest is None or not manifest.get("complete"):
            raise IncompleteCacheError(
                f"no complete cache in {self.directory}: run the harvest (it resumes where it stopped)"
            )
        self.manifest = manifest
        self.shard_numbers = held_shards(manifest)
        """The shards this folder holds: all of them, or a node's share of a node-local cache."""
        self.shards = [_shard_path(self.directory, shard) for shard in self.shard_numbers]
        missing = [path.name for path in self.shards if not path.exists()]
        if missing:
            raise IncompleteCacheError(
                f"{self.directory} should hold {len(self.shards)} shards but lacks {len(missing)} ({', '.join(missing[:3])}): "
                "rerun with --run.resume true to harvest the missing ones"
            )
        self._position = {shard: position for position, shard in enumerate(self.shard_numbers)}
        _check_shard_sizes(self.directory, manifest, self.shards)

    def _path(self, shard: int) -> Path:
        """Shard ``shard``'s file; a node-local cache holds only its node's processes' shards."""
        if shard not in self._position:
            raise IncompleteCacheError(
                f"shard {shard} is not in {self.directory}, which holds this node's shards only: a process reads "
                "the shards it harvested, so the number of processes per node must be the one the cache was harvested with"
            )
        return self.shards[self._position[shard]]

    @property
    def num_rows(self) -> int:
        return self.manifest["num_rows"]

    @property
    def storage_dtype(self) -> torch.dtype:
        """The dtype its rows are stored in (read as float32, which holds them exactly)."""
        return STORAGE_DTYPES[self.manifest.get("storage_dtype", "float32")]

    @property
    def d_model(self) -> int:
        return self.manifest["d_model"]

    @property
    def num_shards(self) -> int:
        """Shards of the whole cache (a node-local folder holds some of them)."""
        return self.manifest["num_shards"]

    def tensors(self, name: str = "x") -> Tensor:
        """One cached tensor of every shard it holds, concatenated in shard order, as float32."""
        return torch.cat([read_shard(path)[name] for path in self.shards])

    def positions(self) -> dict | None:
        """The position census of the whole cache (``PositionCensus.report``): a node-local folder
        counts its node's shards only, so the processes gather every folder's (a folder once)."""
        if "census" not in self.manifest:  # written before folders recorded it
            return self.manifest.get("positions")
        folders = dict(gather_object([(tuple(self.shard_numbers), self.manifest["census"])]))
        census = PositionCensus()
        for _, counted in sorted(folders.items()):
            census = census.merge(PositionCensus(**counted))
        return census.report()

    def gathered_tensors(self, names: tuple[str, ...]) -> list[Tensor]:
        """Tensors of every shard of the cache, concatenated in shard order, on every process:
        each reads the shards it harvested (``shard % num_processes``) and the processes
        all-gather them, so a node-local cache, holding a node's shards only, serves too."""
        state = process_state()
        mine = {shard: read_shard(self._path(shard)) for shard in self.shard_numbers if shard % state.num_processes == state.process_index}
        every = {shard: tensors for part in gather_object([mine]) for shard, tensors in part.items()}
        return [torch.cat([every[shard][name] for shard in sorted(every)]) for name in names]

    def known_rows(self, shard: int) -> int:
        """Rows of one shard, from its file's header (no tensor is read)."""
        path = self._path(shard)
        try:
            with safe_open(path, "pt") as file:
                return file.get_slice("x").get_shape()[0]
        except Exception as error:  # as read_shard: a truncated or overwritten file
            raise _unreadable(path, error) from None

    def batches(
        self,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        process: ContextSharding | None = None,
        start_row: int = 0,
    ) -> Iterator[Tensor]:
        """[batch_size, d] float32 batches of the rows of the shards ``process`` owns (shard s
        belongs to s % num_processes; default: this process's), from row ``start_row`` of their
        sequence on (shards wholly before it are not read).

        The trainer reads by data lane (``process`` = lane l of L, see ``Harvest.training_batches``):
        lane l is read by process l % P, which harvested its shards (P divides L), so on a node each
        rank reads only the shards it wrote. ``shuffle`` visits the shards in a seeded random order
        and shuffles each one again.
        """
        process = process or ContextSharding.current()
        generator = torch.Generator().manual_seed(seed)
        owned = list(range(process.process_index, self.num_shards, process.num_processes))
        order = [owned[i] for i in torch.randperm(len(owned), generator=generator).tolist()] if shuffle else owned

        skipped, start_row = _leading_shards((self.known_rows(shard) for shard in order), start_row)
        for shard in order[:skipped]:
            if shuffle:  # drawn as reading the shard would: the shuffles of the shards after it stay the same
                torch.randperm(self.known_rows(shard), generator=generator)

        def shards() -> Iterator[Tensor]:
            for shard in order[skipped:]:
                rows = read_shard(self._path(shard))["x"]
                yield rows[torch.randperm(len(rows), generator=generator)] if shuffle else rows

        for rows in _rebatch(_drop_rows(shards(), start_row), batch_size):
            if len(rows) == batch_size or not drop_last:
                yield rows


class ActivationStream:
    """Harvests activations while they are read, for runs too large to cache.

    Under Accelerate each process harvests the shards (blocks of ``contexts_per_shard`` contexts)
    of its own data lanes, when they are read.
    """

    def __init__(
        self,
        harvest_shard: Callable[[list[PackedContext], int], HarvestedShard],
        shards: Callable[[ContextSharding], Iterator[tuple[int, list[PackedContext]]]],
        d_model: int,
        num_shards: int,
        storage_dtype: torch.dtype = torch.float32,
    ):
        self._harvest_shard = harvest_shard
        self._shards = shards
        self.d_model = d_model
        self.num_shards = num_shards
        self.storage_dtype = storage_dtype
        """The dtype harvested rows are cast to (read as float32, which holds them exactly)."""
        self.shard_rows: dict[int, int] = {}
        """Kept rows of each shard harvested so far: known only once the base model has run over
        it (masking depends on the activations); a resumed stage seeks with them."""

    def batches(
        self, batch_size: int, seed: int = 0, process: ContextSharding | None = None, start_row: int = 0
    ) -> Iterator[Tensor]:
        """[batch_size, d] float32 batches of the contexts ``process`` owns (a data lane, or by
        default this process), whole shards of them, shuffled within each shard, from row
        ``start_row`` of their sequence on (a shard of known rows wholly before it is not harvested)."""
        process = process or ContextSharding.current()
        owned = range(process.process_index, self.num_shards, process.num_processes)
        skipped, start_row = _leading_shards((self.known_rows(shard) for shard in owned), start_row)
        shards = islice(self._shards(process), skipped, None)  # contexts only: the base model never runs over them
        chunks = (self._harvested(shard, contexts, seed) for shard, contexts in shards)
        for rows in _rebatch(_drop_rows(chunks, start_row), batch_size):
            if len(rows) == batch_size:
                yield rows

    def known_rows(self, shard: int) -> int | None:
        """Kept rows of one shard; None until it is harvested."""
        return self.shard_rows.get(shard)

    def _harvested(self, shard: int, contexts: list[PackedContext], seed: int) -> Tensor:
        rows = self._harvest_shard(contexts, _shard_seed(seed, shard)).tensors["x"].float()
        self.shard_rows[shard] = len(rows)
        return rows


def _leading_shards(rows: Iterable[int | None], start_row: int) -> tuple[int, int]:
    """How many leading shards, of ``rows`` rows each (None: not known), lie wholly before row
    ``start_row`` of their sequence, and the rows of the next ones still to drop."""
    skipped = 0
    if start_row:
        for count in rows:
            if count is None or start_row < count:
                break
            start_row, skipped = start_row - count, skipped + 1
    return skipped, start_row


def _drop_rows(chunks: Iterable[Tensor], rows: int) -> Iterator[Tensor]:
    """``chunks`` without their first ``rows`` rows."""
    for chunk in chunks:
        if rows < len(chunk):
            yield chunk[rows:]
        rows = max(0, rows - len(chunk))


def _rebatch(chunks: Iterable[Tensor], size: int) -> Iterator[Tensor]:
    """Rows of consecutive chunks regrouped ``size`` at a time; the last group may be smaller."""
    leftover = None
    for chunk in chunks:
        rows = chunk if leftover is None else torch.cat([leftover, chunk])
        whole = len(rows) // size * size
        yield from rows[:whole].split(size)
        leftover = rows[whole:]
    if leftover is not None and len(leftover):
        yield leftover


# ---------------------------------------------------------------------------------------------
# Harvesting


def _shard_seed(seed: int, shard: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{shard}".encode()).digest()[:7], "little")


def _check_finite(tensor: Tensor, what: str, contexts: Iterable[int], fix: str) -> None:
    if not torch.isfinite(tensor).all():
        bad = (~torch.isfinite(tensor)).sum().item()
        raise NonFiniteActivationsError(
            f"{bad} NaN/Inf values in the {what} of contexts {min(contexts)}..{max(contexts)}. {fix}"
        )


NONFINITE_FIX = (
    "Check the model weights; in float16 or bfloat16 the model may overflow, so try --model.dtype float32."
)


def _store(tensor: Tensor, cfg: HarvestConfig, what: str, contexts: list[int]) -> Tensor:
    """Cast to the storage dtype on the CPU, refusing values the cast turned infinite."""
    stored = tensor.to("cpu", STORAGE_DTYPES[cfg.storage_dtype])
    _check_finite(stored, f"{what} stored as {cfg.storage_dtype}", contexts, "Store them as bfloat16 or float32.")
    return stored


def _activation_shard(
    model: PreTrainedModel, hook: torch.nn.Module, cfg: HarvestConfig, contexts: list[PackedContext], seed: int
) -> HarvestedShard:
    """Kept activations of ``contexts``, shuffled together: {"x": [n, d]}, and their census."""
    rows, census = [], PositionCensus()
    for batch in context_batches(contexts, cfg.batch_size):
        with torch.inference_mode():
            hidden = capture_activations(model, hook, batch.input_ids.to(model.device))
            token_mask = batch.mask.to(hidden.device)
            kept = kept_positions(hidden, token_mask, cfg.max_norm_ratio)
            census.add(hidden, token_mask, kept)
            rows_kept = hidden[kept]
        _check_finite(rows_kept, "activations", batch.index.tolist(), NONFINITE_FIX)
        rows.append(_store(rows_kept, cfg, "activations", batch.index.tolist()))
    x = torch.cat(rows)  # a normal tensor again, usable by autograd outside inference mode
    return HarvestedShard({"x": x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))]}, census)


def _attribution_shard(
    model: PreTrainedModel, hook: torch.nn.Module, cfg: HarvestConfig, contexts: list[PackedContext], seed: int
) -> HarvestedShard:
    """x and g at up to ``positions_per_context`` sampled positions of each context."""
    generator = torch.Generator().manual_seed(seed)
    xs, gs, census = [], [], PositionCensus()
    for batch in context_batches(contexts, cfg.attribution_batch_size):
        input_ids, mask = batch.input_ids.to(model.device), batch.mask.to(model.device)
        x, g = next_token_gradients(model, hook, input_ids, mask, cfg.loss_chunk_tokens)
        kept = kept_positions(x, mask, cfg.max_norm_ratio)
        census.add(x, mask, kept)
        counted = ((next_token_targets(input_ids, mask) != IGNORE_INDEX) & kept).cpu()
        for row in range(len(batch.index)):
            # Kept positions whose own prediction counts: the last position (g = 0) and BOS never do.
            positions = counted[row].nonzero().squeeze(1)
            order = torch.randperm(len(positions), generator=generator)
            picked = positions[order[: cfg.positions_per_context]].sort().values
            xs.append(x[row, picked.to(x.device)])
            gs.append(g[row, picked.to(g.device)])
    indices = [c.index for c in contexts]
    x, g = torch.cat(xs), torch.cat(gs)
    _check_finite(x, "activations", indices, NONFINITE_FIX)
    _check_finite(g, "next-token gradients", indices, NONFINITE_FIX)
    return HarvestedShard({"x": _store(x, cfg, "activations", indices), "g": _store(g, cfg, "gradients", indices)}, census)


def _manifest(
    kind: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    base: BaseModelConfig,
    data: DataConfig,
    cfg: HarvestConfig,
    contexts: range,
    width: int,
) -> dict:
    manifest = {
        "format": CACHE_FORMAT,
        "kind": kind,
        "model_id": base.model_id,
        "model_fingerprint": model_fingerprint(model),
        "hook_module": base.hook_module,
        "d_model": width,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "data": describe_data(data),
        "first_context": contexts.start,
        "num_contexts": len(contexts),
        "contexts_per_shard": cfg.contexts_per_shard,
        "storage_dtype": cfg.storage_dtype,
        "seed": cfg.seed,
        "max_norm_ratio": cfg.max_norm_ratio,
        "compute_dtype": str(model.dtype).removeprefix("torch."),
    }
    if kind == "attribution":
        manifest["positions_per_context"] = cfg.positions_per_context
        manifest["loss"] = "sum of next-token cross-entropies over the context's counted predictions"
    return manifest


def _check_manifest(directory: Path, expected: dict) -> dict | None:
    """The existing manifest if it matches ``expected``; CacheMismatchError otherwise."""
    existing = _read_manifest(directory)
    if existing is None:
        return None
    differences = [
        f"{key}: cache has {existing.get(key)!r}, this run has {expected.get(key)!r}"
        for key in sorted(set(existing) | set(expected))
        if key not in INFO_KEYS and existing.get(key) != expected.get(key)
    ]
    if differences:
        raise CacheMismatchError(
            f"the cache in {directory} was written by {existing.get('model_id')!r} at "
            f"{existing.get('hook_module')!r} with other settings than this run "
            f"({expected.get('model_id')!r} at {expected.get('hook_module')!r}): {'; '.join(differences)}. "
            "Use another --harvest.cache_dir, or delete this one to harvest again."
        )
    return existing


def shard_count(contexts: range, cfg: HarvestConfig) -> int:
    """Shards the ``contexts`` make: blocks of ``cfg.contexts_per_shard`` consecutive contexts."""
    return math.ceil(len(contexts) / cfg.contexts_per_shard)


def _shard_path(directory: Path, shard: int) -> Path:
    return directory / f"shard_{shard:06d}.safetensors"


def _contexts_by_shard(
    source: ContextSource, cfg: HarvestConfig, contexts: range, process: ContextSharding
) -> Iterator[tuple[int, list[PackedContext]]]:
    """(shard number, its contexts) for the shards this process owns."""
    owned = source(contexts.start, len(contexts), process)
    for shard, group in groupby(owned, key=lambda c: (c.index - contexts.start) // cfg.contexts_per_shard):
        yield shard, list(group)


class CacheFolder(NamedTuple):
    """Where this process's cache of one kind lives, and whether it is its node's own."""

    directory: Path
    node_local: bool


def cache_folder(cfg: HarvestConfig, kind: str) -> CacheFolder:
    """``<cache_dir>/<kind>`` with ``{node}`` expanded to this process's node."""
    return CacheFolder(Path(cfg.node_cache_dir(node_index())) / kind, cfg.node_local)


def _writes_manifest(folder: CacheFolder) -> bool:
    """The process that writes a folder's manifest: the node's first process for a node-local
    cache, the run's main process for a shared one."""
    state = process_state()
    return state.is_local_main_process if folder.node_local else state.is_main_process


def _complete_everywhere(directory: Path, existing: dict | None) -> bool:
    """Whether every process's cache folder is complete (each node checks its own, and all must
    agree: a process that skipped the harvest would miss the others' collectives)."""
    complete = existing is not None and existing.get("complete") and all(_shard_path(directory, s).exists() for s in held_shards(existing))
    return all(gather_object([bool(complete)]))


def _check_shared(folder: CacheFolder) -> None:
    """A cache that is not node-local must be one folder for every process."""
    seen = gather_object([(folder.directory / MANIFEST).exists()])
    if not all(seen):
        raise ConfigError(
            f"--harvest.cache_dir {folder.directory.parent}: the manifest the main process wrote is not there on every node, "
            "so the folder is not shared; for a cache on each node's own disk put {node} in the path (e.g. /nvme/dmsae-cache/{node})"
        )


def _harvest_to_cache(
    folder: CacheFolder,
    manifest: dict,
    shard_tensors: Callable[[list[PackedContext], int], HarvestedShard],
    source: ContextSource,
    cfg: HarvestConfig,
    contexts: range,
    after_shard: Callable[[], None],
) -> None:
    """Write every missing shard of this process, then mark the cache complete: the main process
    a shared cache, each node's first process its node's folder of a node-local one.
    ``after_shard`` runs after each shard is written (the run records its harvest time there, so a
    killed harvest's kept shards count in timings.json)."""
    state, directory = process_state(), folder.directory
    existing = _check_manifest(directory, manifest)  # every process refuses a foreign cache
    if _complete_everywhere(directory, existing):
        return  # complete; a deleted (corrupt) shard is harvested again below
    if _writes_manifest(folder) and existing is None:
        directory.mkdir(parents=True, exist_ok=True)
        write_json(directory / MANIFEST, manifest)
    state.wait_for_everyone()
    if not folder.node_local:
        _check_shared(folder)
    process = ContextSharding(state.process_index, state.num_processes, cfg.contexts_per_shard)
    num_shards = shard_count(contexts, cfg)
    progress = tqdm(
        total=len(range(state.process_index, num_shards, state.num_processes)),
        desc=f"harvest {manifest['kind']} (shards)",
        disable=not state.is_local_main_process,
    )
    harvested = []
    for shard, shard_contexts in _contexts_by_shard(source, cfg, contexts, process):
        harvested.append(shard)
        _harvest_shard(_shard_path(directory, shard), shard_tensors, shard_contexts, _shard_seed(cfg.seed, shard), after_shard)
        progress.update()
    progress.close()
    # Which process holds which shards (fewer than num_shards when the text ends early).
    held = gather_object([(node_index(), harvested)])
    if _writes_manifest(folder):
        here = [shard for node, shards in held for shard in shards if node == node_index() or not folder.node_local]
        _finish_cache(directory, manifest, contexts, sorted(here), 1 + max((s for _, shards in held for s in shards), default=-1))
    state.wait_for_everyone()


def _harvest_shard(
    path: Path, shard_tensors: Callable[[list[PackedContext], int], HarvestedShard], contexts: list[PackedContext], seed: int, after_shard: Callable[[], None]
) -> None:
    """One shard written to ``path``, unless a stopped harvest had written it already."""
    if path.exists():
        return
    harvested = shard_tensors(contexts, seed)
    metadata = {
        "first_context": str(contexts[0].index),
        "num_contexts": str(len(contexts)),
        "process_index": str(process_state().process_index),
        "census": json.dumps(asdict(harvested.census)),
    }
    # Written as bytes with open(): the file gets the umask's mode, so a shared cache is readable
    # by the group (safetensors' save_file would create it 0600).
    write_bytes(path, save(harvested.tensors, metadata=metadata))
    after_shard()


def _finish_cache(directory: Path, manifest: dict, contexts: range, held: list[int], num_shards: int) -> None:
    """Mark the folder complete once it holds the shards ``held`` (of ``num_shards`` in all)."""
    if not num_shards:
        raise EmptyDatasetError(
            f"no context to harvest from index {contexts.start}: the dataset holds fewer contexts. "
            "Use more text or lower the token budgets."
        )
    shards = [_shard_path(directory, shard) for shard in held]
    if not all(path.exists() for path in shards):
        raise IncompleteCacheError(f"shards missing in {directory}: run the harvest again to fill them")
    num_rows, census = 0, PositionCensus()
    for path in shards:
        with safe_open(path, "pt") as file:
            num_rows += file.get_slice("x").get_shape()[0]
            census = census.merge(PositionCensus(**json.loads(file.metadata()["census"])))
    sizes = {path.name: path.stat().st_size for path in shards}  # the length check of every read
    complete = {"complete": True, "num_shards": num_shards, "shards": held, "num_rows": num_rows, "census": asdict(census)}
    write_json(directory / MANIFEST, {**manifest, **complete, "positions": census.report(), "shard_bytes": sizes})


def _harvest_setup(
    model: PreTrainedModel, base: BaseModelConfig, data: DataConfig, cfg: HarvestConfig
) -> tuple[torch.nn.Module, int]:
    """The hook module and the width d of its output, after checking the settings."""
    if cfg.storage_dtype not in STORAGE_DTYPES:
        raise ConfigError(f"--harvest.storage_dtype {cfg.storage_dtype}: must be one of {', '.join(STORAGE_DTYPES)}")
    check_context_length(model, data.context_length)
    hook = resolve_hook_module(model, base.hook_module)
    with torch.inference_mode():  # a two-token probe: d is not always the model's hidden size
        width = capture_activations(model, hook, torch.zeros(1, 2, dtype=torch.long, device=model.device)).shape[-1]
    return hook, width


def harvest_activations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    base: BaseModelConfig,
    data: DataConfig,
    cfg: HarvestConfig,
    after_shard: Callable[[], None] = lambda: None,
    source: ContextSource | None = None,
) -> ActivationCache | ActivationStream:
    """Activations of the training contexts at ``base.hook_module``, unmasked positions only.

    With ``cfg.cache_dir``: harvest into ``<cache_dir>/activations`` (resuming a stopped harvest;
    a complete cache is just opened) and return the :class:`ActivationCache`. Without: return an
    :class:`ActivationStream` that runs the model as batches are read.
    """
    hook, width = _harvest_setup(model, base, data, cfg)
    source = source or tokenising_source(tokenizer, data)
    contexts = cfg.context_ranges(data.context_length).train

    def shard_tensors(shard_contexts: list[PackedContext], seed: int) -> HarvestedShard:
        return _activation_shard(model, hook, cfg, shard_contexts, seed)

    if cfg.cache_dir is None:
        return ActivationStream(
            shard_tensors,
            # A lane (or process) owns whole shards: blocks of contexts_per_shard contexts.
            lambda owner: _contexts_by_shard(
                source, cfg, contexts, ContextSharding(owner.process_index, owner.num_processes, cfg.contexts_per_shard)
            ),
            width,
            # Every training shard exists whenever a stage reads them: the held-out contexts,
            # harvested before any stage, come after the training range.
            shard_count(contexts, cfg),
            STORAGE_DTYPES[cfg.storage_dtype],
        )
    folder = cache_folder(cfg, "activations")
    manifest = _manifest("activations", model, tokenizer, base, data, cfg, contexts, width)
    _harvest_to_cache(folder, manifest, shard_tensors, source, cfg, contexts, after_shard)
    return ActivationCache(folder.directory)


def harvest_attribution_sample(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    base: BaseModelConfig,
    data: DataConfig,
    cfg: HarvestConfig,
    after_shard: Callable[[], None] = lambda: None,
    source: ContextSource | None = None,
) -> AttributionSample:
    """(x_u, g_u) at sampled positions of the attribution contexts, from the base model alone.

    ``g_u = dL/dx_u`` with ``L`` the summed next-token cross-entropy of u's context. Cached in
    ``<cache_dir>/attribution`` when ``cfg.cache_dir`` is set (harvested once per run), otherwise
    computed in full by every process.
    """
    hook, width = _harvest_setup(model, base, data, cfg)
    source = source or tokenising_source(tokenizer, data)
    contexts = cfg.context_ranges(data.context_length).attribution

    def shard_tensors(shard_contexts: list[PackedContext], seed: int) -> HarvestedShard:
        return _attribution_shard(model, hook, cfg, shard_contexts, seed)

    if cfg.cache_dir is None:
        shards = [
            shard_tensors(shard_contexts, _shard_seed(cfg.seed, shard)).tensors
            for shard, shard_contexts in _contexts_by_shard(source, cfg, contexts, ContextSharding())
        ]
        if not shards:
            raise EmptyDatasetError(f"no context to sample from index {contexts.start}: the dataset holds fewer")
        return AttributionSample(*(torch.cat([s[name].float() for s in shards]) for name in ("x", "g")))
    folder = cache_folder(cfg, "attribution")
    manifest = _manifest("attribution", model, tokenizer, base, data, cfg, contexts, width)
    _harvest_to_cache(folder, manifest, shard_tensors, source, cfg, contexts, after_shard)
    cache = ActivationCache(folder.directory)
    # A node-local folder holds its node's shards only: the processes gather the (small) sample.
    x, g = cache.gathered_tensors(("x", "g")) if folder.node_local else (cache.tensors("x"), cache.tensors("g"))
    return AttributionSample(x, g)
