"""bf16 SAE training (``Accelerator(mixed_precision="bf16")``, ``DMSAEModel.compute_dtype``): the
encoder GEMM and the decode run in bf16 from bf16 copies of fp32 master weights; the step stays near
the fp32 step, the masters, gradients and Adam state stay fp32, the frozen core stays bit-identical,
and calibration, inference and the fp32 mode are untouched.

The tolerances were measured on the tiny model below over 4 seeds (batches of 512 tokens of
3 N(0, 1) + 1): one forward's loss differed by at most 6.5e-4 relative and its BatchTopK selection
on at most 0.61% of the entries; over 20 steps (Adam, lr 1e-3) the losses differed by at most
3.2e-3 relative and the weights by at most 4.2e-3. The bounds below leave about 3x.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from test_modeling import make_model
from trainer.config import OptimizerConfig
from trainer.sae.training import SAETrainer

STEPS = 10


def batches(seed: int = 0, count: int = STEPS) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(512, 24, generator=generator) * 3 + 1 for _ in range(count)]


def trainer_for(precision: str, seed: int = 0) -> SAETrainer:
    AcceleratorState._reset_state(reset_partial_state=True)  # one precision per process otherwise
    accelerator = Accelerator(cpu=True, mixed_precision=precision)
    return SAETrainer(make_model(seed), OptimizerConfig(lr=1e-3, warmup_steps=2), total_steps=STEPS, accelerator=accelerator)


@pytest.fixture(autouse=True)
def fp32_accelerator_afterwards():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)  # leave fp32 to the tests that follow


def selected(output) -> set[tuple[int, int]]:
    latents = output.sparse_latents
    return set(zip(latents.rows.tolist(), latents.cols.tolist()))


def test_bf16_forward_stays_near_fp32():
    model = make_model().train()
    x = batches()[0]
    exact = model(x)
    model.compute_dtype = torch.bfloat16
    approximate = model(x)
    assert approximate.loss.dtype == torch.float32 and approximate.prefix_losses.dtype == torch.float32
    assert not torch.equal(approximate.loss, exact.loss), "the bf16 mode computed in fp32"
    torch.testing.assert_close(approximate.loss, exact.loss, rtol=2e-3, atol=0)
    differing = len(selected(exact) ^ selected(approximate)) / len(selected(exact))
    assert differing < 0.02, f"bf16 changed {differing:.2%} of the BatchTopK selections"


def test_bf16_training_stays_near_fp32_with_fp32_masters_and_adam_state():
    exact, approximate = trainer_for("no"), trainer_for("bf16")
    core = approximate.sae.core_encoder.clone()
    assert approximate.sae.compute_dtype == torch.bfloat16 and exact.sae.compute_dtype is None
    for batch in batches():
        loss, bf16_loss = exact.step(batch).loss, approximate.step(batch).loss
        torch.testing.assert_close(bf16_loss, loss, rtol=1e-2, atol=0)
    for (name, weight), bf16_weight in zip(exact.sae.named_parameters(), approximate.sae.parameters()):
        assert bf16_weight.dtype == torch.float32, name
        torch.testing.assert_close(bf16_weight, weight, rtol=0, atol=1.5e-2, msg=f"{name} drifted from fp32")
    assert any(not torch.equal(a, b) for a, b in zip(exact.sae.parameters(), approximate.sae.parameters()))
    for state in approximate.optimizer.state.values():
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    assert torch.equal(approximate.sae.core_encoder, core), "the frozen core moved"


def test_bf16_gradients_reach_the_fp32_masters():
    model = make_model().train()
    model.compute_dtype = torch.bfloat16
    weights = model._compute_weights(model.compute_dtype)
    assert all(w.dtype == torch.bfloat16 for w in weights)
    model(batches()[0], dead_latents=torch.ones(160, dtype=torch.bool)).loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.dtype == torch.float32, name
        assert torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0, name


def test_fp32_mode_multiplies_the_parameters_themselves():
    """The default (fp32) forward issues the ops it always did: no copy, no cast of any weight."""
    model = make_model()
    weights = model._compute_weights(model.compute_dtype)
    assert weights.encoder is model.encoder and weights.W_dec is model.W_dec
    assert weights.b_enc is model.b_enc and weights.core_encoder is model.core_encoder


def test_bf16_mode_leaves_calibration_and_inference_unchanged():
    exact, approximate = trainer_for("no"), trainer_for("bf16")
    approximate.sae.load_state_dict(exact.sae.state_dict())
    calibration, x = batches(1, 3), batches(2, 1)[0]
    assert exact.calibrate_threshold(calibration).config.threshold == approximate.calibrate_threshold(calibration).config.threshold
    for use_threshold in (False, True):  # encode: the stored weights, in train mode too
        assert torch.equal(exact.sae.encode(x, use_threshold), approximate.sae.encode(x, use_threshold))
    exact_eval, approximate_eval = exact.sae.eval()(x), approximate.sae.eval()(x)
    assert torch.equal(exact_eval.reconstruction, approximate_eval.reconstruction)
    assert approximate.release().compute_dtype is None, "the released SAE still computes in bf16"
