"""Wall time per kind of work (harvest, cycle training, attribution, evaluation, transfer
training, report), accumulated into the run's ``timings.json``, which the whole-run benchmark and
the cost plan's check read.

A resume adds to the timings of the processes before it; a killed stage's time up to its last
checkpoint was saved with that checkpoint (:meth:`StageTimer.save`), so every kept piece of work
counts once.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from trainer.errors import CorruptRunFileError
from trainer.run.files import read_json, write_json


def previous_timings(path: Path) -> dict[str, float]:
    """The timings of the processes before a resume (empty for a new run)."""
    try:
        return read_json(path)
    except CorruptRunFileError:  # none yet, or cut short: the timings restart, the run does not
        return {}


class StageTimer:
    """Accumulates wall time per kind of work; only a ``write`` process writes the file."""

    def __init__(self, path: Path, resume: bool, write: bool):
        self.path = path
        self.write = write
        self.totals: dict[str, float] = previous_timings(path) if resume else {}
        self._running: tuple[str, float] | None = None

    @contextmanager
    def timed(self, kind: str) -> Iterator[None]:
        self._running = (kind, time.perf_counter())
        yield
        self.totals = self.now()
        self._running = None
        self.save()

    def now(self) -> dict[str, float]:
        """The totals, the work under way counted up to this moment."""
        totals = dict(self.totals)
        if self._running is not None:
            kind, start = self._running
            totals[kind] = totals.get(kind, 0.0) + time.perf_counter() - start
        return totals

    def save(self) -> None:
        """Write the totals so far (at every checkpoint and written cache shard, and after each stage)."""
        if self.write:
            write_json(self.path, self.now())
