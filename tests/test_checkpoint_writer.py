"""Training checkpoints written in the background (trainer/sae/checkpoints.py BackgroundWriter, as
the pipeline's SAETrainers write them): the step goes on while the file is written, the file holds
the state at the moment of the call, and a failed write is raised, not lost."""

from __future__ import annotations

import time

import pytest
import torch
from accelerate import Accelerator

from modeling_dmsae import DMSAEConfig, DMSAEModel
from trainer.config import OptimizerConfig
from trainer.sae import checkpoints
from trainer.sae.training import SAETrainer

WRITE_S = 1.0


def tiny_trainer() -> SAETrainer:
    torch.manual_seed(0)
    config = DMSAEConfig(d_in=8, num_latents=64, core_size=0, group_sizes=[16, 48], k=4, hook_module="model.layers.1")
    return SAETrainer(DMSAEModel(config), OptimizerConfig(lr=3e-3, warmup_steps=1), 10, Accelerator(cpu=True), background_checkpoints=True)


@pytest.fixture
def slow_disk(monkeypatch):
    save = torch.save

    def slow_save(state, path):
        time.sleep(WRITE_S)
        save(state, path)

    monkeypatch.setattr(checkpoints.torch, "save", slow_save)


def test_a_checkpoint_is_written_while_training_goes_on_with_the_state_of_its_call(tmp_path, slow_disk):
    trainer, path = tiny_trainer(), tmp_path / "checkpoint.pt"
    trainer.step(torch.randn(64, 8))
    saved = trainer.sae.W_dec.detach().clone()
    start = time.perf_counter()
    trainer.save_checkpoint(path)
    assert time.perf_counter() - start < WRITE_S / 2, "save_checkpoint waited for the disk"
    assert not path.exists()
    trainer.step(torch.randn(64, 8))  # training changes the weights while the file is written
    assert not torch.equal(trainer.sae.W_dec, saved)
    trainer.wait_for_checkpoint()
    assert torch.equal(torch.load(path, weights_only=True)["model"]["W_dec"], saved)


def test_a_failed_background_write_is_raised(tmp_path, monkeypatch):
    def full_disk(state, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints.torch, "save", full_disk)
    trainer = tiny_trainer()
    trainer.step(torch.randn(64, 8))
    trainer.save_checkpoint(tmp_path / "checkpoint.pt")
    with pytest.raises(OSError, match="No space left"):
        trainer.release()
    assert not list(tmp_path.iterdir()), "a failed write leaves no partial file"
