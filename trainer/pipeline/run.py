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

from trainer.config import DistillConfig
from trainer.harvest.harvested import Harvest, prepare_harvest
from trainer.harvest.hub_access import resolve_core
from trainer.harvest.text_corpus import node_index
from trainer.pipeline.context import Publisher, RunContext
from trainer.pipeline.cores import load_core
from trainer.pipeline.cycles import distill
from trainer.pipeline.transfer import transfer
from trainer.report.summary import write_report
from trainer.run.files import write_json
from trainer.run.kinds import Core
from trainer.run.resume import start_run


class DistillationRun:
    def __init__(self, config: DistillConfig, accelerator: Accelerator, publisher: Publisher | None = None):
        self.context = RunContext.create(config, accelerator, publisher)

    def run(self) -> None:
        """The run's table of contents."""
        harvest = self.harvest()
        core = self.distilled_core(harvest)
        transfer(self.context, core, harvest)
        self.report()
        self.publish()

    def harvest(self) -> Harvest:
        """Load the base model and harvest (or reopen) the activation caches, the attribution sample
        and the held-out data; refuses a resume whose changed settings finished work depends on."""
        run = self.context
        harvested_before = run.config.run.resume and run.paths.harvest_complete(run.config.harvest.node_cache_dir(node_index()))
        start_run(run.paths, run.config, write=run.is_main)  # every process refuses a bad resume
        run.accelerator.wait_for_everyone()
        # On a resume after the harvest, loading the model and reopening the caches is the restart's overhead.
        with run.timer.timed("restart overhead" if harvested_before else "harvest"):
            harvest = prepare_harvest(run.config, run.accelerator, run.paths, after_shard=run.timer.save)
        run.on_main(lambda: write_json(run.paths.harvest, harvest.positions))
        return harvest

    def distilled_core(self, harvest: Harvest) -> Core:
        """C*: distilled by the cycles, or a saved one (--transfer.core)."""
        if self.context.config.transfer.core:
            return load_core(resolve_core(self.context.config.transfer.core))
        return distill(self.context, harvest)

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
        if run.publisher is not None:
            run.on_main(run.publisher.build_folders)
        run.publish(lambda publisher: publisher.push_run())
