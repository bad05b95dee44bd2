"""Worker run by tests/test_ddp.py under `accelerate launch` with two CPU processes (gloo).

    python ddp_worker.py replicas            train one DMSAE, check the replicas and the frozen core
    python ddp_worker.py distill ARGS...     run trainer/distill.py's main with ARGS
"""

from __future__ import annotations

import sys

import torch
from accelerate import Accelerator

from modeling_dmsae import DMSAEConfig, DMSAEModel
from trainer import distill
from trainer.sae_training import OptimizerConfig, SAETrainer


def train_two_replicas() -> Accelerator:
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2, accelerator.num_processes
    torch.manual_seed(0)  # the same initialisation on both processes
    config = DMSAEConfig(
        d_in=16, num_latents=128, core_size=8, group_sizes=[8, 32, 80], k=4, hook_module="model.layers.1", dead_tokens_threshold=512
    )
    model = DMSAEModel(config)
    core = model.core_encoder.clone()
    trainer = SAETrainer(model, OptimizerConfig(lr=3e-3, warmup_steps=2), total_steps=25, accelerator=accelerator)
    generator = torch.Generator().manual_seed(100 + accelerator.process_index)  # each process its own data
    for _ in range(25):
        trainer.step(torch.randn(64, 16, generator=generator))
    sae = trainer.calibrate_threshold([torch.randn(64, 16, generator=generator) for _ in range(4)])
    assert torch.equal(sae.core_encoder, core), "frozen core rows changed"
    assert not torch.equal(sae.b_dec, torch.zeros(16)), "training did not happen"
    state = torch.cat(
        [t.flatten().float() for t in sae.state_dict().values()] + [trainer.tokens_since_fired.float(), torch.tensor([sae.config.threshold])]
    )
    replicas = accelerator.gather(state[None])
    assert torch.equal(replicas[0], replicas[1]), "replicas diverged"
    accelerator.print("replicas identical")
    return accelerator


if __name__ == "__main__":
    if sys.argv[1] == "replicas":
        distill.shut_down(train_two_replicas())
    else:
        sys.exit(distill.main(sys.argv[2:]))

