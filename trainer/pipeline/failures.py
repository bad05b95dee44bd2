"""Processes fail together, and each says why.

Under ``accelerate launch`` an exception on one process leaves the others waiting inside a
collective: they die later, killed by the launcher or by gloo/NCCL, with a traceback about a
closed connection that says nothing of the cause. Work the main process does alone (selection,
evaluation, saving, the report) makes this the common case.

So every process of a run posts a failure to the run folder, ``logs/failures/<launch>/``, before
it exits, and watches that folder from a background thread: a peer's failure makes it print that
one line (``process 0 stopped the run: ...``) and exit at once, whatever it was waiting for. The
failing process waits (at most ``ACK_TIMEOUT_S``) for every peer to acknowledge before it exits, so
the launcher's teardown does not kill a peer before it has said why. One process runs nothing of
this. The board is in the run folder, which every node must share (``trainer.run.layout`` says what
must be shared and what may be node-local: the cache may); a run folder that a process cannot see
the main process's launch folder in is refused at the start, saying so, rather than leaving each
node's failures unseen by the others.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from trainer.errors import ConfigError, UserError
from trainer.run.files import write_text
from trainer.run.layout import RunDirectory

POLL_S = 0.2
ACK_TIMEOUT_S = 10.0
# torchrun copies each worker's output to the launcher's with a lag: a process that printed and
# exited at once, or was killed at once by the launcher, could lose its last line.
EXIT_GRACE_S = 1.5
PROGRAM = "distill.py"


def describe(error: BaseException) -> str:
    """The one line a failure is known by on every process."""
    if isinstance(error, UserError):
        return error.one_line()
    return f"{type(error).__name__}: {' '.join(str(error).split())} (an internal error: its traceback is on that process)"


class FailureBoard:
    """One launch's failure folder: ``failed-<rank>`` and ``ack-<rank>-of-<failed rank>`` files."""

    def __init__(self, folder: Path, rank: int, world_size: int):
        self.folder, self.rank, self.world_size = folder, rank, world_size
        self._stop = threading.Event()

    def post(self, error: BaseException) -> None:
        """Say why this process stops, then give every peer the time to read it."""
        write_text(self.folder / f"failed-{self.rank}", describe(error))
        deadline = time.monotonic() + ACK_TIMEOUT_S
        while time.monotonic() < deadline and not self._all_acknowledged():
            time.sleep(POLL_S)
        time.sleep(EXIT_GRACE_S)  # the peers' lines reach the launcher before this process ends the launch

    def _all_acknowledged(self) -> bool:
        return all(
            (self.folder / f"ack-{peer}-of-{self.rank}").exists() or (self.folder / f"failed-{peer}").exists()
            for peer in range(self.world_size)
            if peer != self.rank
        )

    def watch(self) -> None:
        """Background thread: on a peer's failure, print it, acknowledge it and end this process."""
        while not self._stop.wait(POLL_S):
            for posted in sorted(self.folder.glob("failed-*")):
                peer = int(posted.name.split("-")[1])
                if peer != self.rank and not (self.folder / f"failed-{self.rank}").exists():
                    # Straight to the file descriptor: sys.stderr may be wrapped (progress bars, loggers) and
                    # this process ends with os._exit, which flushes nothing.
                    os.write(2, f"{PROGRAM}: error: process {peer} stopped the run: {posted.read_text()}\n".encode())
                    write_text(self.folder / f"ack-{self.rank}-of-{peer}", "")
                    time.sleep(EXIT_GRACE_S)
                    os._exit(1)  # the main thread may be blocked in a collective that never returns

    def stop(self) -> None:
        self._stop.set()


def _launch_folder(accelerator: Accelerator, paths: RunDirectory) -> Path:
    """A folder for this launch only (a resumed run must not read the last launch's failures)."""
    name = [uuid.uuid4().hex if accelerator.is_main_process else None]
    root = paths.logs / "failures"
    if accelerator.is_main_process:
        shutil.rmtree(root, ignore_errors=True)
        (root / name[0]).mkdir(parents=True)
    folder = root / broadcast_object_list(name)[0]
    if not all(gather_object([folder.is_dir()])):
        raise ConfigError(
            f"--run.output_dir {paths.root} is not one folder shared by every node (a process does not see the main "
            "process's files there): put the run folder on a file system all nodes share; only --harvest.cache_dir may be node-local"
        )
    return folder


@contextmanager
def fail_together(accelerator: Accelerator, paths: RunDirectory) -> Iterator[None]:
    """Run the block so that an exception on any process ends every process promptly, each
    printing the cause; the exception itself propagates on the process that raised it."""
    if accelerator.num_processes == 1:
        yield
        return
    board = FailureBoard(_launch_folder(accelerator, paths), accelerator.process_index, accelerator.num_processes)
    watcher = threading.Thread(target=board.watch, name="dmsae-fail-together", daemon=True)
    watcher.start()
    try:
        yield
    except BaseException as error:
        board.stop()
        board.post(error)
        raise
    board.stop()
    watcher.join()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(board.folder.parent, ignore_errors=True)
