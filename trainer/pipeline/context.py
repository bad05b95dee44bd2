"""What every stage of a run shares: the configuration, the processes (Accelerate), the run
folder and the stage timer, and the rules for who writes: files are written by the main process
only, with every process waiting for it."""

from __future__ import annotations

import logging
import shutil
from typing import Callable, NamedTuple

from accelerate import Accelerator

from trainer.config import DistillConfig
from trainer.errors import HubPushError
from trainer.run.layout import RunDirectory
from trainer.run.timings import StageTimer

logger = logging.getLogger(__name__)


class RunContext(NamedTuple):
    config: DistillConfig
    accelerator: Accelerator
    paths: RunDirectory
    timer: StageTimer

    @classmethod
    def create(cls, config: DistillConfig, accelerator: Accelerator) -> RunContext:
        paths = RunDirectory(config.run.output_dir)
        return cls(config, accelerator, paths, StageTimer(paths.timings, config.run.resume, accelerator.is_main_process))

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def on_main(self, action: Callable[[], object]) -> None:
        """Run a file-writing action on the main process only, then synchronise."""
        if self.is_main:
            action()
        self.accelerator.wait_for_everyone()

    def finish_stage(self, stage: str) -> None:
        """A stage's artifacts are saved: its training checkpoint is no longer needed."""
        self.on_main(lambda: shutil.rmtree(self.paths.checkpoint(stage), ignore_errors=True))

    def publish(self, push: Callable) -> None:
        """Push to the Hub when asked. Nothing that goes wrong on the Hub stops the run: a Hub
        failure is logged with how to retry (--push-only), any other error with its traceback,
        and the local artifacts stay."""
        if not self.config.hub.repo_id or not self.is_main:
            return
        try:
            report = push()
            logger.info("hub: pushed %s, already there %s", report.pushed, report.skipped)
        except HubPushError as error:
            logger.error("%s", error)
        except Exception:  # a bug in publishing must not cost days of training: the artifacts are local
            logger.exception("hub: the push failed; the run goes on. Retry with --push-only %s", self.paths.root)
