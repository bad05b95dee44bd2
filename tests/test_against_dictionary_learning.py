"""With c = 0, DMSAEModel is dictionary_learning's Matryoshka BatchTopK SAE: same encode, same
prefix reconstructions, same AuxK, and the same loss up to the documented normalisation of the
prefix terms (we sum them, Eq. 5; dictionary_learning takes the mean of the 1/L-weighted terms).

dictionary_learning is installed with ``pip install --no-deps dictionary-learning==0.1.0 einops``;
``bench.peers`` imports its trainer module without the package's nnsight import.
"""

from __future__ import annotations

import sys

import pytest
import torch

from bench.peers import (
    compare_with_dictionary_learning,
    dictionary_learning_dead_mask,
    dictionary_learning_twin,
    mark_dead,
)
from modeling_dmsae import DMSAEConfig, DMSAEModel


def make_model(seed: int = 0, **overrides) -> DMSAEModel:
    fields = dict(d_in=32, num_latents=512, k=8, hook_module="model.layers.1", base_model_id="tiny-random")
    fields.update(overrides)
    torch.manual_seed(seed)
    model = DMSAEModel(DMSAEConfig(**fields))
    with torch.no_grad():  # non-zero biases, so every term of the encoder and decoder matters
        model.b_enc.normal_(0, 0.1)
        model.b_dec.normal_(0, 0.3)
    return model


def dead_candidates(num_latents: int) -> torch.Tensor:
    return torch.arange(num_latents) % 3 == 0


@pytest.mark.parametrize("with_dead", [False, True])
@pytest.mark.parametrize("batch_size", [96, 1])
def test_encode_prefixes_and_losses_equal_dictionary_learning(with_dead, batch_size):
    model = make_model()
    x = torch.randn(batch_size, 32) * 2
    comparison = compare_with_dictionary_learning(
        model, x, dead_candidates=dead_candidates(512) if with_dead else None
    )
    assert comparison.swapped_at_cut == 0  # seeded batch: no entry sits within rounding of the cut
    num_groups = len(model.config.group_sizes)
    assert comparison.reconstruction_loss == pytest.approx(num_groups**2 * comparison.dictionary_learning_l2_loss, rel=1e-5)
    assert comparison.aux_loss == pytest.approx(comparison.dictionary_learning_aux_loss, rel=1e-5)
    assert (comparison.aux_loss > 0) == with_dead


def test_gradients_equal_dictionary_learning_up_to_prefix_normalisation():
    model = make_model(seed=1)
    x = torch.randn(128, 32)
    num_groups = len(model.config.group_sizes)
    trainer = dictionary_learning_twin(model)
    dead = dictionary_learning_dead_mask(model, x, dead_candidates(512))
    mark_dead(trainer, dead_candidates(512))

    trainer.loss(x, step=0).backward()
    output = model(x, dead_latents=dead, use_threshold=False)
    assert output.aux_loss > 0
    (output.reconstruction_loss / num_groups**2 + model.config.aux_alpha * output.aux_loss).backward()

    theirs = trainer.ae
    for name, ours, reference in [
        ("W_enc", model.encoder.grad, theirs.W_enc.grad.T),
        ("b_enc", model.b_enc.grad, theirs.b_enc.grad),
        ("W_dec", model.W_dec.grad, theirs.W_dec.grad),
        ("b_dec", model.b_dec.grad, theirs.b_dec.grad),
    ]:
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")


def test_paper_group_fractions_and_batch_topk_budget_match():
    """At the SAEBench fractions, both split K the same way and keep k * N latents per batch."""
    model = make_model(seed=2, num_latents=1024, k=16)
    trainer = dictionary_learning_twin(model)
    assert trainer.group_sizes == model.config.group_sizes == [32, 64, 128, 256, 544]
    x = torch.randn(64, 32)
    with torch.no_grad():
        ours = model.encode(x, use_threshold=False)
        theirs = trainer.ae.encode(x, use_threshold=False)
    assert int((ours > 0).sum()) == int((theirs > 0).sum()) == 16 * 64
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_rejects_a_model_with_a_core():
    model = make_model(core_size=16, group_sizes=[16, 32, 64, 128, 256])
    with pytest.raises(ValueError, match="no core"):
        dictionary_learning_twin(model)


def test_trainer_module_loads_without_nnsight():
    dictionary_learning_twin(make_model())
    assert "dictionary_learning.trainers.matryoshka_batch_top_k" in sys.modules
    assert "nnsight" not in sys.modules


# ---- BatchTopK's cut, as dictionary_learning takes it: flat.topk(k * N) -----------------------


def reference_batch_topk(acts: torch.Tensor, k: int) -> torch.Tensor:
    """dictionary_learning's BatchTopK: the k * N largest positive entries of the flattened batch,
    as sorted flat indices."""
    flat = acts.flatten().topk(k * acts.shape[0]).indices
    return flat[acts.flatten()[flat] > 0].sort().values


def test_batch_topk_cut_when_the_sample_misses_the_largest_entries():
    """The cut is estimated from a strided sample; when the sample over-estimates it (here the
    sampled grid holds larger values than the rest), the bound is lowered until every kept entry
    is a candidate, and the result is still exactly BatchTopK's."""
    from modeling_dmsae.modeling_dmsae import batch_topk_entries

    generator = torch.Generator().manual_seed(0)
    acts = torch.rand(1024, 4096, generator=generator) * 0.1
    acts[::2, ::2] += 0.5 + 0.5 * torch.rand(512, 2048, generator=generator)  # the sampled grid
    rows, cols, smallest = batch_topk_entries(acts, k_per_token=512)
    assert torch.equal(rows * 4096 + cols, reference_batch_topk(acts, 512))  # also sorted by token
    assert smallest == acts[rows, cols].min()


def test_batch_topk_keeps_every_positive_entry_below_the_budget_and_the_whole_core():
    from modeling_dmsae.modeling_dmsae import batch_topk_entries

    acts = torch.zeros(64, 128)
    acts[3, 70], acts[9, 100], acts[9, 101] = 1.0, 2.0, 3.0  # 3 positive entries, budget 2 * 64
    acts[:, :16] = torch.rand(64, 16) + 0.1  # a dense core, never masked
    rows, cols, smallest = batch_topk_entries(acts, k_per_token=2, unmasked_columns=16)
    expected = torch.zeros(64, 128, dtype=torch.bool)
    expected[:, :16] = True
    expected[3, 70] = expected[9, 100] = expected[9, 101] = True
    assert torch.equal(rows * 128 + cols, expected.flatten().nonzero().squeeze(1))
    assert smallest == 1.0
