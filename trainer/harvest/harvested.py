"""The harvest: everything a run reads from the base model, prepared once (:func:`prepare_harvest`)
and handed to every stage as one :class:`Harvest`: the training activations (cached or streamed),
the (x, g) attribution sample, held-out activations and contexts for evaluation, and the input
normalisation factor."""

from __future__ import annotations

import dataclasses
import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import torch
import torch.distributed as dist
from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import save
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from modeling_dmsae.configuration_dmsae import hook_layer_index
from trainer.config import DistillConfig
from trainer.errors import ConfigError, CorruptRunFileError, EmptyDatasetError
from trainer.harvest.base_model import capture_activations, load_base_model, mean_next_token_loss, model_fingerprint, resolve_hook_module
from trainer.harvest.cache import (
    ActivationCache,
    ActivationStream,
    PositionCensus,
    harvest_activations,
    harvest_attribution_sample,
    kept_positions,
)
from trainer.harvest.context_index import ContextSource, open_context_index, tokenising_source, tokenizer_fingerprint
from trainer.harvest.text_corpus import ContextSharding, context_batches, describe_data, process_state
from trainer.run.files import write_bytes
from trainer.run.layout import RunDirectory
from trainer.run.stages import BatchShape


@dataclass
class Harvest:
    """What the stages read from the base model (the text it came from is ``config.data``)."""

    base_model: PreTrainedModel
    hook_module: nn.Module
    hook_layer: int
    d_in: int
    training: ActivationCache | ActivationStream
    attribution_x: torch.Tensor
    attribution_g: torch.Tensor
    held_out: torch.Tensor
    """[N, d] float32 held-out activations (masked positions dropped)."""
    held_out_slots: torch.Tensor
    """[N] where each held-out row comes from: context * context_length + position in held_out_tokens."""
    held_out_tokens: torch.Tensor
    """[contexts, context_length] the held-out contexts' token ids (the evidence's windows)."""
    tokenizer: PreTrainedTokenizerBase
    ce_input_ids: torch.Tensor
    ce_loss_mask: torch.Tensor
    ce_clean: float
    """Mean next-token loss of the held-out contexts, untouched."""
    ce_zero_ablated: float
    """The same with the hooked activations zeroed."""
    normalization_factor: float
    """sqrt(E ||x||^2) over the attribution sample (dictionary_learning's activation normalisation)."""
    positions: dict
    """Position census of the training cache (None when streamed) and of the held-out set (PositionCensus.report)."""

    def training_batches(self, shape: BatchShape, seed: int, start_step: int = 0) -> Iterator[torch.Tensor]:
        """Endless micro-batches of this process, ``[shape.per_process, d]``, from ``start_step`` on:
        the same share of each of its data lanes (``shape.lanes_of``), each lane reshuffled every
        epoch. Together the processes' micro-batches are the same tokens whatever their number, and a
        resumed stage continues with exactly the batches it would have seen, reading (or, streamed,
        harvesting) no shard it had already read to its end."""
        lanes = [self._lane_batches(lane, shape, seed, start_step) for lane in shape.lanes_of(process_state().process_index)]
        return (torch.cat(rows) for rows in zip(*lanes))

    def global_batches(self, shape: BatchShape, seed: int, start_step: int = 0) -> Iterator[torch.Tensor]:
        """Endless global micro-batches, ``[shape.micro_batch, d]``, the same on every process: each
        reads only its own lanes (:meth:`training_batches`) and the processes' shares are
        all-gathered (:meth:`all_gathered`). Bit for bit the micro-batches one process reads."""
        return self.all_gathered(self.training_batches(shape, seed, start_step), shape)

    def all_gathered(self, shares: Iterator[torch.Tensor], shape: BatchShape) -> Iterator[torch.Tensor]:
        """Each of this process's micro-batches ``shares`` (of :meth:`training_batches`, perhaps read
        ahead) made whole: a collective, so every process must read as many. Kept apart from the
        reading so that a background reader never runs a collective (one per step, in the training
        thread, cannot interleave with another's)."""
        return (lanes_in_order(share, shape, self.training.storage_dtype) for share in shares)

    def _lane_batches(self, lane: int, shape: BatchShape, seed: int, start_step: int) -> Iterator[torch.Tensor]:
        sharding = ContextSharding(lane, shape.lanes)
        first_epoch, start_row = self._lane_start(sharding, shape.per_lane, start_step)
        for epoch in range(first_epoch, 10**9):
            empty = True
            batches = self.training.batches(
                shape.per_lane, seed=zlib.crc32(f"{seed}/{lane}/{epoch}".encode()), process=sharding, start_row=start_row
            )
            for batch in batches:
                empty = False
                yield batch
            if empty and not start_row:
                raise EmptyDatasetError(
                    f"data lane {lane} of {shape.lanes} holds fewer than {shape.per_lane} training tokens: raise "
                    "harvest.train_tokens, or lower cycles.batch_size or cycles.data_lanes"
                )
            start_row = 0

    def _lane_start(self, sharding: ContextSharding, per_lane: int, start_step: int) -> tuple[int, int]:
        """(epoch, rows of it already read) where the lane's batch ``start_step`` begins (an epoch
        drops its last partial batch), from the row counts of the lane's shards."""
        if not start_step:
            return 0, 0
        owned = range(sharding.process_index, self.training.num_shards, sharding.num_processes)
        rows = [self.training.known_rows(shard) for shard in owned]
        if None in rows:  # a shard never harvested: the first epoch was not read to its end yet
            return 0, start_step * per_lane
        epoch, step = divmod(start_step, max(sum(rows) // per_lane, 1))
        return epoch, step * per_lane

    def harvested_shard_rows(self) -> dict[int, int]:
        """Kept rows of the streamed shards this process harvested (a cache knows its own)."""
        return {} if isinstance(self.training, ActivationCache) else self.training.shard_rows

    def remember_shard_rows(self, rows: dict[int, int]) -> None:
        """Kept rows of shards a stopped run streamed: a resumed stage seeks with them."""
        if isinstance(self.training, ActivationStream):
            self.training.shard_rows.update(rows)

    def held_out_batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        return iter(self.held_out.split(batch_size))


def lanes_in_order(share: torch.Tensor, shape: BatchShape, storage_dtype: torch.dtype) -> torch.Tensor:
    """This process's share of a micro-batch all-gathered with every other process's, the lanes put
    back in order: ``torch.cat`` over lanes 0..L-1, the micro-batch one process reads. Sent in the
    storage dtype (bfloat16: half the bytes of float32), which holds the rows exactly, and on the
    accelerator (NCCL gathers nothing else); float32 again after."""
    if shape.processes == 1:
        return share
    sent = share.to(process_state().device, storage_dtype, non_blocking=True)
    shares = [torch.empty_like(sent) for _ in range(shape.processes)]
    dist.all_gather(shares, sent)
    by_lane = {
        lane: rows for process, rows_of in enumerate(shares) for lane, rows in zip(shape.lanes_of(process), rows_of.split(shape.per_lane))
    }
    return torch.cat([by_lane[lane] for lane in range(shape.lanes)]).float()


def held_out_contexts(config: DistillConfig) -> int:
    """Contexts of the held-out set: enough for ``eval.tokens`` kept positions (at most one per
    context position) and for the ``eval.ce_contexts`` spliced-loss contexts."""
    return max(math.ceil(config.eval.tokens / config.data.context_length), config.eval.ce_contexts)


@torch.no_grad()
def _held_out(
    model: PreTrainedModel, hook: nn.Module, config: DistillConfig, tokenizer, start: int, source: ContextSource | None = None
) -> HeldOut:
    """Held-out contexts after the training and attribution ranges: activations for the
    reconstruction metrics, and the first ``eval.ce_contexts`` contexts for the spliced loss.
    Read from ``source`` (the run's context index), else tokenised here."""
    source = source or tokenising_source(tokenizer, config.data)
    batches = list(context_batches(source(start, held_out_contexts(config), None), config.harvest.batch_size))
    if not batches:
        raise EmptyDatasetError(
            f"no held-out context after index {start}: the dataset is used up by training and attribution. "
            "Use more text or lower harvest.train_tokens"
        )
    device = next(model.parameters()).device
    rows, masks, census = [], [], PositionCensus()
    for batch in tqdm(batches, desc="harvest held-out", disable=not process_state().is_local_main_process):
        hidden = capture_activations(model, hook, batch.input_ids.to(device))
        token_mask = batch.mask.to(device)
        kept = kept_positions(hidden, token_mask, config.harvest.max_norm_ratio)
        census.add(hidden, token_mask, kept)
        rows.append(hidden[kept].float().cpu())
        masks.append(kept.cpu())
    # The spliced-loss contexts keep the same positions: the SAE replaces (and the ablation zeroes)
    # the activations there and nowhere else, and only predictions between kept positions count.
    all_ids, all_masks = torch.cat([b.input_ids for b in batches]), torch.cat(masks)
    slots = all_masks.flatten().nonzero().squeeze(1)[: config.eval.tokens]
    contexts = all_ids[: int(slots[-1]) // all_ids.shape[1] + 1] if slots.numel() else all_ids[:0]
    ce_ids, ce_mask = all_ids[: config.eval.ce_contexts], all_masks[: config.eval.ce_contexts]
    return HeldOut(
        torch.cat(rows)[: config.eval.tokens], ce_ids, ce_mask, census, slots, contexts,
        ce_clean=mean_next_token_loss(model, hook, ce_ids, ce_mask),
        ce_zero_ablated=mean_next_token_loss(model, hook, ce_ids, ce_mask, torch.zeros_like),
    )  # fmt: skip


class HeldOut(NamedTuple):
    activations: torch.Tensor
    ce_input_ids: torch.Tensor
    ce_loss_mask: torch.Tensor
    census: PositionCensus
    slots: torch.Tensor
    contexts: torch.Tensor
    ce_clean: float
    ce_zero_ablated: float


HELD_OUT_TENSORS = ("activations", "ce_input_ids", "ce_loss_mask", "slots", "contexts")


def _held_out_fingerprint(model: PreTrainedModel, config: DistillConfig, tokenizer, start: int) -> dict:
    """What the held-out set depends on: a stored one that differs is computed again."""
    return {
        "model_fingerprint": model_fingerprint(model),
        "compute_dtype": str(model.dtype).removeprefix("torch."),
        "hook_module": config.model.hook_module,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "data": describe_data(config.data),
        "first_context": start,
        "eval": {"tokens": config.eval.tokens, "ce_contexts": config.eval.ce_contexts},
        "harvest": {"batch_size": config.harvest.batch_size, "max_norm_ratio": config.harvest.max_norm_ratio},
    }


def _save_held_out(path: Path, held_out: HeldOut, fingerprint: dict) -> None:
    tensors = {name: getattr(held_out, name).clone() for name in HELD_OUT_TENSORS}  # some are views of one tensor
    metadata = {
        "fingerprint": json.dumps(fingerprint, sort_keys=True),
        "census": json.dumps(dataclasses.asdict(held_out.census)),
        "ce": json.dumps([held_out.ce_clean, held_out.ce_zero_ablated]),
    }
    write_bytes(path, save(tensors, metadata=metadata))


def _load_held_out(path: Path, fingerprint: dict) -> HeldOut | None:
    """The stored held-out set, None (with a line saying why) when it was computed otherwise."""
    if not path.exists():
        return None
    try:
        with safe_open(path, "pt") as file:
            metadata = file.metadata()
            tensors = {name: file.get_tensor(name) for name in HELD_OUT_TENSORS}
    except Exception as error:  # a truncated or overwritten file: computed again
        print(f"computing the held-out set again: {path} is unreadable ({error})")
        return None
    if json.loads(metadata["fingerprint"]) != json.loads(json.dumps(fingerprint, sort_keys=True)):
        print(f"computing the held-out set again: {path} was computed with other model, data or eval settings")
        return None
    census = PositionCensus(**json.loads(metadata["census"]))
    clean, ablated = json.loads(metadata["ce"])
    return HeldOut(census=census, ce_clean=clean, ce_zero_ablated=ablated, **tensors)


def held_out_set(
    paths: RunDirectory, model: PreTrainedModel, hook: nn.Module, config: DistillConfig, tokenizer, source: ContextSource, start: int
) -> HeldOut:
    """The held-out set, computed once per run by the main process into the run folder (the
    others wait) and read from there by every process, on every start and resume."""
    state = process_state()
    fingerprint = _held_out_fingerprint(model, config, tokenizer, start)
    if state.is_main_process and _load_held_out(paths.held_out, fingerprint) is None:
        _save_held_out(paths.held_out, _held_out(model, hook, config, tokenizer, start, source), fingerprint)
    state.wait_for_everyone()
    held_out = _load_held_out(paths.held_out, fingerprint)
    if held_out is None:
        raise CorruptRunFileError(f"{paths.held_out} does not match this run: the run folder must be shared by every process")
    return held_out


def prepare_harvest(
    config: DistillConfig, accelerator: Accelerator, paths: RunDirectory, after_shard: Callable[[], None] = lambda: None
) -> Harvest:
    """Load the base model, check it against the configuration, harvest (or reopen) everything;
    ``after_shard`` runs after each cached shard is written."""
    base_model, tokenizer = load_base_model(dataclasses.replace(config.model, device=str(accelerator.device)))
    hook = resolve_hook_module(base_model, config.model.hook_module)
    d_in = base_model.config.get_text_config().hidden_size
    if config.dictionary.d_in is not None and config.dictionary.d_in != d_in:
        raise ConfigError(
            f"--dictionary.d_in {config.dictionary.d_in}: {config.model.model_id} has hidden size {d_in}; "
            "fix --dictionary.d_in or the base model"
        )
    # Cached under the run unless told otherwise; the attribution sample is small and always cached.
    harvest = config.harvest if config.harvest.cache_dir else dataclasses.replace(config.harvest, cache_dir=str(paths.cache_dir()))
    streamed = dataclasses.replace(harvest, cache_dir=None) if config.run.stream_activations else harvest
    ranges = harvest.context_ranges(config.data.context_length)
    # Every stage slices the contexts tokenised once for the run (held-out ones included).
    index = open_context_index(paths.contexts, tokenizer, config.data, ranges.heldout_start + held_out_contexts(config))
    source = index.contexts
    training = harvest_activations(base_model, tokenizer, config.model, config.data, streamed, after_shard, source)
    attribution = harvest_attribution_sample(base_model, tokenizer, config.model, config.data, harvest, after_shard, source)
    held_out = held_out_set(paths, base_model, hook, config, tokenizer, source, ranges.heldout_start)
    training_census = training.positions() if isinstance(training, ActivationCache) else None
    return Harvest(
        base_model=base_model,
        hook_module=hook,
        hook_layer=hook_layer_index(config.model.hook_module),
        d_in=d_in,
        training=training,
        attribution_x=attribution.x,
        attribution_g=attribution.g,
        held_out=held_out.activations,
        held_out_slots=held_out.slots,
        held_out_tokens=held_out.contexts,
        tokenizer=tokenizer,
        ce_input_ids=held_out.ce_input_ids,
        ce_loss_mask=held_out.ce_loss_mask,
        ce_clean=held_out.ce_clean,
        ce_zero_ablated=held_out.ce_zero_ablated,
        positions={"training": training_census, "held_out": held_out.census.report(), "max_norm_ratio": config.harvest.max_norm_ratio},
        normalization_factor=float(attribution.x.pow(2).sum(-1).mean().sqrt()),
    )
