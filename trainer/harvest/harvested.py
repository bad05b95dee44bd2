"""The harvest: everything a run reads from the base model, prepared once (:func:`prepare_harvest`)
and handed to every stage as one :class:`Harvest`: the training activations (cached or streamed),
the (x, g) attribution sample, held-out activations and contexts for evaluation, and the input
normalisation factor."""

from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from modeling_dmsae.configuration_dmsae import hook_layer_index
from trainer.config import DistillConfig
from trainer.errors import ConfigError, EmptyDatasetError
from trainer.harvest.base_model import capture_activations, load_base_model, mean_next_token_loss, resolve_hook_module
from trainer.harvest.cache import (
    ActivationCache,
    ActivationStream,
    PositionCensus,
    harvest_activations,
    harvest_attribution_sample,
    kept_positions,
)
from trainer.harvest.text_corpus import ContextSharding, context_batches, packed_contexts, process_state
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


@torch.no_grad()
def _held_out(model: PreTrainedModel, hook: nn.Module, config: DistillConfig, tokenizer, start: int):
    """Held-out contexts after the training and attribution ranges: activations for the
    reconstruction metrics, and the first ``eval.ce_contexts`` contexts for the spliced loss."""
    count = max(math.ceil(config.eval.tokens / config.data.context_length), config.eval.ce_contexts)
    batches = list(context_batches(packed_contexts(tokenizer, config.data, start, count), config.harvest.batch_size))
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
    return HeldOut(torch.cat(rows)[: config.eval.tokens], all_ids[: config.eval.ce_contexts], all_masks[: config.eval.ce_contexts], census, slots, contexts)


class HeldOut(NamedTuple):
    activations: torch.Tensor
    ce_input_ids: torch.Tensor
    ce_loss_mask: torch.Tensor
    census: PositionCensus
    slots: torch.Tensor
    contexts: torch.Tensor


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
    training = harvest_activations(base_model, tokenizer, config.model, config.data, streamed, after_shard)
    attribution = harvest_attribution_sample(base_model, tokenizer, config.model, config.data, harvest, after_shard)
    ranges = harvest.context_ranges(config.data.context_length)
    held_out = _held_out(base_model, hook, config, tokenizer, ranges.heldout_start)
    training_census = training.manifest.get("positions") if isinstance(training, ActivationCache) else None
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
        ce_clean=mean_next_token_loss(base_model, hook, held_out.ce_input_ids, held_out.ce_loss_mask),
        ce_zero_ablated=mean_next_token_loss(base_model, hook, held_out.ce_input_ids, held_out.ce_loss_mask, torch.zeros_like),
        positions={"training": training_census, "held_out": held_out.census.report(), "max_norm_ratio": config.harvest.max_norm_ratio},
        normalization_factor=float(attribution.x.pow(2).sum(-1).mean().sqrt()),
    )
