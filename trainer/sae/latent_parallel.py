"""Latent-parallel training of one SAE: each of the P processes holds K/P of the latents (a
contiguous range: their encoder rows, b_enc entries, decoder rows and their Adam moments) and the
whole global batch; b_dec is replicated. What one step sends, per process:

- BatchTopK over all K latents: the sampled bound (one all-reduce MIN), the candidates' count and
  the exact radix select of the cut (four all-reduces of 256 counts): ``batch_topk_entries`` with
  ``shards_latents``;
- the Matryoshka prefixes: each process decodes its own kept entries into partial prefix
  reconstructions (every prefix cuts across shards), summed by one all-reduce of [L+1, N, d];
- AuxK: each process's per-token top aux_k dead latents are all-gathered to find each token's
  aux_k-th largest over all shards, and the partial auxiliary reconstructions all-reduced;
- b_dec's gradient through the encoder (a sum over latents: one all-reduce of d) and the squared
  gradient norm for clipping (one scalar).

Nothing else crosses processes in the backward: every process computes the same loss from the
same summed prefixes, so the gradient reaching its partial reconstruction is the loss's gradient
(Megatron's "g" operator: all-reduce forward, identity backward), and its latents' gradients are
local. Adam, the decoder's unit norm and the parallel-gradient removal are row-wise, hence local.
The step is the single-process step's maths, up to floating-point summation order.

The formulas are ``modeling_dmsae``'s (the encoder GEMM, the selection, the sparse decode and its
backward, the prefix losses); this file only cuts the latents and says where the sums cross
processes. A checkpoint holds each shard with its global latent range, and loads into any number
of processes, or into the single-process :class:`~trainer.sae.training.SAETrainer`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, NamedTuple

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import nn

from modeling_dmsae import DMSAEConfig, DMSAEModel
from modeling_dmsae.modeling_dmsae import (
    _SparseDecodePrefixes,
    _SparseEncoderValues,
    batch_topk_entries,
    calibrated_threshold,
    geometric_median,
    largest_positive,
    matryoshka_prefix_losses,
    normalized_aux_error,
    relu_preactivations,
)
from trainer.config import OptimizerConfig
from trainer.errors import CorruptRunFileError
from trainer.run.files import atomic_path
from trainer.sae.checkpoints import (
    PARAMETER_ORDER,
    SHARDED_FORMAT,
    SHARDED_PARAMETERS,
    drift_rows,
    read_whole_checkpoint,
    remove_stale_shards,
    shard_path,
)
from trainer.sae.training import (
    NonFiniteTrainingError,
    StepStats,
    check_finite_weights,
    compute_dtype,
    optimizer_and_schedule,
    step_precision,
)


class LatentRange(NamedTuple):
    """The global latents [start, stop) one process holds, and the core among them."""

    start: int
    stop: int
    core_size: int
    """c of the whole SAE (the core is latents 0..c-1)."""

    @property
    def core(self) -> slice:
        """Its core latents, as rows of the [c, d] core encoder."""
        return slice(min(self.start, self.core_size), min(self.stop, self.core_size))

    @property
    def noncore(self) -> slice:
        """Its non-core latents, as rows of the [K - c, d] trainable encoder."""
        c = self.core_size
        return slice(max(self.start, c) - c, max(self.stop, c) - c)

    @property
    def local_core_size(self) -> int:
        return self.core.stop - self.core.start

    def of(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This range of a whole SAE's parameter (or Adam moment) ``name``; b_dec whole."""
        if name == "encoder":
            return tensor[self.noncore]
        if name in ("b_enc", "W_dec", "tokens_since_fired"):
            return tensor[self.start : self.stop]
        return tensor


