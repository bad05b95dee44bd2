"""Training batches read ahead in a background thread (--run.prefetch_batches): the same batches in
the same order, a reader's error in the consumer with its traceback, no thread left behind."""

from __future__ import annotations

import dataclasses
import threading
import traceback
from itertools import islice

import pytest
import torch
from test_activations import BASE, data, harvest_config  # noqa: F401 (a fixture)
from tiny_models import tiny_model, tiny_tokenizer

from trainer.harvest.cache import ActivationCache, CorruptShardError, harvest_activations
from trainer.harvest.harvested import Harvest
from trainer.harvest.prefetch import THREAD_NAME, prefetched
from trainer.run.stages import BatchShape

# 2 lanes of 8 rows per micro-batch: each lane reads 2 of the cache's 4 shards, ~9 batches an epoch.
SHAPE = BatchShape(batch_size=16, accumulation=1, lanes=2, processes=1)
BATCHES = 30  # past the first epoch: the reshuffled second one is read too

pytestmark = pytest.mark.timeout(60)  # a reader that never answers fails the test instead of hanging it


@pytest.fixture
def cache(tmp_path, data) -> ActivationCache:  # noqa: F811
    return harvest_activations(tiny_model(), tiny_tokenizer(), BASE, data, harvest_config(tmp_path))


def harvest_of(cache: ActivationCache) -> Harvest:
    """A harvest whose training activations are ``cache`` (nothing else is read here)."""
    return Harvest(**{**dict.fromkeys(f.name for f in dataclasses.fields(Harvest)), "training": cache})


def prefetch_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == THREAD_NAME]


@pytest.mark.parametrize("pin", [False, pytest.param(True, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning needs CUDA"))])
@pytest.mark.parametrize("start_step", [0, 7])
def test_prefetch_gives_the_same_batches_in_the_same_order(cache, start_step, pin):
    """As a fresh stage (0) and a resumed one (7) read them; pinned as on CUDA."""
    harvest = harvest_of(cache)
    expected = list(islice(harvest.training_batches(SHAPE, seed=5, start_step=start_step), BATCHES))
    with prefetched(harvest.training_batches(SHAPE, seed=5, start_step=start_step), depth=2, pin=pin) as ahead:
        read = list(islice(ahead, BATCHES))
    assert len(read) == len(expected) == BATCHES
    assert all(torch.equal(a, b) and a.is_pinned() == pin for a, b in zip(read, expected))


def test_prefetch_of_a_finite_source_ends_with_it(cache):
    expected = list(cache.batches(batch_size=7, seed=3, drop_last=False))
    with prefetched(cache.batches(batch_size=7, seed=3, drop_last=False), depth=2) as ahead:
        read = list(ahead)
        assert next(ahead, None) is None  # stays exhausted
    assert len(read) == len(expected) and all(torch.equal(a, b) for a, b in zip(read, expected))


def test_an_error_reading_a_shard_in_the_prefetch_thread_reaches_the_consumer(cache):
    shard = cache.shards[2]
    shard.write_bytes(b"\x00" * shard.stat().st_size)  # the size the manifest recorded: found only when read
    with pytest.raises(CorruptShardError, match=rf"cache shard {shard} is unreadable") as error:
        with prefetched(harvest_of(cache).training_batches(SHAPE, seed=5), depth=2) as ahead:
            for _ in ahead:
                pass
    frames = [frame.name for frame in traceback.extract_tb(error.value.__traceback__)]
    assert "read_shard" in frames, frames  # the reader's traceback, down to where the shard was read
    assert not prefetch_threads()


def test_stopping_a_prefetch_early_leaves_no_thread_running(cache):
    with prefetched(harvest_of(cache).training_batches(SHAPE, seed=5), depth=2) as ahead:
        next(ahead)
        assert prefetch_threads(), "nothing read ahead"
    assert not prefetch_threads()


def test_prefetch_0_reads_in_the_consumers_thread(cache):
    batches = harvest_of(cache).training_batches(SHAPE, seed=5)
    with prefetched(batches, depth=0) as ahead:
        assert ahead is batches and not prefetch_threads()
