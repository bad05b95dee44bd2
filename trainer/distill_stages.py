"""The stages of a distillation run (Algorithms 1-3), each resumable and atomic.

``DistillationRun.run()`` walks: harvest -> cycle 0 -> cycles 1..T -> C* -> transfer ->
report. Every finished stage is a folder in the run directory; on ``--run.resume true`` a
finished stage is loaded, never recomputed, and an interrupted training stage continues from
its last checkpoint (model, optimiser, schedule, RNG and data position).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import zlib
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Iterator, NamedTuple

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from hub_cards.publish import CORE_FILES, HubPushError, build_hub_folders, push_cycle, push_run, resolve_core
from modeling_dmsae import DMSAEConfig, DMSAEModel
from modeling_dmsae.convert_checkpoints import from_checkpoint
from trainer.distill_config import DistillConfig
from trainer.distill_plan import cycle0_sae_config, final_runs, steps_for
from trainer.run_data import RunData, prepare_run_data
from trainer.run_directory import CorruptRunFileError, RunDirectory, atomic_folder, read_json, require_files, write_json
from trainer.run_report import write_report
from trainer.sae_metrics import downstream_loss_metrics, reconstruction_metrics
from trainer.sae_training import SAETrainer, check_finite_weights, stage_failure
from trainer.selection import CoreSelection, distilled_core, select_core


logger = logging.getLogger(__name__)


class Core(NamedTuple):
    """A core to freeze into the next SAE: encoder directions [c, d] and their lineage."""

    directions: torch.Tensor
    lineage: list[list[int]]


def save_core(folder: Path, cycle: int, selection: CoreSelection, model: DMSAEModel, config: DistillConfig) -> None:
    """core.json (indices, scores, lineage, coverage) and core_directions.safetensors."""
    lineage = model.lineage()[selection.selected].tolist()
    write_json(
        folder / "core.json",
        {
            "cycle": cycle,
            "selected": selection.selected,
            "scores": selection.scores,
            "lineage": lineage,
            "coverage_curve": selection.coverage_curve.tolist(),
            "candidate_pool_size": len(selection.pool_scores),
            "tau": config.cycles.tau,
            "q": config.cycles.quantile,
        },
    )
    directions = model.encoder_weight.detach()[selection.selected].float().cpu().contiguous()
    save_file({"core_directions": directions}, str(folder / "core_directions.safetensors"))


CYCLE_FILES = ("config.json", "model.safetensors", "metrics.json", *CORE_FILES)


def load_core(folder: Path) -> Core:
    """A core saved by :func:`save_core` (a cycle folder or distilled_core/)."""
    require_files(folder, CORE_FILES, f"delete {folder} and rerun with --run.resume true to compute it again")
    directions = load_file(str(folder / "core_directions.safetensors"))["core_directions"]
    if not torch.isfinite(directions).all():
        raise CorruptRunFileError(f"{folder / 'core_directions.safetensors'} holds NaN/Inf: delete {folder} and compute it again")
    return Core(directions, read_json(folder / "core.json")["lineage"])


def load_finished_cycle(folder: Path, t: int) -> DMSAEModel:
    """The SAE of a cycle finished before a restart, or what to delete when its folder is damaged."""
    fix = f"delete {folder} and rerun with --run.resume true: cycle {t} is trained again"
    require_files(folder, CYCLE_FILES, fix)
    try:
        return check_finite_weights(DMSAEModel.from_pretrained(folder), str(folder))
    except Exception as error:
        raise CorruptRunFileError(f"{folder} is unreadable ({type(error).__name__}: {error}): {fix}") from None


def read_cycle0_checkpoint(path: str) -> DMSAEModel:
    """A published SAE as cycle 0: a DMSAE folder, or whatever convert_checkpoints imports."""
    is_dmsae = (Path(path) / "config.json").is_file() and read_json(Path(path) / "config.json").get("model_type") == "dmsae"
    return check_finite_weights(DMSAEModel.from_pretrained(path) if is_dmsae else from_checkpoint(path), path)


def check_compatible(sae: DMSAEConfig, d_in: int, hook_layer: int, config: DistillConfig) -> None:
    """Refuse, before any training, a cycle-0 checkpoint that reads other activations."""
    problems = []
    if sae.d_in != d_in:
        problems.append(f"its width d = {sae.d_in}, the base model's hidden size is {d_in}")
    if sae.hook_layer != hook_layer:
        problems.append(f"it reads layer {sae.hook_layer} ({sae.hook_name}), the run hooks {config.model.hook_module}")
    ours, theirs = config.model.model_id.lower().split("/")[-1], (sae.base_model_id or "").lower().split("/")[-1]
    if theirs and ours != theirs:
        problems.append(f"it was trained on {sae.base_model_id}, the run reads {config.model.model_id}")
    if problems:
        raise ValueError(
            f"cycles.cycle0_checkpoint {config.cycles.cycle0_checkpoint} does not match the run: "
            + "; ".join(problems) + ". Point --model.model / --model.hook_module at what it was trained on, or drop the checkpoint"
        )


class DistillationRun:
    def __init__(self, config: DistillConfig, accelerator: Accelerator):
        self.config = config
        self.accelerator = accelerator
        self.paths = RunDirectory(config.run.output_dir)
        # A resume adds to the timings of the processes before it; a killed stage's time up to its
        # last checkpoint was saved with that checkpoint, so every kept piece of work counts once.
        self.timings: dict[str, float] = self.paths.previous_timings() if config.run.resume else {}
        self._running: tuple[str, float] | None = None

    @contextmanager
    def _timed(self, kind: str) -> Iterator[None]:
        """Accumulate wall time per kind of work (harvest, training, attribution, evaluation) into
        timings.json, which the whole-run benchmark reads."""
        self._running = (kind, time.perf_counter())
        yield
        self.timings = self._timings_now()
        self._running = None
        self._write_timings()

    def _timings_now(self) -> dict[str, float]:
        timings = dict(self.timings)
        if self._running is not None:
            kind, start = self._running
            timings[kind] = timings.get(kind, 0.0) + time.perf_counter() - start
        return timings

    def _write_timings(self) -> None:
        if self.accelerator.is_main_process:
            write_json(self.paths.root / "timings.json", self._timings_now())

    # ---- helpers ---------------------------------------------------------------------------

    def _on_main(self, action) -> None:
        """Run a file-writing action on the main process only, then synchronise."""
        if self.accelerator.is_main_process:
            action()
        self.accelerator.wait_for_everyone()

    def _finish_stage(self, stage: str) -> None:
        """A stage's artifacts are saved: its training checkpoint is no longer needed."""
        self._on_main(lambda: shutil.rmtree(self.paths.checkpoint(stage), ignore_errors=True))

    def _publish(self, push) -> None:
        """Push to the Hub when asked. A Hub failure never stops the run: the error (which says
        how to retry with --push-only) is logged and the local artifacts stay."""
        if not self.config.hub.repo_id or not self.accelerator.is_main_process:
            return
        try:
            report = push()
            logger.info("hub: pushed %s, already there %s", report.pushed, report.skipped)
        except HubPushError as error:
            logger.error("%s", error)

    def _log_path(self, stage: str) -> Path:
        return self.paths.logs / f"{stage}.jsonl"

    # ---- training ----------------------------------------------------------------------------

    def train(self, stage: str, model: DMSAEModel, tokens: int, data: RunData) -> tuple[DMSAEModel, dict[str, float]]:
        """Train one SAE for ``tokens`` tokens with checkpoints every ``checkpoint_every`` steps;
        returns it with what training alone can tell (how far its decoder moved from the start)."""
        config = self.config
        steps = steps_for(tokens, config)
        trainer = SAETrainer(model, config.optimizer, steps // config.run.gradient_accumulation_steps, self.accelerator)
        checkpoint = self.paths.checkpoint(stage) / "checkpoint.pt"
        if checkpoint.exists():
            trainer.load_checkpoint(checkpoint)
        log_path = self._log_path(stage)
        if self.accelerator.is_main_process:
            self._truncate_log(log_path, trainer.steps_taken)
        batches = data.training_batches(config.cycles.batch_size, seed=zlib.crc32(f"{config.run.seed}/{stage}".encode()), start_step=trainer.steps_taken)
        progress = tqdm(
            total=steps, initial=trainer.steps_taken, desc=stage, disable=not self.accelerator.is_local_main_process
        )
        for step in range(trainer.steps_taken, steps):
            try:
                stats = trainer.step(next(batches))
            except (FloatingPointError, CorruptRunFileError) as error:
                raise stage_failure(stage, step, error, checkpoint) from error
            progress.update()
            if step % config.run.log_every == 0 or step == steps - 1:
                record = {"step": step, **{name: float(value) for name, value in stats._asdict().items()}}
                self.accelerator.log({f"{stage}/{name}": value for name, value in record.items() if name != "step"}, step=step)
                if self.accelerator.is_main_process:
                    with log_path.open("a") as log:
                        log.write(json.dumps(record) + "\n")
            if (step + 1) % config.run.checkpoint_every == 0 and step + 1 < steps:
                trainer.save_checkpoint(checkpoint)
                self._write_timings()
        progress.close()
        calibration = islice(
            data.training_batches(config.cycles.batch_size, seed=zlib.crc32(f"{config.run.seed}/{stage}/calibration".encode())),
            max(1, config.optimizer.calibration_tokens // (config.cycles.batch_size * self.accelerator.num_processes)),
        )
        # Never evaluate, save or push a NaN SAE (the step guard keeps training from making one).
        trained = check_finite_weights(trainer.calibrate_threshold(calibration), stage)
        return trained, {"decoder_cosine_to_init": trainer.decoder_cosine_to_init()}

    @staticmethod
    def _truncate_log(path: Path, steps_taken: int) -> None:
        """Drop log records a resumed stage will write again."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            return
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] < steps_taken]
        path.write_text("".join(line + "\n" for line in kept))

    # ---- evaluation --------------------------------------------------------------------------

    def evaluate(self, sae: DMSAEModel, data: RunData, name: str) -> dict[str, float]:
        """Held-out metrics of one SAE (inference mode)."""
        sae.eval()
        batches = data.held_out_batches(self.config.cycles.batch_size)
        metrics = reconstruction_metrics(sae, tqdm(batches, desc=f"evaluate {name}", total=len(data.held_out) // self.config.cycles.batch_size + 1))
        metrics.update(
            downstream_loss_metrics(
                sae, data.base_model, data.hook_module, data.ce_input_ids, data.ce_loss_mask, data.ce_clean, data.ce_zero_ablated
            )
        )
        sae.train()
        return metrics

    def _save_stage(self, folder: Path, sae: DMSAEModel, metrics: dict, extra=None) -> None:
        """Write an SAE folder atomically: save_pretrained, metrics.json and any extra files."""

        def write() -> None:
            with atomic_folder(folder) as partial:
                sae.save_pretrained(partial)
                write_json(partial / "metrics.json", metrics)
                if extra is not None:
                    extra(partial)

        self._on_main(write)

    # ---- Algorithm 1 ------------------------------------------------------------------------------

    def _select(self, sae: DMSAEModel, data: RunData) -> CoreSelection:
        """Algorithm 2 on the main process, shared with every process (identical cores everywhere)."""
        result = [None]
        if self.accelerator.is_main_process:
            c = self.config.cycles
            result[0] = select_core(sae, data.attribution_x, data.attribution_g, c.quantile, c.tau, c.batch_size)
        return broadcast_object_list(result)[0]

    def _cycle_zero(self, data: RunData) -> tuple[DMSAEModel, bool]:
        """(cycle-0 SAE, whether it still needs training)."""
        checkpoint = self.config.cycles.cycle0_checkpoint
        if checkpoint:
            model = read_cycle0_checkpoint(checkpoint)
            check_compatible(model.config, data.d_in, data.hook_layer, self.config)
            return model, False
        sae_config = cycle0_sae_config(self.config, data.d_in, data.hook_layer)
        sae_config.normalization_factor = data.normalization_factor
        return DMSAEModel(sae_config), True

    def distill(self, data: RunData) -> Core:
        """Cycles 0..T, then C* = C(T) ∩ C(T-1)."""
        cycles = self.config.cycles
        previous: tuple[DMSAEModel, list[int]] | None = None
        for t in range(cycles.num_cycles + 1):
            folder = self.paths.cycle(t)
            if folder.exists():  # finished before a restart
                model = load_finished_cycle(folder, t).to(self.accelerator.device)
                self._finish_stage(folder.name)  # a kill may have landed before its checkpoint was removed
                selected = read_json(folder / "core.json")["selected"]
                previous = (model, selected)
                continue
            set_seed(self.config.run.seed + t)
            if previous is None:
                model, needs_training = self._cycle_zero(data)
            else:
                model = previous[0].next_cycle(previous[1], normalization_factor=data.normalization_factor)
                needs_training = True
            model = model.to(self.accelerator.device)
            training_metrics = {}
            if needs_training:
                with self._timed("cycle training"):
                    model, training_metrics = self.train(folder.name, model, cycles.tokens_per_cycle, data)
            with self._timed("attribution"):
                selection = self._select(model, data)
            with self._timed("evaluation"):
                metrics = self.evaluate(model, data, folder.name) if self.accelerator.is_main_process else {}
            c = model.config.core_size
            metrics.update(
                core_size=c,
                k_noncore=model.config.k_noncore,
                selected_core_size=len(selection.selected),
                carry_over=sum(j < c for j in selection.selected) / c if c else float("nan"),
                **training_metrics,
            )
            self._save_stage(folder, model, metrics, lambda partial, s=selection, m=model, t=t: save_core(partial, t, s, m, self.config))
            self._finish_stage(folder.name)
            self._publish(lambda t=t: push_cycle(self.paths.root, t, self.config.hub))
            previous = (model, selection.selected)
        return self._distilled_core(*previous)

    def _distilled_core(self, final_model: DMSAEModel, final_selected: list[int]) -> Core:
        folder = self.paths.distilled_core
        if not folder.exists():
            core_json = read_json(self.paths.cycle(self.config.cycles.num_cycles) / "core.json")
            score_of = dict(zip(core_json["selected"], core_json["scores"]))
            indices = distilled_core(final_selected, final_model.config.core_size)
            if not indices:
                raise RuntimeError(
                    "the distilled core C* = C(T) ∩ C(T-1) is empty: cycle T re-selected none of its core. "
                    "Train longer per cycle (cycles.tokens_per_cycle), raise cycles.tau, or use more cycles"
                )
            selection = CoreSelection(indices, [score_of[j] for j in indices], torch.tensor([]), torch.tensor([]))

            def write() -> None:
                with atomic_folder(folder) as partial:
                    save_core(partial, self.config.cycles.num_cycles, selection, final_model, self.config)

            self._on_main(write)
        return load_core(folder)

    # ---- Algorithm 3 ------------------------------------------------------------------------------

    def transfer_stage(self, core: Core, data: RunData) -> None:
        """Fresh DMSAEs from the distilled core (Algorithm 3) and the comparison SAEs: the
        random-core control, the sparse-core variant and the plain Matryoshka baselines."""
        base = cycle0_sae_config(self.config, data.d_in, data.hook_layer)
        cycle = self.config.cycles.num_cycles + 1
        for index, run in enumerate(final_runs(self.config)):
            folder = self.paths.transfer(run.name)
            if folder.exists():
                self._finish_stage(run.stage)  # a kill may have landed before its checkpoint was removed
                continue
            set_seed(self.config.run.seed + 1000 + index)
            lineage = {"distilled": core.lineage, "random": [[cycle, j] for j in range(len(core.lineage))], "none": []}[run.core]
            sae_config = base.with_core(
                lineage, cycle=cycle, k=run.k, variant=run.variant, normalization_factor=data.normalization_factor
            )
            # The random control keeps the random unit directions DMSAEModel initialises its core with.
            model = DMSAEModel.from_core(sae_config, core.directions) if run.core == "distilled" else DMSAEModel(sae_config)
            with self._timed("transfer training"):
                model, training_metrics = self.train(run.stage, model.to(self.accelerator.device), self.config.transfer.tokens, data)
            with self._timed("evaluation"):
                metrics = self.evaluate(model, data, run.name) if self.accelerator.is_main_process else {}
            metrics.update(
                core_size=sae_config.core_size, k=run.k, k_noncore=sae_config.k_noncore, core=run.core, variant=run.variant, **training_metrics
            )
            self._save_stage(folder, model, metrics)
            self._finish_stage(run.stage)

    # ---- the whole run --------------------------------------------------------------------------

    def run(self) -> None:
        harvested_before = self.config.run.resume and self.paths.harvest_complete(self.config.harvest.cache_dir)
        self.paths.start(self.config, write=self.accelerator.is_main_process)  # every process refuses a bad resume
        self.accelerator.wait_for_everyone()
        # On a resume after the harvest, loading the model and reopening the caches is the restart's overhead.
        with self._timed("restart overhead" if harvested_before else "harvest"):
            data = prepare_run_data(self.config, self.accelerator, self.paths, after_shard=self._write_timings)
        self._on_main(lambda: write_json(self.paths.root / "harvest.json", data.positions))
        if self.config.transfer.core:
            core = load_core(resolve_core(self.config.transfer.core))
        else:
            core = self.distill(data)
        self.transfer_stage(core, data)
        with self._timed("report"):
            summary = [None]
            self._on_main(lambda: summary.__setitem__(0, write_report(self.config, self.paths)))
        self.accelerator.print(summary[0])
        self._on_main(lambda: build_hub_folders(self.paths.root, self.config.hub))
        self._publish(lambda: push_run(self.paths.root, self.config.hub))
