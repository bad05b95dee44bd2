"""Training SAEs as stages of the run: the loop (``trainer.sae.training.fit_in_lockstep``) with the
run's bookkeeping as callbacks: a progress bar, the training log, checkpoints every
``run.checkpoint_every`` steps (with the timings so far), and a resume from the last checkpoint.
Then the inference threshold is calibrated.

Three ways to share a stage between the processes (``trainer.run.parallelism``), the ``mode`` of
:func:`train_in_lockstep`: DDP trains one SAE on every process, each on its share of the global
batch; latent-parallel trains one SAE whose latents are cut over the processes, each on the whole
global batch, all-gathered from the processes' shares; SAE-parallel trains the SAEs this process
was dealt, each whole, on the whole global batch."""

from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Iterator, Mapping

import torch
import torch.distributed as dist
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from modeling_dmsae import DMSAEModel
from trainer.errors import CorruptRunFileError
from trainer.harvest.harvested import Harvest
from trainer.harvest.prefetch import prefetched
from trainer.pipeline.context import RunContext
from trainer.run.logs import append_record, truncate_log
from trainer.run.parallelism import StageMode
from trainer.run.stages import BatchShape, batch_shape, calibration_batches, stage_seed, steps_for
from trainer.sae.latent_parallel import LatentParallelTrainer
from trainer.sae.training import (
    NonFiniteTrainingError,
    SAETrainer,
    StepStats,
    TrainingCallback,
    check_finite_weights,
    fit_in_lockstep,
)

SHARD_ROWS = "shard_rows"  # the checkpoint's reader state: {shard: rows}

AnyTrainer = SAETrainer | LatentParallelTrainer  # the same interface: step, checkpoints, calibration, release
Trained = tuple[DMSAEModel, dict[str, float]]
"""A trained, calibrated SAE and what training alone can tell of it (how far its decoder moved)."""


class ProgressBar(TrainingCallback):
    def __init__(self, stage: str, total_steps: int, initial: int, enabled: bool, position: int | None = None):
        """``position``: its line, where several bars run at once (the SAEs of a lockstep)."""
        self.bar = tqdm(total=total_steps, initial=initial, desc=stage, disable=not enabled, position=position)

    def on_step_end(self, trainer: SAETrainer, step: int, stats: StepStats) -> None:
        self.bar.update()

    def on_train_end(self, trainer: SAETrainer) -> None:
        self.bar.close()


class TrainingLog(TrainingCallback):
    """Every ``run.log_every`` optimisation steps and after the last: the statistics of the step's
    last micro-batch and the decoder's median cosine to its initialisation to the trackers
    (tensorboard, ...; Accelerate logs from the main process only) and, from the process that
    ``writes`` it (the main one, or a process-local SAE's own), to ``logs/STAGE.jsonl``, numbered by
    optimisation step."""

    def __init__(self, run: RunContext, stage: str, total_steps: int, writes: bool):
        self.run, self.stage, self.total_steps, self.writes = run, stage, total_steps, writes
        self.path = run.paths.log(stage)

    def on_step_end(self, trainer: SAETrainer, step: int, stats: StepStats) -> None:
        optimizer_step = trainer.optimizer_steps - 1
        last = step == self.total_steps - 1
        if not trainer.at_step_boundary or (optimizer_step % self.run.config.run.log_every != 0 and not last):
            return
        record = {"step": optimizer_step, **{name: float(value) for name, value in stats._asdict().items()}}
        # How far the dictionary has moved so far: where its curve flattens, more steps stop paying.
        record["decoder_cosine_to_init"] = trainer.decoder_cosine_to_init()
        self.run.accelerator.log({f"{self.stage}/{name}": value for name, value in record.items() if name != "step"}, step=optimizer_step)
        if self.writes:
            append_record(self.path, record)


