"""Training batches read ahead in a background thread (``--run.prefetch_batches``).

Reading a batch (a shard loaded, cast to float32, checked for NaN/Inf, shuffled and cut; or, when
streamed, the base model run) is work for the CPU and the disk, and the SAE's step is work for the
accelerator: a thread reading the next batches while the step runs hides the one behind the other.
The thread reads the same iterator in the same order, so the batches are the same; it holds at most
``depth`` of them, and an error it meets reaches the consumer, its traceback included, at the
batch where it happened.
"""

from __future__ import annotations

import queue
import threading
from contextlib import contextmanager
from typing import Iterator

import torch

THREAD_NAME = "dmsae-prefetch"
POLL_S = 0.1  # how soon a stopped reader notices, while its queue is full


class _End:
    """The reader's last word: the source is exhausted, or ``error`` ended it."""

    def __init__(self, error: BaseException | None = None):
        self.error = error


class Prefetcher(Iterator[torch.Tensor]):
    """The batches of ``source``, read by a background thread at most ``depth`` ahead; pinned
    (page-locked) when ``pin``, so that the copy to the GPU can run asynchronously."""

    def __init__(self, source: Iterator[torch.Tensor], depth: int, pin: bool):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._ended = False
        self._thread = threading.Thread(target=self._read, args=(source, pin), name=THREAD_NAME, daemon=True)
        self._thread.start()

    def _read(self, source: Iterator[torch.Tensor], pin: bool) -> None:
        try:
            for batch in source:
                if not self._put(batch.pin_memory() if pin else batch):
                    return
        except BaseException as error:  # anything: the consumer must not wait for a batch that never comes
            self._put(_End(error))
            return
        self._put(_End())

    def _put(self, item: object) -> bool:
        """Queue ``item`` unless the consumer stopped meanwhile (then False)."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def __next__(self) -> torch.Tensor:
        if self._ended:
            raise StopIteration
        item = self._queue.get()
        if isinstance(item, _End):
            self._ended = True
            self._thread.join()
            if item.error is not None:
                raise item.error  # with the reader's frames: its traceback goes on from where it was raised
            raise StopIteration
        return item

    def close(self) -> None:
        """Stop the reader (it finishes the batch it is reading) and wait for it to end."""
        self._stop.set()
        self._thread.join()


@contextmanager
def prefetched(source: Iterator[torch.Tensor], depth: int, pin: bool = False) -> Iterator[Iterator[torch.Tensor]]:
    """``source`` read ``depth`` batches ahead in a background thread, stopped when the block ends
    (the consumer may stop early: a stage takes only the batches it needs); ``depth`` 0: ``source``
    itself, read in the consumer's thread."""
    if depth == 0:
        yield source
        return
    reader = Prefetcher(source, depth, pin)
    try:
        yield reader
    finally:
        reader.close()
