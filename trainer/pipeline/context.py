"""What every stage of a run shares: the configuration, the processes (Accelerate), the run
folder, the stage timer and the publisher, and the rules for who writes: files are written by the
main process only, with every process waiting for it."""

from __future__ import annotations

import logging
import shutil
from typing import Callable, NamedTuple, Protocol, Sequence

from accelerate import Accelerator

from trainer.config import DistillConfig
from trainer.errors import HubPushError
from trainer.run.layout import RunDirectory
from trainer.run.timings import StageTimer

logger = logging.getLogger(__name__)


class PushReport(Protocol):
    pushed: Sequence[str]
    skipped: Sequence[str]


class Publisher(Protocol):
    """What the run tells the code that publishes it (``hub_cards.publish.HubPublisher``, handed in
    by ``distill.py``), as the trainer of one SAE is handed its callbacks: the pipeline never
    imports the Hub code, which reads the finished run folder."""

    def build_folders(self) -> None:
        """Write the run's Hub-ready folders (with their cards) into the run folder."""

    def push_cycle(self, cycle: int) -> PushReport:
        """Push one finished cycle (called only when the run is pushed)."""

    def push_run(self) -> PushReport:
        """Push whatever of the run is not on the Hub yet (called only when the run is pushed)."""


class RunContext(NamedTuple):
    config: DistillConfig
    accelerator: Accelerator
    paths: RunDirectory
    timer: StageTimer
    publisher: Publisher | None = None
    """None: the run builds no Hub folders and pushes nothing."""

    @classmethod
    def create(cls, config: DistillConfig, accelerator: Accelerator, publisher: Publisher | None) -> RunContext:
        paths = RunDirectory(config.run.output_dir)
        return cls(config, accelerator, paths, StageTimer(paths.timings, config.run.resume, accelerator.is_main_process), publisher)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def on_main(self, action: Callable[[], object]) -> None:
        """Run an action on the main process only (a file written, the report, a push), the others
        waiting for it in a barrier: one that ``run.process_group_timeout_s`` governs."""
        if self.is_main:
            action()
        self.accelerator.wait_for_everyone()

    def finish_stage(self, stage: str) -> None:
        """A stage's artifacts are saved: its training checkpoint is no longer needed."""
        self.on_main(lambda: shutil.rmtree(self.paths.checkpoint(stage), ignore_errors=True))

    def publish(self, push: Callable[[Publisher], PushReport]) -> None:
        """Push to the Hub when asked, from the main process, the others waiting in a barrier (not
        in whatever collective comes next). Nothing that goes wrong on the Hub stops the run: a Hub
        failure is logged with how to retry (--push-only), any other error with its traceback,
        and the local artifacts stay."""
        if self.config.hub.repo_id and self.publisher is not None:
            self.on_main(lambda: self._push(push))

    def _push(self, push: Callable[[Publisher], PushReport]) -> None:
        try:
            report = push(self.publisher)
            logger.info("hub: pushed %s, already there %s", report.pushed, report.skipped)
        except HubPushError as error:
            logger.error("%s", error)
        except Exception:  # a bug in publishing must not cost days of training: the artifacts are local
            logger.exception("hub: the push failed; the run goes on. Retry with --push-only %s", self.paths.root)
