"""Activation and attribution harvests: cache round trip, resume, refusal, streaming, 2 processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import PartialState, debug_launcher
from safetensors import safe_open
from safetensors.torch import load_file
from test_text_corpus import DOCUMENTS, write_jsonl
from tiny_models import tiny_model, tiny_tokenizer

from trainer.config import BaseModelConfig, DataConfig, HarvestConfig
from trainer.harvest.base_model import capture_activations, next_token_gradients, resolve_hook_module
from trainer.harvest.cache import (
    ActivationCache,
    ActivationStream,
    CacheMismatchError,
    IncompleteCacheError,
    NonFiniteActivationsError,
    harvest_activations,
    harvest_attribution_sample,
)
from trainer.harvest.text_corpus import ContextSharding, context_batches, packed_contexts, process_state

TESTS = Path(__file__).parent
BASE = BaseModelConfig(model="tiny-random", hook_module="model.layers.1")
CONTEXT_LENGTH = 16


@pytest.fixture
def data(tmp_path) -> DataConfig:
    return DataConfig(dataset=str(write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS)), context_length=CONTEXT_LENGTH)


def harvest_config(tmp_path, name="cache", **overrides) -> HarvestConfig:
    """20 training contexts in shards of 6 (the last one short), float32 storage."""
    settings = dict(
        train_tokens=20 * CONTEXT_LENGTH, attribution_tokens=24, positions_per_context=4, batch_size=4,
        attribution_batch_size=3, contexts_per_shard=6, storage_dtype="float32",
    )  # fmt: skip
    if "cache_dir" not in overrides:
        settings["cache_dir"] = str(tmp_path / name)
    return HarvestConfig(**{**settings, **overrides})


def sort_rows(rows: torch.Tensor) -> torch.Tensor:
    """Rows in a canonical order, to compare collections whatever the shuffle."""
    key = rows.double() @ torch.linspace(1, 2, rows.shape[1], dtype=torch.double)
    return rows[key.argsort()]


def expected_activations(model, data, contexts: range) -> torch.Tensor:
    """Activations at unmasked positions, computed directly with one forward pass."""
    batch = next(context_batches(packed_contexts(tiny_tokenizer(), data, contexts.start, len(contexts)), len(contexts)))
    with torch.no_grad():
        hidden = capture_activations(model, resolve_hook_module(model, BASE.hook_module), batch.input_ids)
    return hidden[batch.mask]


def shard_contents(directory) -> dict[str, dict[str, torch.Tensor]]:
    return {path.name: load_file(path) for path in sorted(directory.glob("shard_*.safetensors"))}


def test_cache_round_trip(tmp_path, data):
    model = tiny_model()
    cfg = harvest_config(tmp_path)
    cache = harvest_activations(model, tiny_tokenizer(), BASE, data, cfg)
    assert isinstance(cache, ActivationCache)
    assert [p.name for p in cache.shards] == [f"shard_{i:06d}.safetensors" for i in range(4)]
    expected = expected_activations(model, data, range(20))
    assert cache.num_rows == len(expected) and cache.d_model == 32
    torch.testing.assert_close(sort_rows(cache.tensors()), sort_rows(expected))
    first_shard = cache.tensors()[: 6 * CONTEXT_LENGTH]
    assert not torch.equal(first_shard, expected[: 6 * CONTEXT_LENGTH])  # the shard is shuffled

    batches = list(cache.batches(batch_size=7, seed=3, drop_last=False))
    assert all(len(b) == 7 for b in batches[:-1]) and batches[0].dtype == torch.float32
    torch.testing.assert_close(sort_rows(torch.cat(batches)), sort_rows(expected))
    assert not torch.equal(batches[0], next(cache.batches(batch_size=7, seed=4)))  # the seed reshuffles
    # Each process reads only its own shards (s % 2), which together are the whole cache once.
    per_process = [torch.cat(list(cache.batches(5, process=ContextSharding(p, 2), drop_last=False))) for p in range(2)]
    for p, rows in enumerate(per_process):
        own = torch.cat([load_file(path)["x"].float() for path in cache.shards[p::2]])
        torch.testing.assert_close(sort_rows(rows), sort_rows(own))
    torch.testing.assert_close(sort_rows(torch.cat(per_process)), sort_rows(expected))

    # A second harvest opens the complete cache instead of recomputing it.
    reopened = harvest_activations(model, tiny_tokenizer(), BASE, data, cfg)
    assert reopened.manifest == cache.manifest and reopened.manifest["complete"]


def test_16_bit_cache(tmp_path, data):
    model = tiny_model()
    full = harvest_activations(model, tiny_tokenizer(), BASE, data, harvest_config(tmp_path, "fp32"))
    half_cfg = harvest_config(tmp_path, "bf16", storage_dtype="bfloat16")
    half = harvest_activations(model, tiny_tokenizer(), BASE, data, half_cfg)
    assert load_file(half.shards[0])["x"].dtype == torch.bfloat16
    assert half.shards[0].stat().st_size < 0.6 * full.shards[0].stat().st_size
    torch.testing.assert_close(half.tensors(), full.tensors(), rtol=1e-2, atol=1e-2)


# A harvest in its own process, slowed down so that it can be killed halfway.
SLOW_HARVEST = """
import sys, time
from tiny_models import tiny_model, tiny_tokenizer
from test_activations import BASE, CONTEXT_LENGTH, harvest_config
from trainer.config import DataConfig
from trainer.harvest.cache import harvest_activations

