"""One SAE optimisation step, as the established Matryoshka BatchTopK trainers take it.

Adam (0.9, 0.999), linear warmup then linear decay over the last fraction of the run, the
decoder gradient's component parallel to each decoder row removed before the step, gradient
clipping, unit-norm decoder rows after the step and dead-latent tracking for AuxK
(dictionary_learning's recipe; reference notes, section 2). The maths of the loss lives in
``modeling_dmsae``.

The inference threshold is calibrated once training is done (:meth:`SAETrainer.calibrate_threshold`),
not averaged while it runs: dictionary_learning's EMA (beta 0.999) of the smallest kept activation
still holds 0.999^n of its first value after n updates (74% after 300), so on any run that is not
many thousands of steps long it remembers the early, untrained SAE and the held-out L0 misses k.

Under Accelerate the model is wrapped in DDP and the processes' batches form one global batch:
BatchTopK's cut, AuxK's variance, the dead-latent counts, b_dec's initial geometric median and
the threshold calibration are all taken over it (``global_batch=True``), and DDP averages the
per-process mean losses' gradients, which is the global mean's gradient. So the same
configuration trains the same SAE on 1, 2 or 8 processes, up to floating-point summation order.

A ``process_local`` trainer (the SAE-parallel transfer, ``trainer.run.parallelism``) trains its SAE
on this process alone, with no DDP wrapper, no collective and no gradient all-reduce: every one of
those quantities is taken over the batch it is given, which is then the whole global batch. So it
trains bit for bit the SAE one process trains on the same batches.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, ContextManager, Iterable, Iterator, NamedTuple, Sequence

import torch
from accelerate import Accelerator

from modeling_dmsae import DMSAEModel
from modeling_dmsae.modeling_dmsae import batch_process_group, calibrated_threshold
from trainer.config import OptimizerConfig
from trainer.errors import CorruptRunFileError, UserError
from trainer.run.files import atomic_path
from trainer.sae.checkpoints import BackgroundWriter, drift_rows, read_whole_checkpoint


class NonFiniteTrainingError(UserError, FloatingPointError):
    """The loss or the gradient went NaN/Inf: the step is not taken, the weights stay as they were."""


def check_finite_weights(model: DMSAEModel, what: str) -> DMSAEModel:
    """``model``, or FloatingPointError when a parameter or buffer holds NaN/Inf."""
    bad = [name for name, tensor in model.state_dict().items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise NonFiniteTrainingError(f"{what}: the SAE holds NaN/Inf in {', '.join(bad)}; it is not saved, evaluated or pushed")
    return model


@contextmanager
def _tf32_matmuls() -> Iterator[None]:
    """CUDA's fp32 matmuls in TF32 for the duration: what a bf16 training step leaves in fp32 needs
    no more precision than its bf16 GEMMs. Scoped to the step, so calibration and evaluation stay exact."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def step_precision(compute_dtype: torch.dtype | None, device: torch.device) -> ContextManager:
    """TF32 for the fp32 matmuls of a bf16 step on CUDA; nothing otherwise."""
    return _tf32_matmuls() if compute_dtype == torch.bfloat16 and device.type == "cuda" else nullcontext()


def compute_dtype(accelerator: Accelerator) -> torch.dtype | None:
    """The SAE's compute dtype under ``accelerator``: Accelerate's bf16 autocast reaches none of the
    SAE's sparse kernels, so the model computes in bf16 itself (``DMSAEModel.compute_dtype``)."""
    return torch.bfloat16 if accelerator.mixed_precision == "bf16" else None


class StepStats(NamedTuple):
    """What one step measured (floats, already reduced over processes where it matters)."""

    loss: torch.Tensor
    reconstruction_loss: torch.Tensor
    aux_loss: torch.Tensor
    l0_core: torch.Tensor
    l0_noncore: torch.Tensor
    dead_fraction: torch.Tensor
    smallest_kept: torch.Tensor
    """The smallest activation BatchTopK kept in this batch (the per-batch threshold)."""


