"""The SAE-parallel transfer on two CPU processes (gloo): one all-gathered activation stream that
every process reads whole, and the final SAEs dealt to the processes, each trained bit for bit as
one process trains it."""

from __future__ import annotations

from itertools import islice

import torch
from ddp_worker import STREAM_BATCHES, STREAM_RESUME, STREAM_SHAPE
from test_activations import BASE, data, harvest_config  # noqa: F401 (a fixture)
from test_ddp import accelerate_launch
from test_prefetch import harvest_of
from tiny_models import tiny_model, tiny_tokenizer

from trainer.harvest.cache import harvest_activations


def test_all_gathered_stream_gives_every_process_the_single_process_batches(tmp_path, data):  # noqa: F811
    """Cached and streamed (bfloat16 rows, gathered as such), from the start and resumed in a
    later epoch: each process's all-gathered micro-batches are, bit for bit, those one process reads."""
    model, tokenizer, output = tiny_model(), tiny_tokenizer(), tmp_path / "read"
    sources = {
        "cached": harvest_activations(model, tokenizer, BASE, data, harvest_config(tmp_path, storage_dtype="bfloat16")),
        "streamed": harvest_activations(model, tokenizer, BASE, data, harvest_config(tmp_path, cache_dir=None, storage_dtype="bfloat16")),
    }
    accelerate_launch(
        "global-stream", data.dataset, str(sources["cached"].directory), str(output), finished=lambda stdout: "streams gathered" in stdout
    )
    one_process = STREAM_SHAPE._replace(processes=1)
    for name, source in sources.items():
        single = list(islice(harvest_of(source).training_batches(one_process, seed=5), STREAM_BATCHES))
        assert all(batch.dtype == torch.float32 and len(batch) == STREAM_SHAPE.micro_batch for batch in single)
        for process in range(2):
            read = torch.load(f"{output}.{process}", weights_only=True)
            assert all(torch.equal(a, b) for a, b in zip(read[name], single, strict=True)), (name, process)
            assert all(torch.equal(a, b) for a, b in zip(read[f"{name} resumed"], single[STREAM_RESUME:], strict=True)), (name, process)
