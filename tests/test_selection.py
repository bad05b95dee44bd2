"""Algorithm 2 (attribution-guided selection) and Eq. 8 (the distilled core)."""

from __future__ import annotations

import pytest
import torch

from modeling_dmsae import DMSAEConfig, DMSAEModel
from trainer.sae.selection import (
    attribution_scores,
    distilled_core,
    quantile_with_implicit_zeros,
    select_by_coverage,
    select_core,
)


def test_quantile_with_implicit_zeros_matches_torch_quantile():
    torch.manual_seed(0)
    dense = torch.rand(101, 7) * (torch.rand(101, 7) < 0.2)
    dense[:, 3] = 0  # a latent that never fires
    dense[:, 5] = 1.0  # one that always fires with a tie everywhere
    rows, cols = dense.nonzero(as_tuple=True)
    for q in (0.0, 0.5, 0.9, 0.99, 1.0):
        ours = quantile_with_implicit_zeros(cols, dense[rows, cols], 7, 101, q)
        torch.testing.assert_close(ours, torch.quantile(dense, q, dim=0))


def test_coverage_selection_hand_computed():
    # scores 4, 3, 2, 1, 0 (shuffled, with a tie): total 10; tau = 0.65 needs 4 + 3 (0.7 >= 0.65).
    scores = torch.tensor([2.0, 0.0, 4.0, 1.0, 3.0])
    selection = select_by_coverage(scores, tau=0.65)
    assert selection.selected == [2, 4]
    assert selection.scores == [4.0, 3.0]
    torch.testing.assert_close(selection.coverage_curve, torch.tensor([0.4, 0.7, 0.9, 1.0, 1.0]))
    # exactly reaching tau counts: 4 + 3 + 2 = 9 = 0.9 * 10
    assert select_by_coverage(scores, tau=0.9).selected == [2, 4, 0]
    # tau = 1 never needs the zero-score latent
    assert select_by_coverage(scores, tau=1.0).selected == [2, 4, 0, 3]


def test_coverage_ties_break_by_lower_index():
    scores = torch.tensor([1.0, 2.0, 2.0, 2.0])
    assert select_by_coverage(scores, tau=0.5).selected == [1, 2]


def test_all_zero_attribution_is_a_clear_error():
    with pytest.raises(ValueError, match="no candidate latent has a positive attribution"):
        select_by_coverage(torch.zeros(4), tau=0.9)


def _model() -> DMSAEModel:
    torch.manual_seed(0)
    config = DMSAEConfig(
        d_in=8, num_latents=40, core_size=4, group_sizes=[6, 10, 20], k=3,
        hook_module="model.layers.0", base_model_id="tiny", normalization_factor=2.0,
    )
    model = DMSAEModel(config)
    with torch.no_grad():
        model.b_enc.normal_(0, 0.2)
        model.W_dec.mul_(3.0)  # non-unit rows: s_uj must use the unit direction
    return model


def test_attribution_scores_follow_algorithm_2_literally():
    model = _model()
    x, g = torch.randn(64, 8), torch.randn(64, 8)
    pool = 4 + 6
    # Algorithm 2 written densely: training masks over the whole sample, GxA, quantile.
    latents = model.encode(x, use_threshold=False) * model.config.normalization_factor
    directions = model.W_dec / model.W_dec.norm(dim=-1, keepdim=True)
    gxa = (latents[:, :pool] * (g @ directions[:pool].T)).abs()
    expected = torch.quantile(gxa, 0.9, dim=0)
    scores = attribution_scores(model, x, g, pool, q=0.9, batch_size=64)
    torch.testing.assert_close(scores, expected.detach(), rtol=1e-5, atol=1e-6)


def test_select_core_uses_core_plus_prefix0_and_reaches_tau():
    model = _model()
    x, g = torch.randn(256, 8), torch.randn(256, 8)
    selection = select_core(model, x, g, q=0.99, tau=0.9, batch_size=128)
    assert len(selection.pool_scores) == 10
    assert all(j < 10 for j in selection.selected)
    covered = sum(selection.scores) / float(selection.pool_scores.sum())
    assert covered >= 0.9
    # minimal: dropping the last selected latent falls short of tau
    assert (covered - selection.scores[-1] / float(selection.pool_scores.sum())) < 0.9
    assert selection.scores == sorted(selection.scores, reverse=True)


def test_gradient_scale_does_not_change_the_selection():
    model = _model()
    x, g = torch.randn(128, 8), torch.randn(128, 8)
    a = select_core(model, x, g, q=0.99, tau=0.9, batch_size=128)
    b = select_core(model, x, 10 * g, q=0.99, tau=0.9, batch_size=128)
    assert a.selected == b.selected


def test_distilled_core_on_constructed_lineage():
    """C* = C(T) ∩ C(T-1): cycle T's selection restricted to its core positions [0, c_T)."""
    torch.manual_seed(0)
    config = DMSAEConfig(d_in=8, num_latents=40, core_size=0, group_sizes=[10, 30], k=3, hook_module="model.layers.0")
    cycle0 = DMSAEModel(config)
    cycle1 = cycle0.next_cycle([7, 2, 9])  # C(0) = {7, 2, 9}
    # C(1): core slots 0 (cycle-0 latent 7) and 2 (cycle-0 latent 9), new cycle-1 latents 5 and 11
    cycle2 = cycle1.next_cycle([0, 5, 2, 11])
    assert cycle2.lineage()[:4].tolist() == [[0, 7], [1, 5], [0, 9], [1, 11]]
    # C(2) re-selects core slots 2 and 3, plus the new cycle-2 latent 6
    final = select_by_coverage(torch.tensor([0.0, 0.0, 5.0, 4.0, 0.0, 0.0, 3.0]), tau=1.0)
    assert final.selected == [2, 3, 6]
    core = distilled_core(final.selected, cycle2.config.core_size)
    assert core == [2, 3]
    assert cycle2.lineage()[core].tolist() == [[0, 9], [1, 11]]