def warmup_then_decay(total_steps: int, warmup_steps: int, decay_fraction: float):
    """LR multiplier: linear 0 -> 1 over the warmup, flat, then linear -> 0 over the last fraction."""
    decay_start = int(total_steps * (1 - decay_fraction))

    def multiplier(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        if step < decay_start or decay_start >= total_steps:
            return warm
        return warm * max(0.0, (total_steps - step) / (total_steps - decay_start))

    return multiplier


def optimizer_and_schedule(
    parameters: Iterable[torch.nn.Parameter], config: OptimizerConfig, num_latents: int, total_steps: int
) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.LambdaLR]:
    """Fused Adam over ``parameters`` at the SAE's learning rate (by its K), and its schedule:
    warmup (at most a tenth of the run), then linear decay over ``total_steps`` optimiser steps."""
    optimizer = torch.optim.Adam(parameters, lr=config.learning_rate(num_latents), betas=(config.beta1, config.beta2), fused=True)
    warmup = min(config.warmup_steps, max(total_steps // 10, 1))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_decay(total_steps, warmup, config.decay_fraction))


class TrainingCallback:
    """What a training loop tells the code around it (logs, checkpoints, timings, progress), as
    transformers' TrainerCallback: every method does nothing unless a subclass overrides it."""

    def on_step_end(self, trainer: SAETrainer, step: int, stats: StepStats) -> None:
        """After micro-step ``step`` (0-based) of the run; ``trainer.steps_taken`` is ``step + 1``.
        With gradient accumulation, ``trainer.at_step_boundary`` says whether an optimisation step
        was just taken (the only place to checkpoint: a half-accumulated gradient is not saved)."""

    def on_train_end(self, trainer: SAETrainer) -> None:
        """After the last step."""


def fit(trainer: SAETrainer, batches: Iterator[torch.Tensor], total_steps: int, callbacks: Sequence[TrainingCallback] = ()) -> None:
    """Train from ``trainer.steps_taken`` (0, or where a checkpoint left off) to ``total_steps``
    micro-steps on ``batches``. The loop knows neither where the data comes from nor where
    anything is written: ``callbacks`` do the bookkeeping. A failed step raises with
    ``trainer.steps_taken`` still the failed step's number."""
    fit_in_lockstep([trainer], batches, trainer.steps_taken, total_steps, [callbacks])


def fit_in_lockstep(
    trainers: Sequence[SAETrainer],
    batches: Iterator[torch.Tensor],
    start_step: int,
    total_steps: int,
    callbacks: Sequence[Sequence[TrainingCallback]],
    after_step: Callable[[int], None] = lambda step: None,
) -> None:
    """Train several SAEs on the same batches, ``batches`` beginning at micro-step ``start_step``:
    each batch goes to every trainer whose next step it is (a trainer resumed from a later
    checkpoint waits for its step), with its own ``callbacks``. ``after_step(step)`` runs after
    every micro-step, whether or not a trainer took it: the place for collectives, which every
    process must reach however many SAEs it trains."""
    for step in range(start_step, total_steps):
        batch = next(batches)
        for trainer, own in zip(trainers, callbacks, strict=True):
            if trainer.steps_taken == step:
                stats = trainer.step(batch)
                for callback in own:
                    callback.on_step_end(trainer, step, stats)
        after_step(step)
    for trainer, own in zip(trainers, callbacks, strict=True):
        for callback in own:
            callback.on_train_end(trainer)


class SAETrainer:
    """Owns the optimiser state of one SAE; ``step(batch)`` takes one optimisation step."""

    def __init__(
        self,
        model: DMSAEModel,
        config: OptimizerConfig,
        total_steps: int,
        accelerator: Accelerator | None = None,
        process_local: bool = False,
        background_checkpoints: bool = False,
    ):
        """``total_steps``: optimiser steps of the run (micro-batches / gradient accumulation).
        ``process_local``: train on this process's batches alone (no DDP, no collective); the
        default takes the processes' batches as one global batch. ``background_checkpoints``:
        :meth:`save_checkpoint` returns once the state is copied to host memory and writes the file
        in a thread (:class:`~trainer.sae.checkpoints.BackgroundWriter`); :meth:`release` and
        :meth:`wait_for_checkpoint` wait for it."""
        self.checkpoint_writer = BackgroundWriter() if background_checkpoints else None
        self.accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        self.config = config
        self.process_local = process_local
        self.total_steps = total_steps
        sae_config = model.config
        optimizer, scheduler = optimizer_and_schedule(model.parameters(), config, sae_config.num_latents, total_steps)
        # The scheduler is not prepared: Accelerate would step it once per process; it steps here
        # once per optimiser step, so total_steps counts optimiser steps whatever the world size.
        # A process-local SAE is not prepared at all: nothing of it is shared with other processes.
        self.model, self.optimizer = (model, optimizer) if process_local else self.accelerator.prepare(model, optimizer)
        model.compute_dtype = compute_dtype(self.accelerator)
        self.scheduler = scheduler
        device = self.accelerator.device
        self.tokens_since_fired = torch.zeros(sae_config.num_latents, dtype=torch.long, device=device)
        self.steps_taken = 0
        if not process_local:
            self.accelerator.step = 0  # accelerate's micro-step counter decides when accumulate() syncs
        # Where a sample of the trainable decoder rows started: how far training moved them tells
        # an SAE that learned from one still near its random initialisation (decoder_cosine_to_init).
        self.drift_rows = drift_rows(sae_config.num_latents, sae_config.core_size).to(device)
        self.initial_decoder_rows = model.W_dec.detach()[self.drift_rows].clone()

    @property
    def sae(self) -> DMSAEModel:
        return self.accelerator.unwrap_model(self.model)

    @property
    def optimizer_steps(self) -> int:
        """Optimisation steps taken (micro-steps / gradient accumulation)."""
        return self.steps_taken // self.accelerator.gradient_accumulation_steps

    @property
    def global_batch(self) -> bool:
        """Whether BatchTopK, AuxK, the dead counts, b_dec's median and the calibration are taken
        over every process's batch (the ``global_batch`` of ``modeling_dmsae``)."""
        return not self.process_local

    @property
    def at_step_boundary(self) -> bool:
        """No gradient is half accumulated: a checkpoint here resumes bit for bit."""
        return self.steps_taken % self.accelerator.gradient_accumulation_steps == 0

    def release(self) -> DMSAEModel:
        """The trained SAE, with everything Accelerate keeps for training it (the DDP wrapper, the
        optimiser and its Adam moments) dropped: without this, every stage's SAE and optimiser stay
        referenced by the one Accelerator until the run ends."""
        self.wait_for_checkpoint()
        sae = self.sae
        sae.compute_dtype = None  # what follows training (evaluation, export) computes in the saved fp32
        self.model = self.optimizer = self.scheduler = None
        if not self.process_local:  # a process-local SAE was never handed to Accelerate
            self.accelerator.free_memory()  # empties its lists of prepared models and optimisers
        return sae

    def dead_latents(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.sae.config.dead_tokens_threshold

    def step(self, batch: torch.Tensor) -> StepStats:
        """Forward, backward, optimiser step and bookkeeping on one [N, d] batch."""
        sae = self.sae
        batch = batch.to(self.accelerator.device, non_blocking=True)  # asynchronous from pinned memory (prefetched on CUDA)
        if self.steps_taken == 0:
            sae.initialize_decoder_bias_(batch, global_batch=self.global_batch)
        with self._accumulating(), self._step_precision():
            output = self.model(batch, dead_latents=self.dead_latents(), output_dense_latents=False, global_batch=self.global_batch)
            self._backward(output.loss)
            if self._sync_gradients:
                sae.remove_decoder_parallel_gradient_()
                norm = self._clip_grad_norm()
                # One scalar check per step (the norm is reduced over processes, so all stop together);
                # NaN/Inf anywhere in the loss or the gradients makes it non-finite.
                if not torch.isfinite(norm):
                    self.optimizer.zero_grad(set_to_none=True)
                    raise NonFiniteTrainingError(
                        f"non-finite loss {output.loss.item():.4g} / gradient norm {norm.item():.4g}; the step was not taken"
                    )
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                sae.normalize_decoder_()
        self._track_dead_latents(output.fired, batch.shape[0])
        self.steps_taken += 1
        return StepStats(
            loss=output.loss.detach(),
            reconstruction_loss=output.reconstruction_loss.detach(),
            aux_loss=output.aux_loss.detach(),
            l0_core=output.l0_core,
            l0_noncore=output.l0_noncore,
            dead_fraction=self.dead_latents().float().mean(),
            smallest_kept=output.batchtopk_threshold,
        )

    def _step_precision(self) -> ContextManager:
        return step_precision(self.sae.compute_dtype, self.accelerator.device)

    # ---- what differs between a DDP and a process-local trainer ---------------------------------
    # Accelerate's micro-step counter is one per Accelerator: process-local trainers, several of
    # them stepping in lockstep, count their own steps instead, and skip what Accelerate adds for
    # DDP (no_sync while accumulating, the gradient all-reduce, the norm's reduction).

    def _accumulating(self) -> ContextManager:
        return nullcontext() if self.process_local else self.accelerator.accumulate(self.model)

    @property
    def _sync_gradients(self) -> bool:
        """Whether this micro-step ends an optimisation step."""
        if self.process_local:
            return (self.steps_taken + 1) % self.accelerator.gradient_accumulation_steps == 0
        return self.accelerator.sync_gradients

    def _backward(self, loss: torch.Tensor) -> None:
        if self.process_local:
            (loss / self.accelerator.gradient_accumulation_steps).backward()
        else:
            self.accelerator.backward(loss)

    def _clip_grad_norm(self) -> torch.Tensor:
        clip = torch.nn.utils.clip_grad_norm_ if self.process_local else self.accelerator.clip_grad_norm_
        return clip(self.model.parameters(), self.config.max_grad_norm)

    def _track_dead_latents(self, fired: torch.Tensor, num_tokens: int) -> None:
        """Tokens every process saw since each latent last fired anywhere (one reduction)."""
        counts = torch.cat([fired.long(), fired.new_tensor([num_tokens], dtype=torch.long)])
        if self.global_batch:
            counts = self.accelerator.reduce(counts, "sum")
        self.tokens_since_fired += counts[-1]
        self.tokens_since_fired[counts[:-1] > 0] = 0

    @torch.no_grad()
    def calibrate_threshold(self, batches: Iterable[torch.Tensor]) -> DMSAEModel:
        """Set the trained SAE's inference threshold from training activations and return the SAE.

        theta is chosen so that keeping the entries above it one token at a time keeps exactly what
        BatchTopK over all calibration tokens (of every process) at once would: k_noncore per token
        on average (:func:`modeling_dmsae.calibrated_threshold`). Each process keeps only its own
        largest candidates; the radix select's histograms are summed over processes, so neither
        the [N, K] activations nor the candidates are gathered.
        """
        sae, device = self.sae, self.accelerator.device
        batches = [batch.to(device) for batch in batches]
        num_tokens = torch.tensor(sum(map(len, batches)), device=device)
        num_tokens = int(self.accelerator.reduce(num_tokens, "sum") if self.global_batch else num_tokens)
        budget = sae.config.k_noncore * num_tokens + 1
        pool = torch.zeros(0, device=device)
        for batch in batches:
            pool = torch.cat([pool, sae.threshold_candidates(batch, budget)])
            pool = pool.topk(min(budget, pool.numel()), sorted=False).values
        group = batch_process_group(self.global_batch)
        sae.config.threshold = calibrated_threshold(pool, num_tokens, sae.config.k_noncore, group)
        return sae

    @torch.no_grad()
    def decoder_cosine_to_init(self) -> float:
        """Median cosine between a trainable decoder row now and where it started (rows are unit
        norm): near 1 means most of the dictionary is still its random initialisation, i.e. the SAE
        is undertrained; NaN when nothing is trainable."""
        if not len(self.drift_rows):
            return float("nan")
        now = torch.nn.functional.normalize(self.sae.W_dec.detach()[self.drift_rows].float(), dim=-1)
        start = torch.nn.functional.normalize(self.initial_decoder_rows.float(), dim=-1)
        return float((now * start).sum(-1).median())

    # ---- checkpoints: everything a resumed run needs to continue bit for bit ------------------

    def save_checkpoint(self, path: Path, reader_state: dict | None = None) -> None:
        """Write weights, optimiser and schedule state and the bookkeeping (temporary file, then
        rename), with ``reader_state``: what the batches' reader needs to continue from here. A
        process-local SAE is written by its process, without waiting for the others."""
        if self.process_local or self.accelerator.is_main_process:
            state = {
                "model": self.sae.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "tokens_since_fired": self.tokens_since_fired,
                "steps_taken": self.steps_taken,
                "initial_decoder_rows": self.initial_decoder_rows,
                "reader_state": reader_state,
            }
            if self.checkpoint_writer:
                self.checkpoint_writer.write(path, state)
            else:
                with atomic_path(path) as temporary:
                    torch.save(state, temporary)
        if not self.process_local:
            self.accelerator.wait_for_everyone()

    def wait_for_checkpoint(self) -> None:
        """Return once the last checkpoint is written (at once without background checkpoints)."""
        if self.checkpoint_writer:
            self.checkpoint_writer.wait()

    def load_checkpoint(self, path: Path) -> dict | None:
        """Restore a checkpoint (tensors only: weights_only=True) and return its reader state (None
        when it was written without one); an unreadable one is named with the fix."""
        try:
            # Written by either trainer on any number of processes (trainer.sae.checkpoints).
            state = read_whole_checkpoint(path, self.accelerator.device)
            self.sae.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.tokens_since_fired.copy_(state["tokens_since_fired"])
            self.steps_taken = int(state["steps_taken"])
            if not self.process_local:
                self.accelerator.step = self.steps_taken % self.accelerator.gradient_accumulation_steps
            self.initial_decoder_rows.copy_(state["initial_decoder_rows"])
        except Exception as error:  # torch's own text would suggest an unsafe weights_only=False
            raise CorruptRunFileError(
                f"training checkpoint {path} is unreadable or does not fit this SAE ({type(error).__name__}): delete it "
                "and rerun with --run.resume true; its stage restarts from step 0, finished stages are kept"
            ) from None
        check_finite_weights(self.sae, str(path))
        return state.get("reader_state")