def latent_ranges(num_latents: int, core_size: int, processes: int) -> list[LatentRange]:
    """Contiguous ranges of as equal sizes as possible, process 0 first."""
    bounds = [num_latents * p // processes for p in range(processes + 1)]
    return [LatentRange(start, stop, core_size) for start, stop in zip(bounds, bounds[1:])]


class _SumOverShards(torch.autograd.Function):
    """Forward: the sum over processes of their partial results. Backward: identity, since every
    process computes the same loss from the sum, its partial's gradient is the sum's."""

    @staticmethod
    def forward(ctx, partial: torch.Tensor) -> torch.Tensor:
        total = partial.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class _SharedInput(torch.autograd.Function):
    """Forward: identity on a replicated tensor. Backward: the gradient summed over processes,
    for a replicated parameter (b_dec) whose gradient each process only has a share of."""

    @staticmethod
    def forward(ctx, replicated: torch.Tensor) -> torch.Tensor:
        return replicated.view_as(replicated)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad


class LatentShard(nn.Module):
    """The latents ``latents`` of a DMSAE, with the whole SAE's configuration: the parameters a
    :class:`DMSAEModel` has, cut to the range (b_dec whole), and its training forward."""

    def __init__(self, model: DMSAEModel, latents: LatentRange):
        super().__init__()
        self.config: DMSAEConfig = model.config
        self.latents = latents
        self.register_buffer("core_encoder", model.core_encoder.detach()[latents.core].clone())
        for name in SHARDED_PARAMETERS:
            self.register_parameter(name, nn.Parameter(latents.of(name, getattr(model, name).detach()).clone()))
        self.b_dec = nn.Parameter(model.b_dec.detach().clone())
        self.register_buffer("block_of_latent", model._block_of_latent()[latents.start : latents.stop].clone())
        self.compute_dtype: torch.dtype | None = None
        """As DMSAEModel.compute_dtype: bf16 copies of the GEMM and decode weights, fp32 masters."""

    @property
    def group(self) -> dist.ProcessGroup:
        return dist.group.WORLD

    def _unmasked_columns(self) -> int:
        """Its core columns when BatchTopK leaves the core alone (dense core), else none."""
        return self.latents.local_core_size if DMSAEModel._unmasked_columns(self) else 0  # the model's rule, on its config

    def _compute_weights(self):
        """The GEMM and decode weights in the compute dtype (DMSAEModel's method: the names match)."""
        return DMSAEModel._compute_weights(self, self.compute_dtype)

    def _values(self, x, centered, relu_pre, rows, cols, weights) -> torch.Tensor:
        """The kept entries' values (widened to the masters' dtype, as DMSAEModel's); b_dec's
        gradient through them summed over the shards."""
        return _SparseEncoderValues.apply(
            x, _SharedInput.apply(self.b_dec), centered, weights.encoder, self.b_enc, weights.core_encoder, rows, cols,
            relu_pre[rows, cols].to(self.b_enc.dtype),
        )  # fmt: skip

    def _decoded(self, rows, cols, values, blocks, num_blocks: int, num_tokens: int, W_dec: torch.Tensor) -> torch.Tensor:
        """[num_blocks, N, d] running sums over blocks of every shard's decoded entries (no b_dec),
        summed over the shards in the compute dtype, then widened to the masters' dtype."""
        partial = _SparseDecodePrefixes.apply(
            values, W_dec, None, rows, cols, blocks, self.latents.local_core_size, num_blocks, num_tokens
        )
        return _SumOverShards.apply(partial).to(self.b_dec.dtype)

    def forward(self, x: torch.Tensor, dead_latents: torch.Tensor) -> tuple[torch.Tensor, StepStats, torch.Tensor]:
        """(loss, statistics, which of its latents fired) on normalised inputs [N, d] that every
        process holds whole; ``dead_latents``: [stop - start] its latents AuxK revives."""
        num_tokens, config = x.shape[0], self.config
        weights = self._compute_weights()
        centered = DMSAEModel._centered(self, x, weights)
        relu_pre = relu_preactivations(centered, weights.core_encoder, weights.encoder, weights.b_enc)
        rows, cols, smallest_kept = batch_topk_entries(
            relu_pre, config.k_noncore, self._unmasked_columns(), self.group, shards_latents=True
        )
        values = self._values(x, centered, relu_pre, rows, cols, weights)
        num_blocks = len(config.group_sizes)
        partials = self._decoded(rows, cols, values, self.block_of_latent[cols], num_blocks, num_tokens, weights.W_dec)
        prefixes = partials + self.b_dec
        prefix_losses = matryoshka_prefix_losses(prefixes, x)
        aux_loss = self._auxk_loss(x, centered, relu_pre, (x - prefixes[-1]).detach(), dead_latents, weights)
        reconstruction_loss = prefix_losses.sum()
        counts = torch.stack([(cols < self.latents.local_core_size).sum(), cols.new_tensor(cols.numel())]).float()
        dist.all_reduce(counts)
        stats = StepStats(
            loss=(reconstruction_loss + config.aux_alpha * aux_loss).detach(),
            reconstruction_loss=reconstruction_loss.detach(),
            aux_loss=aux_loss.detach(),
            l0_core=counts[0] / num_tokens,
            l0_noncore=(counts[1] - counts[0]) / num_tokens,
            dead_fraction=torch.zeros(()),  # filled in by the trainer, which tracks the dead latents
            smallest_kept=smallest_kept,
        )
        fired = torch.zeros(len(self.block_of_latent), dtype=torch.bool, device=x.device).index_fill_(0, cols, True)
        return reconstruction_loss + config.aux_alpha * aux_loss, stats, fired

    def _auxk_loss(self, x, centered, relu_pre, residual, dead_latents, weights) -> torch.Tensor:
        """AuxK (``DMSAEModel.auxk_loss``) over the dead latents of every shard: each token's aux_k
        largest dead pre-activations anywhere, found from each shard's own top aux_k."""
        num_tokens = x.shape[0]
        dead = dead_latents.nonzero().squeeze(1)
        total_dead = torch.tensor([dead.numel()], device=x.device)
        dist.all_reduce(total_dead)
        if not int(total_dead):
            return residual.new_zeros(())
        k_aux = min(self.config.aux_k, int(total_dead))
        local = relu_pre.index_select(1, dead).topk(min(k_aux, dead.numel()), dim=-1, sorted=False)
        # Each shard's candidates padded to k_aux with zeros (never kept: AuxK keeps only positive values).
        padded = relu_pre.new_zeros(num_tokens, k_aux, dtype=torch.float32)
        padded[:, : local.values.shape[1]] = local.values
        everyone = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, padded)
        cut = torch.cat(everyone, dim=1).topk(k_aux, dim=-1, sorted=False).values.min(-1).values  # [N]
        keep = (local.values >= cut[:, None]) & (local.values > 0)
        rows = torch.arange(num_tokens, device=x.device)[:, None].expand_as(keep)[keep]
        cols = dead[local.indices[keep]]
        values = self._values(x, centered, relu_pre, rows, cols, weights)
        reconstruction = self._decoded(rows, cols, values, torch.zeros_like(cols), 1, num_tokens, weights.W_dec)[0]
        return normalized_aux_error(residual, reconstruction)  # every process holds the whole batch

    @torch.no_grad()
    def threshold_candidates(self, x: torch.Tensor, budget: int) -> torch.Tensor:
        """``DMSAEModel.threshold_candidates`` over its latents, from normalised inputs."""
        relu_pre = relu_preactivations(x - self.b_dec, self.core_encoder, self.encoder, self.b_enc)
        return largest_positive(relu_pre, self._unmasked_columns(), budget)


