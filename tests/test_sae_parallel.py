"""The SAE-parallel transfer on two CPU processes (gloo): one all-gathered activation stream that
every process reads whole, and the final SAEs dealt to the processes, each trained bit for bit as
one process trains it."""

from __future__ import annotations

from itertools import islice

import torch
from ddp_worker import STREAM_BATCHES, STREAM_RESUME, STREAM_SHAPE
from safetensors.torch import load_file
from test_activations import BASE, data, harvest_config  # noqa: F401 (a fixture)
from test_distill import tiny_args, tiny_setup  # noqa: F401 (a fixture)
from test_ddp import accelerate_launch
from test_prefetch import harvest_of
from tiny_models import tiny_model, tiny_tokenizer

from trainer import distill
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


def test_sae_parallel_transfer_trains_every_final_sae_as_one_process_does(tiny_setup, tmp_path):  # noqa: F811
    """The transfer of one run's core on 2 processes, its five SAEs dealt 3 and 2 and checkpointed
    on the way: every final SAE is bit for bit the one a single process trains (on one thread, as
    each launched process: another thread count sums in another order)."""
    args = ("--cycles.num_cycles", "1", "--transfer.ks", "16", "--transfer.sparsity_matched", "false")
    one, two = tmp_path / "one", tmp_path / "two"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert distill.main(tiny_args(tiny_setup, one, *args)) == 0
    finally:
        torch.set_num_threads(threads)
    from_core = ("--core", str(one / "distilled_core"), "--harvest.cache_dir", str(one / "cache"))
    accelerate_launch("distill", *tiny_args(tiny_setup, two, *args, *from_core), finished=lambda stdout: (two / "SUMMARY.md").exists())
    names = sorted(path.name for path in (one / "transfer").iterdir())
    assert len(names) == 5 and names == sorted(path.name for path in (two / "transfer").iterdir())
    for name in names:
        single, dealt = load_file(one / "transfer" / name / "model.safetensors"), load_file(two / "transfer" / name / "model.safetensors")
        assert single.keys() == dealt.keys() and all(torch.equal(dealt[key], tensor) for key, tensor in single.items()), name
        log = lambda run: (run / "logs" / f"transfer-{name}.jsonl").read_text()  # noqa: E731
        assert log(two) == log(one), name
    assert not list((two / "checkpoints").glob("*/checkpoint.pt"))
