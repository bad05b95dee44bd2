"""Per-latent evidence: the streamed statistics and examples equal what the dense [tokens, K]
latents give, and every window's centre is the example's own activation."""

import math

import torch

from modeling_dmsae import DMSAEConfig, DMSAEModel
from modeling_dmsae import evidence as ev
from modeling_dmsae.evidence import EvidenceStream
from trainer.sae.metrics import reconstruction_metrics


def _sae(core_size: int, variant: str = "dense_core") -> DMSAEModel:
    torch.manual_seed(0)
    config = DMSAEConfig(d_in=16, num_latents=64, core_size=core_size, k=6, variant=variant, threshold=0.05)
    sae = DMSAEModel(config).eval()
    with torch.no_grad():
        sae.b_enc.uniform_(-0.3, 0.1)
    return sae


def _held_out(contexts: int = 12, length: int = 20):
    """Activations of the kept positions of ``contexts`` contexts (position 0 and a few others dropped)."""
    generator = torch.Generator().manual_seed(1)
    kept = torch.rand(contexts, length, generator=generator) > 0.15
    kept[:, 0] = False
    slots = kept.flatten().nonzero().squeeze(1)
    activations = torch.randn(slots.numel(), 16, generator=generator) * 2
    tokens = torch.randint(0, 100, (contexts, length), generator=generator)
    return activations, slots, tokens


def _evidence(sae: DMSAEModel, batch_size: int = 17):
    activations, slots, tokens = _held_out()
    stream = EvidenceStream(sae.config.num_latents, torch.device("cpu"))
    reconstruction_metrics(sae, activations.split(batch_size), stream.add)
    effect = tuple(torch.zeros(sae.config.num_latents, ev.LOGIT_TOKENS) for _ in range(4))
    return stream.finish(sae, activations, slots, tokens, effect), activations, slots


def test_streamed_statistics_and_top_examples_equal_the_dense_latents():
    for sae in (_sae(8), _sae(0, "sparse_core")):
        evidence, activations, slots = _evidence(sae)
        dense = sae.encode(activations).detach()  # [tokens, K], inference mode
        firing = dense > 0
        assert torch.allclose(evidence.firing_frequency, firing.float().mean(0))
        assert torch.allclose(evidence.max_activation, dense.max(0).values)
        mean = dense.sum(0) / firing.sum(0).clamp_min(1)
        assert torch.allclose(evidence.mean_activation, mean, atol=1e-6)
        assert torch.equal(evidence.histogram.sum(1), firing.sum(0).int())
        n = ev.TOP_N
        for j in range(sae.config.num_latents):
            fired = int(firing[:, j].sum())
            expected = dense[:, j].sort(descending=True).values[: min(n, fired)]
            got = evidence.example_activation[j, :n][evidence.example_context[j, :n] >= 0]
            assert torch.allclose(got, expected), j
        assert (evidence.example_context[:, :n] >= 0).sum() == firing.sum(0).clamp_max(n).sum()


def test_windows_centre_on_the_example_and_show_the_latent_around_it():
    sae = _sae(8)
    evidence, activations, slots = _evidence(sae)
    dense = sae.encode(activations).detach()
    length = 20
    row_of = {int(s): r for r, s in enumerate(slots)}
    K, E, W = evidence.window_activations.shape
    assert (E, W) == (ev.TOP_N + len(ev.QUANTILES), ev.window_length())
    checked = 0
    for j in range(K):
        for e in range(E):
            context, position = int(evidence.example_context[j, e]), int(evidence.example_position[j, e])
            if context < 0:
                assert evidence.window_activations[j, e].isnan().all()
                continue
            for w, offset in enumerate(range(-ev.WINDOW_BEFORE, ev.WINDOW_AFTER + 1)):
                p = position + offset
                row = row_of.get(context * length + p) if 0 <= p < length else None
                value = float(evidence.window_activations[j, e, w])
                if row is None:
                    assert math.isnan(value)
                else:
                    assert abs(value - float(dense[row, j])) <= 2e-3 * max(1.0, abs(value)), (j, e, w)
                    checked += 1
            assert abs(float(evidence.window_activations[j, e, ev.WINDOW_BEFORE]) - float(evidence.example_activation[j, e])) < 2e-3
    assert checked > 1000


def test_quantile_examples_are_firings_in_rising_order():
    evidence, activations, slots = _evidence(_sae(8))
    quantiles = evidence.example_activation[:, ev.TOP_N :]
    present = evidence.example_context[:, ev.TOP_N :] >= 0
    assert present.any()
    assert (quantiles[present] > 0).all()
    rows_with_all = present.all(1)
    assert (quantiles[rows_with_all].diff(dim=1) >= 0).all()
    assert (quantiles.max(1).values <= evidence.max_activation + 1e-6).all()


def test_the_result_does_not_depend_on_the_batch_size_and_merges_bound_the_buffer():
    sae = _sae(8)
    small, _, _ = _evidence(sae, batch_size=5)
    large, _, _ = _evidence(sae, batch_size=200)
    assert torch.allclose(small.example_activation[:, : ev.TOP_N], large.example_activation[:, : ev.TOP_N], atol=1e-5)
    top = ev._TopPerLatent(4, 3, torch.device("cpu"))
    for step in range(50):
        values = torch.rand(40)
        top.add(torch.randint(0, 4, (40,)), values, values, torch.arange(40) + 40 * step)
        assert top.pending_size < top.keys.numel()


def test_evidence_size_at_the_papers_shape_is_a_small_part_of_the_sae():
    K, d = 65_536, 2304
    assert ev.evidence_bytes(K) < 0.1 * (2 * K * d * 4)


def test_logit_effect_finds_the_token_a_direction_writes_through_the_models_own_norm():
    """A decoder row along (unembedding row t) / (the final norm's gain) promotes t most; its
    negative suppresses t most. Gemma 2 scales by (1 + weight): the model's own norm module is used."""
    from tiny_models import tiny_model

    for architecture in ("llama", "gemma2"):
        model = tiny_model(architecture)
        with torch.no_grad():
            model.model.norm.weight.copy_(torch.rand(32) * 2)  # gains from 0 to 2 (Gemma 2: 1 to 3)
        gain = model.model.norm(torch.ones(1, 32)).squeeze(0)  # an RMSNorm of ones is its gain
        unembedding = model.get_output_embeddings().weight
        targets = torch.tensor([5, 77, 200])
        sae = DMSAEModel(DMSAEConfig(d_in=32, num_latents=6, group_sizes=[6], k=2))
        with torch.no_grad():
            directions = unembedding[targets] / gain
            sae.W_dec.copy_(torch.cat([directions, -directions]))
            sae.normalize_decoder_()
        effect = ev.top_logit_effects(sae, model, num_tokens=3, rows_per_block=4)
        assert effect.promoted_tokens[:3, 0].tolist() == targets.tolist(), architecture
        assert effect.suppressed_tokens[3:, 0].tolist() == targets.tolist(), architecture
        assert (effect.promoted_logits[:, 0] >= effect.promoted_logits[:, 1]).all()
        assert (effect.suppressed_logits[:, 0] <= effect.suppressed_logits[:, 1]).all()