class Checkpoints:
    """After every micro-step of a lockstep (on every process, however many SAEs it trains): every
    ``run.checkpoint_every`` optimisation steps (but the last: the stage's folder follows), each
    SAE's state, everything a resumed stage needs to continue bit for bit, and the timings up to
    here. Beside the state go the row counts of the shards every process has read (one
    collective), with which the resumed stage seeks to its next batch instead of reading
    (streamed: harvesting) the batches before it."""

    def __init__(self, run: RunContext, trainers: Mapping[str, AnyTrainer], total_steps: int, harvest: Harvest):
        self.run, self.trainers, self.total_steps, self.harvest = run, trainers, total_steps, harvest

    def __call__(self, step: int) -> None:
        accumulation = self.run.config.run.gradient_accumulation_steps
        taken = step + 1
        due = taken % accumulation == 0 and (taken // accumulation) % self.run.config.run.checkpoint_every == 0
        if not due or taken >= self.total_steps:
            return
        every_process = gather_object([self.harvest.harvested_shard_rows()])
        reader_state = {SHARD_ROWS: merged(every_process)}
        for stage, trainer in self.trainers.items():
            if trainer.steps_taken == taken:  # not one resumed from a later checkpoint, waiting for its step
                trainer.save_checkpoint(checkpoint_path(self.run, stage), reader_state)
        self.run.timer.save()


def merged(shard_rows: list[dict[int, int]]) -> dict[int, int]:
    """The row counts of the shards every process knows, as one {shard: rows}."""
    return {shard: rows for known in shard_rows for shard, rows in known.items()}


def checkpoint_path(run: RunContext, stage: str) -> Path:
    return run.paths.checkpoint(stage) / "checkpoint.pt"


def restored(trainer: AnyTrainer, checkpoint: Path) -> dict | None:
    """The reader state of the SAE's checkpoint, restored into ``trainer``; none yet: no shard known."""
    return trainer.load_checkpoint(checkpoint) if checkpoint.exists() else {SHARD_ROWS: {}}


def resume(run: RunContext, trainers: Mapping[str, AnyTrainer]) -> tuple[int, dict | None]:
    """Restore every SAE's checkpoint, if it has one; returns the micro-step the lockstep's batches
    resume at (the earliest of every process's SAEs: one whose checkpoint is later waits for its
    step) and the reader state of all of them (None: one was written without shard row counts)."""
    states = [restored(trainer, checkpoint_path(run, stage)) for stage, trainer in trainers.items()]
    mine = min((trainer.steps_taken for trainer in trainers.values()), default=None)
    every_process = gather_object([(mine, states)])
    start = min(step for step, _ in every_process if step is not None)
    every_state = [state for _, known in every_process for state in known]
    if None in every_state:
        return start, None
    return start, {SHARD_ROWS: merged([state[SHARD_ROWS] for state in every_state])}


def resumed_batches(harvest: Harvest, shape: BatchShape, seed: int, start_step: int, reader_state: dict | None) -> Iterator[torch.Tensor]:
    """The stage's batches from ``start_step`` on, sought with the checkpoint's shard row counts."""
    if reader_state is None:
        # A checkpoint written before shard row counts were recorded: replay the batches up to it.
        return islice(harvest.training_batches(shape, seed), start_step, None)
    harvest.remember_shard_rows(reader_state[SHARD_ROWS])
    return harvest.training_batches(shape, seed, start_step)


def stage_failure(stage: str, step: int, error: Exception, checkpoint: Path) -> Exception:
    """The error of a training stage stopped at ``step``, saying what is kept and what to do."""
    kept = (
        f"the last good checkpoint {checkpoint} is kept" if checkpoint.exists() else "no checkpoint of this stage was written yet"
    )
    fix = (
        " Lower --optimizer.lr or raise --optimizer.warmup_steps, then rerun with --run.resume true"
        if isinstance(error, NonFiniteTrainingError) else ""
    )
    return type(error)(f"stage {stage}, step {step}: {error} ({kept}; finished stages are kept).{fix}")


def train_stage(
    run: RunContext, stage: str, model: DMSAEModel, tokens: int, harvest: Harvest, data_stage: str | None = None,
    mode: StageMode = StageMode.DDP,
) -> Trained:  # fmt: skip
    """Train one SAE for ``tokens`` tokens on every process (DDP, or latent-parallel), resuming from
    the stage's checkpoint when there is one; its data order and calibration batches are
    ``data_stage``'s (default: its own). Returns it calibrated (:data:`Trained`), with the optimiser
    and everything Accelerate kept for it released."""
    return train_in_lockstep(run, {stage: model}, tokens, harvest, data_stage or stage, mode)[stage]


def train_in_lockstep(
    run: RunContext, models: Mapping[str, DMSAEModel], tokens: int, harvest: Harvest, data_stage: str, mode: StageMode
) -> dict[str, Trained]:
    """Train SAEs (by stage name) for ``tokens`` tokens each on the same batches, in the data order
    and with the calibration batches of ``data_stage``, each resumed from its checkpoint.

    ``mode``: SAE_PARALLEL, the SAEs this process was dealt, each trained on the whole global
    micro-batch (all-gathered) with no collective of its own; every process calls this, one dealt
    no SAE too (its lanes are part of every batch). LATENT_PARALLEL, the one SAE every process
    trains, each holding its latents, on the whole global micro-batch. DDP, the one SAE every
    process trains, each on its share of the global batch."""
    config = run.config
    steps, shape = steps_for(tokens, config), batch_shape(config)
    optimizer_steps = steps // config.run.gradient_accumulation_steps
    trainers = {stage: trainer_for(run, model, optimizer_steps, mode) for stage, model in models.items()}
    start, reader_state = resume(run, trainers)
    writes = mode is StageMode.SAE_PARALLEL or run.is_main  # who writes a stage's log (and its checkpoints: the trainer)
    callbacks = [bookkeeping(run, stage, trainer, steps, writes, position, mode) for position, (stage, trainer) in enumerate(trainers.items())]
    local = resumed_batches(harvest, shape, stage_seed(config, data_stage, "/data"), start, reader_state)
    whole_batches = mode is not StageMode.DDP
    # A streamed run's batches come from the base model: kept in the training thread, where its
    # memory is counted and no collective can interleave with the SAE step's. The all-gather of the
    # whole batches runs in the training thread too, on batches read ahead.
    depth = 0 if config.run.stream_activations else config.run.prefetch_batches
    try:
        with prefetched(local, depth, pin=run.accelerator.device.type == "cuda") as ahead:
            batches = harvest.all_gathered(ahead, shape) if whole_batches else ahead
            fit_in_lockstep(list(trainers.values()), batches, start, steps, callbacks, Checkpoints(run, trainers, steps, harvest))
    except (FloatingPointError, CorruptRunFileError) as error:
        if not trainers:  # a process dealt no SAE failed reading its lanes
            raise
        stage, trainer = failed(trainers)
        raise stage_failure(stage, trainer.steps_taken, error, checkpoint_path(run, stage)) from error
    finally:  # a stopped stage keeps the checkpoint being written
        for trainer in trainers.values():
            trainer.wait_for_checkpoint()
    calibration = islice(harvest.training_batches(shape, seed=stage_seed(config, data_stage, "/calibration")), calibration_batches(config))
    calibration = list(harvest.all_gathered(calibration, shape) if whole_batches else calibration)
    return {stage: calibrated(trainer, calibration, stage) for stage, trainer in trainers.items()}


def trainer_for(run: RunContext, model: DMSAEModel, optimizer_steps: int, mode: StageMode) -> AnyTrainer:
    """The trainer of one SAE of a stage in ``mode``."""
    if mode is StageMode.LATENT_PARALLEL:
        return LatentParallelTrainer(model, run.config.optimizer, optimizer_steps, run.accelerator)
    return SAETrainer(
        model, run.config.optimizer, optimizer_steps, run.accelerator, process_local=mode is StageMode.SAE_PARALLEL, background_checkpoints=True
    )


def bookkeeping(
    run: RunContext, stage: str, trainer: AnyTrainer, steps: int, writes: bool, position: int, mode: StageMode
) -> list[TrainingCallback]:
    """A stage's progress bar and training log (its lines of a resumed stage's log after its
    checkpoint dropped first: they are written again)."""
    if writes:
        truncate_log(run.paths.log(stage), trainer.optimizer_steps)
    if mode is StageMode.SAE_PARALLEL:  # every process shows its own SAEs' bars, on lines of their own
        bar = ProgressBar(stage, steps, trainer.steps_taken, True, position)
    else:
        bar = ProgressBar(stage, steps, trainer.steps_taken, run.accelerator.is_local_main_process)
    return [bar, TrainingLog(run, stage, steps, writes)]


def failed(trainers: Mapping[str, AnyTrainer]) -> tuple[str, AnyTrainer]:
    """The SAE whose step raised: the lockstep steps them in order, and a failed step leaves
    ``steps_taken`` where it was, so it is the first of those that are furthest behind."""
    behind = min(trainer.steps_taken for trainer in trainers.values())
    return next((stage, trainer) for stage, trainer in trainers.items() if trainer.steps_taken == behind)


def calibrated(trainer: AnyTrainer, calibration: list[torch.Tensor], stage: str) -> Trained:
    """The trained SAE with its inference threshold calibrated, and released (:data:`Trained`)."""
    trainer.calibrate_threshold(calibration)
    drift = {"decoder_cosine_to_init": trainer.decoder_cosine_to_init()}
    # Never evaluate, save or push a NaN SAE (the step guard keeps training from making one).
    return check_finite_weights(trainer.release(), stage), drift


@torch.no_grad()
def shared_from(owner: int, trained: Trained) -> Trained:
    """The SAE process ``owner`` trained, on every process (evaluation and saving are collective):
    its tensors broadcast into ``trained``'s model, which elsewhere is any SAE of the same
    configuration, and its threshold and drift with them."""
    model, drift = trained
    for tensor in model.state_dict().values():
        dist.broadcast(tensor, src=owner)
    settings = [model.config.threshold, drift]
    dist.broadcast_object_list(settings, src=owner)
    model.config.threshold = settings[0]
    return model, settings[1]