def _gather_rows(local: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Every process's rows of a tensor cut by latent, concatenated in process order."""
    padded = local.new_zeros(max(sizes), *local.shape[1:])
    padded[: len(local)] = local
    everyone = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(everyone, padded)
    return torch.cat([rows[:size] for rows, size in zip(everyone, sizes)])


class LatentParallelTrainer:
    """:class:`~trainer.sae.training.SAETrainer`'s interface (step, calibration, checkpoints,
    drift, release) for an SAE whose latents are cut over the processes; every process passes
    the same (whole) global micro-batch to :meth:`step`."""

    def __init__(self, model: DMSAEModel, config: OptimizerConfig, total_steps: int, accelerator: Accelerator):
        self.accelerator, self.config, self.total_steps = accelerator, config, total_steps
        sae_config = model.config
        ranges = latent_ranges(sae_config.num_latents, sae_config.core_size, accelerator.num_processes)
        self.ranges, self.latents = ranges, ranges[accelerator.process_index]
        self.shard = LatentShard(model, self.latents).to(accelerator.device)
        self.shard.compute_dtype = compute_dtype(accelerator)
        self.optimizer, self.scheduler = optimizer_and_schedule(self.shard.parameters(), config, sae_config.num_latents, total_steps)
        self.accumulation = accelerator.gradient_accumulation_steps
        self.tokens_since_fired = torch.zeros(len(self.shard.block_of_latent), dtype=torch.long, device=accelerator.device)
        self.steps_taken = 0
        # The same drift sample as SAETrainer's (of the whole SAE), each process measuring its own rows.
        rows = drift_rows(sae_config.num_latents, sae_config.core_size)
        self.drift_rows = (rows[(rows >= self.latents.start) & (rows < self.latents.stop)] - self.latents.start).to(accelerator.device)
        self.initial_decoder_rows = self.shard.W_dec.detach()[self.drift_rows].clone()

    # ---- what SAETrainer's callers read ---------------------------------------------------

    @property
    def optimizer_steps(self) -> int:
        return self.steps_taken // self.accumulation

    @property
    def at_step_boundary(self) -> bool:
        return self.steps_taken % self.accumulation == 0

    def dead_latents(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.shard.config.dead_tokens_threshold

    # ---- the step -----------------------------------------------------------------------------

    def step(self, batch: torch.Tensor) -> StepStats:
        """Forward, backward, optimiser step and bookkeeping on the whole global micro-batch [N, d]."""
        shard = self.shard
        x = DMSAEModel.normalize_activations(shard, batch.to(self.accelerator.device, non_blocking=True))  # the model's units
        if self.steps_taken == 0:
            with torch.no_grad():
                shard.b_dec.copy_(geometric_median(x))  # the whole batch is here: the same on every process
        with step_precision(shard.compute_dtype, self.accelerator.device):
            loss, stats, fired = shard(x, self.dead_latents())
            (loss / self.accumulation).backward()
            self.steps_taken += 1
            if self.at_step_boundary:
                self._optimizer_step(loss)
        self._track_dead_latents(fired, x.shape[0])
        return stats._replace(dead_fraction=self._dead_fraction())

    def _optimizer_step(self, loss: torch.Tensor) -> None:
        shard = self.shard
        # Row-wise, so DMSAEModel's own methods apply to the shard's decoder rows as they are.
        DMSAEModel.remove_decoder_parallel_gradient_(shard)
        norm = self._clip_gradients()
        if not torch.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteTrainingError(f"non-finite loss {loss.item():.4g} / gradient norm {norm.item():.4g}; the step was not taken")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        DMSAEModel.normalize_decoder_(shard)

    @torch.no_grad()
    def _clip_gradients(self) -> torch.Tensor:
        """torch's clip_grad_norm_ over the whole SAE: the sharded gradients' squares summed over
        processes, b_dec's (the same everywhere) counted once."""
        # Norms, not squares, of the gradients: no temporary as large as the weights.
        sharded = torch.stack([torch.linalg.vector_norm(getattr(self.shard, name).grad) for name in SHARDED_PARAMETERS]).pow(2).sum()
        dist.all_reduce(sharded)
        norm = (sharded + torch.linalg.vector_norm(self.shard.b_dec.grad).pow(2)).sqrt()
        coefficient = (self.config.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
        for parameter in self.shard.parameters():
            parameter.grad.mul_(coefficient)
        return norm

    def _track_dead_latents(self, fired: torch.Tensor, num_tokens: int) -> None:
        self.tokens_since_fired += num_tokens
        self.tokens_since_fired[fired] = 0

    def _dead_fraction(self) -> torch.Tensor:
        dead = torch.tensor([self.dead_latents().sum()], dtype=torch.float, device=self.accelerator.device)
        dist.all_reduce(dead)
        return dead[0] / self.shard.config.num_latents

    # ---- after training ---------------------------------------------------------------------

    @torch.no_grad()
    def calibrate_threshold(self, batches: Iterable[torch.Tensor]) -> None:
        """``SAETrainer.calibrate_threshold`` over the shards: every process holds every calibration
        token, and the radix select's histograms are summed over the latents' shards."""
        config, device = self.shard.config, self.accelerator.device
        batches = [DMSAEModel.normalize_activations(self.shard, batch.to(device)) for batch in batches]
        num_tokens = sum(map(len, batches))
        budget = config.k_noncore * num_tokens + 1
        pool = torch.zeros(0, device=device)
        for x in batches:
            pool = torch.cat([pool, self.shard.threshold_candidates(x, budget)])
            pool = pool.topk(min(budget, pool.numel()), sorted=False).values
        config.threshold = calibrated_threshold(pool, num_tokens, config.k_noncore, dist.group.WORLD)

    @torch.no_grad()
    def decoder_cosine_to_init(self) -> float:
        now = torch.nn.functional.normalize(self.shard.W_dec.detach()[self.drift_rows].float(), dim=-1)
        start = torch.nn.functional.normalize(self.initial_decoder_rows.float(), dim=-1)
        cosines = _gather_rows((now * start).sum(-1), self._drift_counts())
        return float(cosines.median()) if cosines.numel() else float("nan")

    def _drift_counts(self) -> list[int]:
        counts = torch.tensor([len(self.drift_rows)], device=self.accelerator.device)
        everyone = [torch.empty_like(counts) for _ in self.ranges]
        dist.all_gather(everyone, counts)
        return [int(count) for count in everyone]

    @torch.no_grad()
    def gathered_model(self) -> DMSAEModel:
        """The whole SAE on every process (one all-gather of every parameter, once per stage)."""
        shard, sizes = self.shard, [r.stop - r.start for r in self.ranges]
        config = shard.config
        model = DMSAEModel(config).to(self.accelerator.device)
        core_rows = [r.core.stop - r.core.start for r in self.ranges]
        noncore_rows = [r.noncore.stop - r.noncore.start for r in self.ranges]
        model.core_encoder.copy_(_gather_rows(shard.core_encoder, core_rows))
        model.encoder.copy_(_gather_rows(shard.encoder.detach(), noncore_rows))
        model.b_enc.copy_(_gather_rows(shard.b_enc.detach(), sizes))
        model.W_dec.copy_(_gather_rows(shard.W_dec.detach(), sizes))
        model.b_dec.copy_(shard.b_dec.detach())
        return model

    def release(self) -> DMSAEModel:
        """The trained SAE whole (with its calibrated threshold), the shard and optimiser dropped."""
        model = self.gathered_model()
        self.shard = self.optimizer = self.scheduler = None
        return model

    # ---- checkpoints: each process its shard, any number of processes reads them -----------

    def save_checkpoint(self, path: Path, reader_state: dict | None = None) -> None:
        """Each process writes its shard (weights, Adam moments, dead-latent counts, drift rows);
        then the main process writes the index ``path`` naming them, with what is replicated (b_dec
        and its moments, the schedule, the step) and ``reader_state``. The index is written last
        and atomically: a kill in between leaves the previous checkpoint whole."""
        step = self.steps_taken
        with atomic_path(shard_path(path, step, self.latents.start, self.latents.stop)) as temporary:
            torch.save(self._shard_state(), temporary)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            index = {
                "format": SHARDED_FORMAT,
                "shards": [shard_path(path, step, r.start, r.stop).name for r in self.ranges],
                "b_dec": self.shard.b_dec.detach(),
                "b_dec_adam": self.optimizer.state[self.shard.b_dec],
                "param_groups": self.optimizer.state_dict()["param_groups"],
                "scheduler": self.scheduler.state_dict(),
                "steps_taken": step,
                "reader_state": reader_state,
            }
            with atomic_path(path) as temporary:
                torch.save(index, temporary)
            remove_stale_shards(path, step)
        self.accelerator.wait_for_everyone()

    def wait_for_checkpoint(self) -> None:
        """Nothing to wait for: every process writes its shard before :meth:`save_checkpoint` returns
        (at once, 1/P of the SAE each)."""

    def _shard_state(self) -> dict:
        shard = self.shard
        return {
            "core_encoder": shard.core_encoder,
            "parameters": {name: getattr(shard, name).detach() for name in SHARDED_PARAMETERS},
            "adam": {name: self.optimizer.state[getattr(shard, name)] for name in SHARDED_PARAMETERS},
            "tokens_since_fired": self.tokens_since_fired,
            "initial_decoder_rows": self.initial_decoder_rows,
            "drift_rows": self.drift_rows + self.latents.start,
        }

    def load_checkpoint(self, path: Path) -> dict | None:
        """Continue from a checkpoint written by either trainer on any number of processes;
        returns its reader state."""
        try:
            whole = read_whole_checkpoint(path, self.accelerator.device)
            self._load_range(whole)
        except Exception as error:  # torch's own text would suggest an unsafe weights_only=False
            raise CorruptRunFileError(
                f"training checkpoint {path} is unreadable or does not fit this SAE ({type(error).__name__}): delete it "
                "and rerun with --run.resume true; its stage restarts from step 0, finished stages are kept"
            ) from None
        check_finite_weights(self.gathered_model(), str(path))
        return whole.get("reader_state")

    @torch.no_grad()
    def _load_range(self, whole: dict) -> None:
        """This process's latents of a whole-SAE checkpoint."""
        latents, model = self.latents, whole["model"]
        if model["W_dec"].shape[0] != self.shard.config.num_latents:
            raise ValueError(f"{model['W_dec'].shape[0]} latents, the SAE has {self.shard.config.num_latents}")
        self.shard.core_encoder.copy_(model["core_encoder"][latents.core])
        for name in PARAMETER_ORDER:
            getattr(self.shard, name).copy_(latents.of(name, model[name]))
        moments = {
            index: {key: latents.of(name, value).clone() if value.dim() else value for key, value in state.items()}
            for index, name in enumerate(PARAMETER_ORDER)
            if (state := whole["optimizer"]["state"].get(index))
        }
        self.optimizer.load_state_dict({"state": moments, "param_groups": whole["optimizer"]["param_groups"]})
        self.scheduler.load_state_dict(whole["scheduler"])
        self.tokens_since_fired.copy_(latents.of("tokens_since_fired", whole["tokens_since_fired"]))
        self.steps_taken = int(whole["steps_taken"])
        rows = whole["drift_rows"]
        mine = (rows >= latents.start) & (rows < latents.stop)
        self.initial_decoder_rows = whole["initial_decoder_rows"][mine].clone()