model = tiny_model()
model.model.layers[1].register_forward_hook(lambda *args: time.sleep(0.3))
data = DataConfig(dataset=sys.argv[1], context_length=CONTEXT_LENGTH)
harvest_activations(model, tiny_tokenizer(), BASE, data, harvest_config(None, cache_dir=sys.argv[2]))
"""


def test_killed_harvest_resumes_to_the_same_cache(tmp_path, data):
    model, tokenizer = tiny_model(), tiny_tokenizer()
    reference = harvest_activations(model, tokenizer, BASE, data, harvest_config(tmp_path, "reference"))

    directory = tmp_path / "resumed" / "activations"
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-c", SLOW_HARVEST, data.dataset, str(tmp_path / "resumed")]
    harvest = subprocess.Popen(command, env=environment)
    deadline = time.monotonic() + 120
    while not (directory / "shard_000001.safetensors").exists():
        assert harvest.poll() is None, "the harvest process ended before it could be killed"
        assert time.monotonic() < deadline, "the harvest process wrote no second shard in 2 minutes"
        time.sleep(0.02)
    harvest.send_signal(signal.SIGKILL)
    harvest.wait()
    assert not json.loads((directory / "manifest.json").read_text()).get("complete")
    with pytest.raises(IncompleteCacheError, match="resumes"):
        ActivationCache(directory)
    # What a kill during a write leaves behind: a temporary file, never read, later overwritten.
    (directory / "shard_000003.safetensors.tmp999").write_bytes(b"half a shard")

    resumed = harvest_activations(model, tokenizer, BASE, data, harvest_config(tmp_path, "resumed"))
    assert resumed.manifest == reference.manifest
    expected, actual = shard_contents(reference.directory), shard_contents(resumed.directory)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0)


def test_cache_of_another_model_or_hook_is_refused(tmp_path, data):
    tokenizer = tiny_tokenizer()
    cfg = harvest_config(tmp_path, train_tokens=6 * CONTEXT_LENGTH)
    harvest_activations(tiny_model(), tokenizer, BASE, data, cfg)
    other_hook = BaseModelConfig(model=BASE.model, hook_module="model.layers.2")
    hook_change = r"hook_module: cache has 'model.layers.1', this run has 'model.layers.2'.*--harvest.cache_dir"
    with pytest.raises(CacheMismatchError, match=hook_change):
        harvest_activations(tiny_model(), tokenizer, other_hook, data, cfg)
    with pytest.raises(CacheMismatchError, match="model_fingerprint"):
        harvest_activations(tiny_model(seed=1), tokenizer, BASE, data, cfg)
    with pytest.raises(CacheMismatchError, match="context_length"):
        longer = DataConfig(dataset=data.dataset, context_length=2 * CONTEXT_LENGTH)
        harvest_activations(tiny_model(), tokenizer, BASE, longer, cfg)


def test_nan_activations_are_refused(tmp_path, data):
    model = tiny_model()
    model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    message = r"NaN/Inf values in the activations of contexts 0\.\.3.*--model.dtype float32"
    with pytest.raises(NonFiniteActivationsError, match=message):
        harvest_activations(model, tiny_tokenizer(), BASE, data, harvest_config(tmp_path))


def test_float16_overflow_is_refused(tmp_path, data):
    model = tiny_model()
    model.model.layers[1].mlp.down_proj.weight.mul_(1e6)
    with pytest.raises(NonFiniteActivationsError, match="stored as float16.*bfloat16 or float32"):
        harvest_activations(model, tiny_tokenizer(), BASE, data, harvest_config(tmp_path, storage_dtype="float16"))


def test_context_longer_than_the_model_is_refused(tmp_path):
    data = DataConfig(dataset="unused.jsonl", context_length=1024)
    with pytest.raises(ValueError, match="max_position_embeddings = 256"):
        harvest_activations(tiny_model(), tiny_tokenizer(), BASE, data, harvest_config(tmp_path))


def test_stream_yields_the_cached_activations(tmp_path, data):
    model = tiny_model()
    stream = harvest_activations(model, tiny_tokenizer(), BASE, data, harvest_config(tmp_path, cache_dir=None))
    assert isinstance(stream, ActivationStream)
    streamed = torch.cat(list(stream.batches(batch_size=1)))
    torch.testing.assert_close(sort_rows(streamed), sort_rows(expected_activations(model, data, range(20))))
    # Usable by autograd (harvested under inference mode, but handed out as normal tensors).
    weight = torch.ones(32, requires_grad=True)
    (streamed[:4] * weight).sum().backward()


def test_attribution_sample_matches_gradients_of_whole_contexts(tmp_path, data):
    model, tokenizer = tiny_model("gemma2"), tiny_tokenizer()
    cfg = harvest_config(tmp_path)
    contexts = cfg.context_ranges(CONTEXT_LENGTH)
    assert (contexts.train, contexts.attribution, contexts.heldout_start) == (range(0, 20), range(20, 26), 26)
    sample = harvest_attribution_sample(model, tokenizer, BASE, data, cfg)
    assert sample.x.shape == sample.g.shape == (24, 32)  # 6 contexts x 4 positions

    batch = next(context_batches(packed_contexts(tokenizer, data, 20, 6), 6))
    x, g = next_token_gradients(model, model.model.layers[1], batch.input_ids, batch.mask)
    x, g = x.reshape(-1, 32), g.reshape(-1, 32)
    for row in range(len(sample.x)):
        (match,) = (x == sample.x[row]).all(dim=1).nonzero().squeeze(1).tolist()
        torch.testing.assert_close(sample.g[row], g[match], rtol=1e-4, atol=1e-7)
    assert (sample.g.abs().sum(dim=1) > 0).all()  # BOS and last positions (g = 0) are never sampled

    uncached = harvest_attribution_sample(model, tokenizer, BASE, data, harvest_config(tmp_path, cache_dir=None))
    assert all(torch.equal(a, b) for a, b in zip(uncached, sample))
    manifest = json.loads((tmp_path / "cache" / "attribution" / "manifest.json").read_text())
    assert manifest["kind"] == "attribution" and manifest["loss"].startswith("sum")


def _two_process_harvest(dataset: str, cache_dir: str) -> None:
    PartialState._reset_state()  # forget the single-process state inherited from the test process
    state = process_state()
    assert state.num_processes == 2 and state.backend == "gloo"
    torch.set_num_threads(1)
    data = DataConfig(dataset=dataset, context_length=CONTEXT_LENGTH)
    cache = harvest_activations(tiny_model(), tiny_tokenizer(), BASE, data, harvest_config(None, cache_dir=cache_dir))
    assert cache.manifest["complete"]


def test_two_processes_harvest_disjoint_shards(tmp_path, data):
    debug_launcher(_two_process_harvest, args=(data.dataset, str(tmp_path / "two")), num_processes=2)
    single = harvest_activations(tiny_model(), tiny_tokenizer(), BASE, data, harvest_config(tmp_path, "one"))

    two = ActivationCache(tmp_path / "two" / "activations")
    writers, contexts = [], []
    for path in two.shards:
        with safe_open(path, "pt") as file:
            metadata = file.metadata()
        writers.append(int(metadata["process_index"]))
        first = int(metadata["first_context"])
        contexts += range(first, first + int(metadata["num_contexts"]))
    assert writers == [0, 1, 0, 1]  # each process wrote its own shards
    assert contexts == list(range(20))  # no overlap, nothing missed
    # The cache does not depend on the number of processes.
    expected, actual = shard_contents(single.directory), shard_contents(two.directory)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0)


def test_massive_norm_positions_are_excluded_and_counted(tmp_path, data):
    """Positions 3 and 9 of every context get a vector 100x the typical norm added at the hooked
    layer (an injected attention sink): they must reach neither the cache nor the attribution
    sample, and the manifest must count them and show them in the norm profile."""
    model = tiny_model()
    hook = resolve_hook_module(model, BASE.hook_module)
    with torch.no_grad():
        typical = capture_activations(model, hook, torch.tensor([[5, 6, 7, 8]])).norm(dim=-1).median()
    spike = torch.zeros(CONTEXT_LENGTH, 32)
    spike[[3, 9], 0] = 100 * typical

    def inject(module, args, output):
        return output + spike[: output.shape[1]]

    clean = harvest_activations(model, tiny_tokenizer(), BASE, data, harvest_config(tmp_path, "clean"))
    handle = hook.register_forward_hook(inject)
    try:
        cache = harvest_activations(model, tiny_tokenizer(), BASE, data, harvest_config(tmp_path))
        sample = harvest_attribution_sample(model, tiny_tokenizer(), BASE, data, harvest_config(tmp_path))
    finally:
        handle.remove()
    census = cache.manifest["positions"]
    assert clean.manifest["positions"]["excluded"]["massive_norm"] == 0
    assert census["excluded"]["massive_norm"] == 2 * 20  # two per training context
    assert census["kept"] == cache.num_rows == clean.num_rows - 40
    assert census["positions"] == 20 * CONTEXT_LENGTH
    assert census["excluded"]["special_tokens"] == census["positions"] - clean.num_rows  # BOS
    profile = census["mean_norm_at_position"]
    assert profile[3] > 50 * census["median_norm"] and profile[2] < 2 * census["median_norm"]
    rows = cache.tensors()
    assert rows.norm(dim=-1).max() < 10 * census["median_norm"]
    assert sample.x.norm(dim=-1).max() < 10 * census["median_norm"]
    unfiltered = harvest_activations(
        model, tiny_tokenizer(), BASE, data, harvest_config(tmp_path, "unfiltered", max_norm_ratio=0)
    )
    assert unfiltered.num_rows == clean.num_rows  # max_norm_ratio 0 keeps every position
