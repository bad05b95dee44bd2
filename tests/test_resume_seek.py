"""A resumed stage seeks to its next batch: it reads (streamed: harvests) no shard it had read to its
end, and its batches are the uninterrupted stage's, bit for bit."""

from __future__ import annotations

import dataclasses
from itertools import islice

import pytest
import torch
from test_activations import BASE, data, harvest_config  # noqa: F401 (a fixture)
from test_distill import tiny_args, tiny_setup  # noqa: F401 (a fixture)
from test_prefetch import SHAPE, harvest_of
from tiny_models import tiny_model, tiny_tokenizer

from trainer import distill
from trainer.harvest import cache as cache_module
from trainer.harvest.cache import ActivationStream, harvest_activations
from trainer.harvest.harvested import Harvest
from trainer.sae.training import SAETrainer

BATCHES = 30  # past the first epoch of each lane (~9 batches)


def counted_stream(model, tmp_path, data) -> tuple[ActivationStream, list[int]]:  # noqa: F811
    """A stream and the list its shard harvests are appended to."""
    stream = harvest_activations(model, tiny_tokenizer(), BASE, data, harvest_config(tmp_path, cache_dir=None))
    harvested, harvest_shard = [], stream._harvest_shard

    def counted(contexts, seed):
        harvested.append(contexts[0].index)
        return harvest_shard(contexts, seed)

    stream._harvest_shard = counted
    return stream, harvested


def streamed_harvest(stream: ActivationStream) -> Harvest:
    return dataclasses.replace(harvest_of(None), training=stream)


@pytest.mark.parametrize("start_step", [12, 17, 22])  # past each lane's first shard; in a second epoch
def test_a_streamed_stage_resumes_without_replay(tmp_path, data, start_step):  # noqa: F811
    """Resumed at ``start_step`` with the shard row counts known then, the stage harvests at most the
    shard holding its next batch again, then what the uninterrupted stage harvests after that step."""
    model = tiny_model()
    stream, harvested = counted_stream(model, tmp_path, data)
    reference, harvests_before, known_rows = [], 0, {}
    for step, batch in enumerate(islice(streamed_harvest(stream).training_batches(SHAPE, seed=5), BATCHES)):
        reference.append(batch)
        if step + 1 == start_step:  # what a checkpoint after this step records
            known_rows, harvests_before = dict(stream.shard_rows), len(harvested)
    resumed_stream, resumed_harvests = counted_stream(model, tmp_path, data)
    resumed = streamed_harvest(resumed_stream)
    resumed.remember_shard_rows(known_rows)
    batches = list(islice(resumed.training_batches(SHAPE, seed=5, start_step=start_step), BATCHES - start_step))
    assert all(torch.equal(a, b) for a, b in zip(batches, reference[start_step:], strict=True))
    spent_after_step = len(harvested) - harvests_before  # by the uninterrupted stage, reading the same batches
    # Each lane harvests the shard it was reading again, once.
    assert len(resumed_harvests) <= spent_after_step + SHAPE.lanes, (resumed_harvests, spent_after_step)
    assert len(resumed_harvests) < len(harvested)  # a replay harvests every shard the stage read


@pytest.mark.parametrize("start_step", [4, 13, 22])
def test_a_cached_stage_resumes_without_replay(tmp_path, data, monkeypatch, start_step):  # noqa: F811
    """The same batches from ``start_step`` on, reading no shard the stage had read to its end."""
    harvest = harvest_of(harvest_activations(tiny_model(), tiny_tokenizer(), BASE, data, harvest_config(tmp_path)))
    reference = list(islice(harvest.training_batches(SHAPE, seed=5), BATCHES))
    reads, read_shard = [], cache_module.read_shard
    monkeypatch.setattr(cache_module, "read_shard", lambda path: reads.append(path) or read_shard(path))
    batches = list(islice(harvest.training_batches(SHAPE, seed=5, start_step=start_step), BATCHES - start_step))
    assert all(torch.equal(a, b) for a, b in zip(batches, reference[start_step:], strict=True))
    resumed_reads = len(reads)
    list(islice(harvest.training_batches(SHAPE, seed=5), BATCHES))  # the replay: every shard up to the step
    assert resumed_reads < len(reads) - resumed_reads, reads


def test_a_streamed_run_killed_mid_stage_resumes_without_replay_to_the_same_saes(tiny_setup, tmp_path, monkeypatch):  # noqa: F811
    """Killed in cycle 1 after its step-6 checkpoint and resumed: every SAE is byte for byte the
    uninterrupted run's."""
    streamed = ("--run.stream_activations", "true")
    assert distill.main(tiny_args(tiny_setup, tmp_path / "whole", *streamed)) == 0
    original_step, calls = SAETrainer.step, {"n": 0}

    def dying_step(self, batch):
        calls["n"] += 1
        if calls["n"] == 12 + 7:  # cycle 0 takes 12 steps
            raise KeyboardInterrupt("simulated kill")
        return original_step(self, batch)

    monkeypatch.setattr(SAETrainer, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        distill.main(tiny_args(tiny_setup, tmp_path / "killed", *streamed))
    assert (tmp_path / "killed" / "checkpoints" / "cycle-001" / "checkpoint.pt").exists()
    monkeypatch.setattr(SAETrainer, "step", original_step)
    assert distill.main(tiny_args(tiny_setup, tmp_path / "killed", *streamed, "--run.resume", "true")) == 0
    whole = sorted((tmp_path / "whole").rglob("model.safetensors"))
    assert len(whole) > 3
    for path in whole:
        resumed = tmp_path / "killed" / path.relative_to(tmp_path / "whole")
        assert resumed.read_bytes() == path.read_bytes(), resumed
