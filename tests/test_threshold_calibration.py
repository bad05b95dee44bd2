"""The inference threshold: calibrated after training so that one-token-at-a-time encoding keeps
what BatchTopK keeps, where dictionary_learning's EMA of the smallest kept activation misses."""

from __future__ import annotations

import pytest
import torch
from test_modeling import make_config, make_model

from modeling_dmsae import DMSAEModel
from modeling_dmsae.modeling_dmsae import calibrated_threshold
from trainer.config import OptimizerConfig
from trainer.sae.training import SAETrainer

TRUE_FEATURES = torch.nn.functional.normalize(torch.randn(200, 24, generator=torch.Generator().manual_seed(1)), dim=-1)


def sparse_data(num_tokens: int, seed: int) -> torch.Tensor:
    """Sparse non-negative combinations of 200 fixed directions (about 6 per token), off-centre."""
    generator = torch.Generator().manual_seed(seed)
    codes = (torch.rand(num_tokens, 200, generator=generator) < 6 / 200) * torch.rand(num_tokens, 200, generator=generator) * 4
    return codes @ TRUE_FEATURES + 0.3


@pytest.mark.parametrize("variant", ["dense_core", "sparse_core"])
def test_calibration_keeps_exactly_what_batchtopk_keeps_over_the_calibration_set(variant):
    model = make_model(variant=variant)
    batches = [torch.randn(64, 24, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    trainer = SAETrainer(model, OptimizerConfig(), total_steps=1)
    sae = trainer.calibrate_threshold(batches).eval()
    assert sae.config.threshold > 0
    everything = torch.cat(batches)
    thresholded = sae(everything)  # eval mode: the threshold, one token at a time
    batchtopk = sae(everything, use_threshold=False)  # BatchTopK over all 320 tokens at once
    assert torch.equal(thresholded.sparse_latents.rows, batchtopk.sparse_latents.rows)
    assert torch.equal(thresholded.sparse_latents.cols, batchtopk.sparse_latents.cols)
    masked = thresholded.l0_noncore if variant == "dense_core" else thresholded.l0
    assert float(masked) == sae.config.k_noncore  # exactly k per token on the calibration tokens


def test_calibrated_threshold_holds_held_out_l0_where_the_ema_misses():
    """A 100-step run: the EMA (beta 0.999, from step 25, as dictionary_learning computes it) still
    holds most of its first, untrained value, and its held-out L0 is far from k; the calibrated
    threshold lands within 10%."""
    torch.manual_seed(0)
    model = DMSAEModel(make_config(core_size=12))
    steps = 100
    trainer = SAETrainer(model, OptimizerConfig(lr=3e-3, warmup_steps=10), total_steps=steps)
    ema = None
    for step in range(steps):
        smallest_kept = float(trainer.step(sparse_data(256, seed=1000 + step)).smallest_kept)
        if step >= 25:
            ema = smallest_kept if ema is None else 0.999 * ema + 0.001 * smallest_kept
    held_out = sparse_data(4096, seed=3)
    k = trainer.sae.config.k_noncore
    sae = trainer.sae.eval()
    sae.config.threshold = ema
    ema_l0 = float(sae(held_out).l0_noncore)
    sae = trainer.calibrate_threshold([sparse_data(1024, seed=4 + i) for i in range(4)])
    calibrated_l0 = float(sae(held_out).l0_noncore)
    assert abs(ema_l0 - k) > 0.5 * k, f"the EMA was expected to miss here: L0 {ema_l0} for k {k}"
    assert abs(calibrated_l0 - k) < 0.1 * k, f"calibrated L0 {calibrated_l0} for k {k}"


def test_the_threshold_is_the_kn_plus_first_largest_candidate():
    values = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    expected = float(values.topk(3 * 100 + 1).values.min())
    assert calibrated_threshold(values, num_tokens=100, k_per_token=3) == expected
    assert calibrated_threshold(values[:250], num_tokens=100, k_per_token=3) == 0.0  # fewer positives: ReLU
