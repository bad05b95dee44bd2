"""A distillation run, end to end (paper, Algorithms 1-3): the only place that knows the order
of the stages, which process does what, and when the Hub is told.

    harvest -> cycles (Algorithm 1, with selection: Algorithm 2) -> distilled core C*
            -> transfer (Algorithm 3) -> report -> publish

Every finished stage is a folder in the run directory; on ``--run.resume true`` a finished stage
is loaded, never recomputed, and an interrupted training stage continues from its last checkpoint
(model, optimiser, schedule, RNG and data position).
"""

from __future__ import annotations

from accelerate import Accelerator

from hub_cards.publish import build_hub_folders, push_run, resolve_core
from trainer.config import DistillConfig
from trainer.harvest.run_data import RunData, prepare_run_data
from trainer.pipeline.context import RunContext
from trainer.pipeline.cores import Core, load_core
from trainer.pipeline.cycles import distill
from trainer.pipeline.transfer import transfer
from trainer.report.summary import write_report
from trainer.run.files import write_json
from trainer.run.resume import start_run


class DistillationRun:
    def __init__(self, config: DistillConfig, accelerator: Accelerator):
        self.context = RunContext.create(config, accelerator)

    def run(self) -> None:
        """The run's table of contents."""
        data = self.harvest()
        core = self.distilled_core(data)
        transfer(self.context, core, data)
        self.report()
        self.publish()

    def harvest(self) -> RunData:
        """Load the base model and harvest (or reopen) the activation caches, the attribution sample
        and the held-out data; refuses a resume whose changed settings finished work depends on."""
        run = self.context
        harvested_before = run.config.run.resume and run.paths.harvest_complete(run.config.harvest.cache_dir)
        start_run(run.paths, run.config, write=run.is_main)  # every process refuses a bad resume
        run.accelerator.wait_for_everyone()
        # On a resume after the harvest, loading the model and reopening the caches is the restart's overhead.
        with run.timer.timed("restart overhead" if harvested_before else "harvest"):
            data = prepare_run_data(run.config, run.accelerator, run.paths, after_shard=run.timer.save)
        run.on_main(lambda: write_json(run.paths.harvest, data.positions))
        return data

    def distilled_core(self, data: RunData) -> Core:
        """C*: distilled by the cycles, or a saved one (--transfer.core)."""
        if self.context.config.transfer.core:
            return load_core(resolve_core(self.context.config.transfer.core))
        return distill(self.context, data)

    def report(self) -> None:
        """metrics.json, the figures and SUMMARY.md, and the summary on the terminal."""
        run = self.context
        with run.timer.timed("report"):
            summary = [None]
            run.on_main(lambda: summary.__setitem__(0, write_report(run.config, run.paths)))
        run.accelerator.print(summary[0])

    def publish(self) -> None:
        """The Hub-ready folders, and the push when --push-to-hub names a repo."""
        run = self.context
        run.on_main(lambda: build_hub_folders(run.paths.root, run.config.hub))
        run.publish(lambda: push_run(run.paths.root, run.config.hub))
