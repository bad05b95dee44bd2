"""Latents from text (``DMSAEModel.latents_from_text``): what a hand-written hook and ``encode`` give
at the positions the SAE reads, zeros at padding, BOS and massive-norm positions; the sparse forms."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model

from modeling_dmsae import DMSAEConfig, DMSAEModel, TextLatents

HOOK = "model.layers.1"
PLANTED = 40  # a token whose embedding is scaled up so that its activation norm is massive


def tiny_sae(**overrides) -> DMSAEModel:
    torch.manual_seed(0)
    fields = dict(d_in=32, num_latents=64, group_sizes=[16, 48], k=4, hook_module=HOOK, normalization_factor=3.0, threshold=0.05)
    return DMSAEModel(DMSAEConfig(**{**fields, **overrides})).eval().requires_grad_(False)


def model_with_a_massive_token():
    model = tiny_model()
    with torch.no_grad():
        model.get_input_embeddings().weight[PLANTED] *= 500
    return model


def hand_hooked(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The hooked module's output, read with a plain forward hook."""
    captured = []
    handle = model.get_submodule(HOOK).register_forward_hook(lambda module, args, output: captured.append(output))
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask)
    handle.remove()
    return captured[0]


# Row 0: BOS, tokens, the planted token, tokens. Row 1: no BOS, tokens, two pads on the right.
INPUT_IDS = torch.tensor([[0, 5, 9, 17, PLANTED, 33, 41, 60], [7, 8, 9, 10, 11, 12, 2, 2]])
ATTENTION_MASK = torch.tensor([[1] * 8, [1] * 6 + [0, 0]])
EXPECTED_KEPT = torch.tensor([[0, 1, 1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)


def test_latents_equal_hand_hooking_and_encode_at_the_kept_positions_and_zero_elsewhere():
    model, sae = model_with_a_massive_token(), tiny_sae()
    out = sae.latents_from_text(model, INPUT_IDS, ATTENTION_MASK)
    assert isinstance(out, TextLatents) and out.latents.shape == (2, 8, 64)
    assert torch.equal(out.kept, EXPECTED_KEPT)  # BOS, the planted massive-norm token and the pads left out
    hidden = hand_hooked(model, INPUT_IDS, ATTENTION_MASK)
    torch.testing.assert_close(out.latents[EXPECTED_KEPT], sae.encode(hidden[EXPECTED_KEPT]))
    assert (out.latents[EXPECTED_KEPT] > 0).any()  # the comparison compares something
    assert not out.latents[~EXPECTED_KEPT].any()


def test_bos_is_read_when_the_sae_was_trained_on_it_and_the_norm_rule_can_be_off():
    model = model_with_a_massive_token()
    kept = tiny_sae(mask_bos=False, max_norm_ratio=0.0).latents_from_text(model, INPUT_IDS, ATTENTION_MASK).kept
    assert torch.equal(kept, ATTENTION_MASK.bool())


def test_left_padding_moves_the_bos_rule_to_the_first_real_token():
    ids = torch.tensor([[2, 2, 0, 5, 9, 17]])
    kept = tiny_sae(max_norm_ratio=0.0).latents_from_text(tiny_model(), ids, torch.tensor([[0, 0, 1, 1, 1, 1]])).kept
    assert kept.tolist() == [[False, False, False, True, True, True]]


def test_batchtopk_keeps_k_per_kept_token_over_the_batch():
    out = tiny_sae().latents_from_text(model_with_a_massive_token(), INPUT_IDS, ATTENTION_MASK, use_threshold=False)
    assert int((out.latents > 0).sum()) == 4 * int(EXPECTED_KEPT.sum())


def test_top_agrees_with_the_dense_latents_and_the_sparse_form_with_the_dense():
    model, sae = model_with_a_massive_token(), tiny_sae(threshold=0.0)  # ReLU alone: many latents per token
    dense = sae.latents_from_text(model, INPUT_IDS, ATTENTION_MASK)
    sparse = sae.latents_from_text(model, INPUT_IDS, ATTENTION_MASK, sparse=True)
    assert sparse.latents.is_sparse and torch.equal(sparse.latents.to_dense(), dense.latents)
    assert sparse.latents._nnz() == int((dense.latents > 0).sum())
    n = 5
    expected = dense.latents.topk(n, dim=-1)
    for out in (dense, sparse):
        values, indices = out.top(n)
        assert values.shape == indices.shape == (2, 8, n)
        torch.testing.assert_close(values, expected.values)
        firing = values > 0
        assert torch.equal(indices[firing], expected.indices[firing])
        assert (indices[~firing] == -1).all() and (~firing[~EXPECTED_KEPT]).all()
    active = (dense.latents > 0).sum(-1)
    assert active[EXPECTED_KEPT].min() > n  # every kept position has more than n active latents


def test_top_marks_the_slots_beyond_the_active_latents():
    latents = torch.zeros(1, 2, 6)
    latents[0, 0, 4], latents[0, 0, 1] = 2.0, 3.0
    values, indices = TextLatents(latents, torch.ones(1, 2, dtype=torch.bool)).top(3)
    assert values.tolist() == [[[3.0, 2.0, 0.0], [0.0, 0.0, 0.0]]]
    assert indices.tolist() == [[[1, 4, -1], [-1, -1, -1]]]
    with pytest.raises(ValueError, match="integer in"):
        TextLatents(latents, torch.ones(1, 2, dtype=torch.bool)).top(7)


def test_bad_inputs_get_one_line_errors_naming_the_fix():
    model, sae = tiny_model(), tiny_sae()
    with pytest.raises(ValueError, match="return_tensors='pt'"):
        sae.latents_from_text(model, [[0, 5, 9]])
    with pytest.raises(ValueError, match="pass the mask the tokenizer returned"):
        sae.latents_from_text(model, INPUT_IDS, ATTENTION_MASK[:, :4])
    with pytest.raises(ValueError, match="has no module 'model.layers.9'"):
        tiny_sae(hook_module="model.layers.9").latents_from_text(model, INPUT_IDS)
    with pytest.raises(ValueError, match="no inference threshold"):
        tiny_sae(threshold=-1.0).latents_from_text(model, INPUT_IDS)
    assert not model.get_submodule(HOOK)._forward_hooks  # nothing left behind


def test_the_forward_stops_at_the_hooked_module():
    model, sae = tiny_model(), tiny_sae()
    ran = []
    handle = model.get_submodule("model.layers.2").register_forward_hook(lambda *args: ran.append(True))
    sae.latents_from_text(model, INPUT_IDS)
    handle.remove()
    assert not ran
