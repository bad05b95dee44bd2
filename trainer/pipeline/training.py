"""Training one SAE as a stage of the run: the loop (``trainer.sae.training.fit``) with the run's
bookkeeping as callbacks: a progress bar, the training log, checkpoints every
``run.checkpoint_every`` steps (with the timings so far), and a resume from the last checkpoint.
Then the inference threshold is calibrated."""

from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Iterator

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from modeling_dmsae import DMSAEModel
from trainer.errors import CorruptRunFileError
from trainer.harvest.harvested import Harvest
from trainer.harvest.prefetch import prefetched
from trainer.pipeline.context import RunContext
from trainer.run.logs import append_record, truncate_log
from trainer.run.stages import BatchShape, batch_shape, calibration_batches, stage_seed, steps_for
from trainer.sae.training import NonFiniteTrainingError, SAETrainer, StepStats, TrainingCallback, check_finite_weights, fit

SHARD_ROWS = "shard_rows"  # the checkpoint's reader state: {shard: rows}


class ProgressBar(TrainingCallback):
    def __init__(self, stage: str, total_steps: int, initial: int, enabled: bool):
        self.bar = tqdm(total=total_steps, initial=initial, desc=stage, disable=not enabled)

    def on_step_end(self, trainer: SAETrainer, step: int, stats: StepStats) -> None:
        self.bar.update()

    def on_train_end(self, trainer: SAETrainer) -> None:
        self.bar.close()


class TrainingLog(TrainingCallback):
    """Every ``run.log_every`` optimisation steps and after the last: the statistics of the step's
    last micro-batch and the decoder's median cosine to its initialisation to the trackers
    (tensorboard, ...) and, from the main process, to ``logs/STAGE.jsonl``, numbered by
    optimisation step."""

    def __init__(self, run: RunContext, stage: str, total_steps: int):
        self.run, self.stage, self.total_steps = run, stage, total_steps
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
        if self.run.is_main:
            append_record(self.path, record)


class Checkpoints(TrainingCallback):
    """Every ``run.checkpoint_every`` optimisation steps (but the last: the stage's folder follows):
    everything a resumed stage needs to continue bit for bit, and the timings up to here. Beside the
    SAE's state go the row counts of the shards every process has read, with which the resumed
    stage seeks to its next batch instead of reading (streamed: harvesting) the batches before it."""

    def __init__(self, run: RunContext, path: Path, total_steps: int, harvest: Harvest):
        self.run, self.path, self.total_steps, self.harvest = run, path, total_steps, harvest

    def on_step_end(self, trainer: SAETrainer, step: int, stats: StepStats) -> None:
        due = trainer.at_step_boundary and trainer.optimizer_steps % self.run.config.run.checkpoint_every == 0
        if due and step + 1 < self.total_steps:
            every_process = gather_object([self.harvest.harvested_shard_rows()])
            trainer.save_checkpoint(self.path, {SHARD_ROWS: {shard: rows for known in every_process for shard, rows in known.items()}})
            self.run.timer.save()


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


def train_stage(run: RunContext, stage: str, model: DMSAEModel, tokens: int, harvest: Harvest) -> tuple[DMSAEModel, dict[str, float]]:
    """Train one SAE for ``tokens`` tokens, resuming from the stage's checkpoint when there is one;
    returns it calibrated, with what training alone can tell (how far its decoder moved from the
    start), and with the optimiser and everything Accelerate kept for it released."""
    config = run.config
    steps, shape = steps_for(tokens, config), batch_shape(config)
    trainer = SAETrainer(model, config.optimizer, steps // config.run.gradient_accumulation_steps, run.accelerator)
    checkpoint = run.paths.checkpoint(stage) / "checkpoint.pt"
    reader_state = trainer.load_checkpoint(checkpoint) if checkpoint.exists() else {SHARD_ROWS: {}}
    if run.is_main:
        truncate_log(run.paths.log(stage), trainer.optimizer_steps)
    batches = resumed_batches(harvest, shape, stage_seed(config, stage, "/data"), trainer.steps_taken, reader_state)
    callbacks = [
        ProgressBar(stage, steps, trainer.steps_taken, run.accelerator.is_local_main_process),
        TrainingLog(run, stage, steps),
        Checkpoints(run, checkpoint, steps, harvest),
    ]
    # A streamed run's batches come from the base model: kept in the training thread, where its
    # memory is counted and no collective can interleave with the SAE step's.
    depth = 0 if config.run.stream_activations else config.run.prefetch_batches
    try:
        with prefetched(batches, depth, pin=run.accelerator.device.type == "cuda") as ahead:
            fit(trainer, ahead, steps, callbacks)
    except (FloatingPointError, CorruptRunFileError) as error:
        raise stage_failure(stage, trainer.steps_taken, error, checkpoint) from error
    calibration = islice(harvest.training_batches(shape, seed=stage_seed(config, stage, "/calibration")), calibration_batches(config))
    # Never evaluate, save or push a NaN SAE (the step guard keeps training from making one).
    check_finite_weights(trainer.calibrate_threshold(calibration), stage)
    drift = {"decoder_cosine_to_init": trainer.decoder_cosine_to_init()}
    return trainer.release(), drift
