"""Two CPU processes under Accelerate (gloo): replicas stay identical, the core stays frozen, and
the whole distillation runs distributed."""

from __future__ import annotations

import json

import torch
from accelerate import Accelerator, debug_launcher
from test_distill import tiny_args, tiny_setup  # noqa: F401  (fixture)

from modeling_dmsae import DMSAEConfig, DMSAEModel
from trainer.sae_training import OptimizerConfig, SAETrainer


def _train_two_replicas() -> None:
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)  # same initialisation on both processes
    config = DMSAEConfig(d_in=16, num_latents=128, core_size=8, group_sizes=[8, 32, 80], k=4, hook_module="model.layers.1", dead_tokens_threshold=512)
    model = DMSAEModel(config)
    core = model.core_encoder.clone()
    trainer = SAETrainer(model, OptimizerConfig(lr=3e-3, warmup_steps=2, threshold_start_step=5), total_steps=25, accelerator=accelerator)
    generator = torch.Generator().manual_seed(100 + accelerator.process_index)  # each process its own data
    for _ in range(25):
        trainer.step(torch.randn(64, 16, generator=generator))
    sae = trainer.finalized_sae()
    assert torch.equal(sae.core_encoder, core), "frozen core rows changed"
    state = torch.cat([t.flatten().float() for t in sae.state_dict().values()] + [trainer.tokens_since_fired.float(), trainer.threshold.reshape(1)])
    replicas = accelerator.gather(state[None])
    assert accelerator.num_processes == 2
    assert torch.equal(replicas[0], replicas[1]), "replicas diverged"
    assert not torch.equal(sae.b_dec, torch.zeros(16)), "training did not happen"


def test_ddp_replicas_stay_identical_and_core_frozen():
    debug_launcher(_train_two_replicas, num_processes=2)


def test_distillation_runs_on_two_processes(tiny_setup, tmp_path):
    output = tmp_path / "run"
    args = tiny_args(tiny_setup, output, "--transfer.ks", "16", "--transfer.random_core_control", "false")

    def run() -> None:
        from trainer import distill

        assert distill.main(args) == 0

    debug_launcher(run, num_processes=2)
    manifest = json.loads((output / "cache" / "activations" / "manifest.json").read_text())
    assert manifest["complete"]
    assert (output / "transfer" / "k-0016-dense_core" / "model.safetensors").exists()
    assert json.loads((output / "distilled_core" / "core.json").read_text())["selected"]
