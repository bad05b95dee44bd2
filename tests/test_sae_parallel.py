"""The SAE-parallel transfer on two CPU processes (gloo): one all-gathered activation stream that
every process reads whole, and the final SAEs dealt to the processes, each trained bit for bit as
one process trains it."""

from __future__ import annotations

from itertools import islice

import torch
from accelerate import Accelerator
from ddp_worker import STREAM_BATCHES, STREAM_RESUME, STREAM_SHAPE
from safetensors.torch import load_file
from test_activations import BASE, data, harvest_config  # noqa: F401 (a fixture)
from test_distill import tiny_args, tiny_setup  # noqa: F401 (a fixture)
from test_ddp import accelerate_launch
from test_prefetch import harvest_of
from tiny_models import tiny_model, tiny_tokenizer

from modeling_dmsae import DMSAEConfig, DMSAEModel
from trainer import distill
from trainer.config import OptimizerConfig
from trainer.harvest.cache import harvest_activations
from trainer.sae.training import SAETrainer, fit, fit_in_lockstep


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


def _lockstep_sae() -> DMSAEModel:
    torch.manual_seed(0)
    config = DMSAEConfig(
        d_in=16, num_latents=128, core_size=0, group_sizes=[32, 96], k=4, hook_module="model.layers.1", dead_tokens_threshold=64, aux_k=8
    )  # fmt: skip
    return DMSAEModel(config)


def test_sae_parallel_lockstep_resumes_an_sae_whose_checkpoint_is_later(tmp_path):
    """Process-local trainers (with gradient accumulation) train as the default trainer does on one
    process; in a lockstep whose batches start at 0, one resumed from a step-6 checkpoint waits for
    its step, and both end bit for bit as the SAE trained without a stop."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    generator = torch.Generator().manual_seed(3)
    batches = [torch.randn(64, 16, generator=generator) ** 3 for _ in range(12)]
    optimizer = OptimizerConfig(lr=3e-3, warmup_steps=2)

    def trained(process_local: bool) -> dict[str, torch.Tensor]:
        trainer = SAETrainer(_lockstep_sae(), optimizer, 6, accelerator, process_local)
        fit(trainer, iter(batches), 12)
        return trainer.sae.state_dict()

    whole = trained(process_local=True)
    assert all(torch.equal(whole[name], tensor) for name, tensor in trained(process_local=False).items())
    stopped = SAETrainer(_lockstep_sae(), optimizer, 6, accelerator, process_local=True)
    fit_in_lockstep([stopped], iter(batches), 0, 6, [[]])
    stopped.save_checkpoint(tmp_path / "checkpoint.pt")
    resumed, fresh = (SAETrainer(_lockstep_sae(), optimizer, 6, accelerator, process_local=True) for _ in range(2))
    resumed.load_checkpoint(tmp_path / "checkpoint.pt")
    fit_in_lockstep([resumed, fresh], iter(batches), 0, 12, [[], []])
    for trainer in (resumed, fresh):
        assert trainer.steps_taken == 12 and all(torch.equal(whole[name], tensor) for name, tensor in trainer.sae.state_dict().items())
