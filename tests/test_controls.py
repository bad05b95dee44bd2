"""The Figure-3 control differs from what it controls in exactly one thing: the frozen core's
directions. Same initialisation path (DMSAEModel.from_core), same shapes, same norms, same seed
policy; the baseline takes the same path with no core."""

from __future__ import annotations

import torch
from accelerate.utils import set_seed

from trainer.config import parse_config
from trainer.run.kinds import BASELINE, DMSAE, RANDOM_CORE, Core, SAEKind
from trainer.pipeline.transfer import initial_model
from trainer.run.stages import FinalSAE

D, K, C = 64, 512, 24


def distilled_core() -> Core:
    """Trained encoder rows are not unit vectors: norms between 1 and 1.4, as in the default run."""
    generator = torch.Generator().manual_seed(1)
    directions = torch.nn.functional.normalize(torch.randn(C, D, generator=generator), dim=-1)
    return Core(directions * (1 + 0.4 * torch.rand(C, 1, generator=generator)), [[3, j] for j in range(C)])


def start(kind: SAEKind, core: Core):
    config = parse_config(["--dictionary.num_latents", str(K), "--cycles.k", "16"])
    set_seed(0)  # what the stage's name seeds in a run: here the same for both, to compare them tensor by tensor
    return initial_model(config, FinalSAE(kind, 16), core, D, normalization_factor=2.0)


def decoder_to_frozen_cosines(model) -> torch.Tensor:
    c = model.config.core_size
    return torch.nn.functional.cosine_similarity(model.W_dec.detach()[:c], model.core_encoder, dim=-1)


def test_the_random_core_differs_from_the_distilled_one_only_in_its_directions():
    core = distilled_core()
    distilled, random = start(DMSAE, core), start(RANDOM_CORE, core)
    assert torch.equal(distilled.core_encoder, core.directions)
    assert not torch.allclose(random.core_encoder, core.directions)
    torch.testing.assert_close(random.core_encoder.norm(dim=-1), core.directions.norm(dim=-1))
    overlap = torch.nn.functional.cosine_similarity(random.core_encoder, core.directions, dim=-1).abs()
    assert overlap.max() < 0.6, "the random directions are not independent of the distilled ones"
    for name, tensor in distilled.state_dict().items():
        if name != "core_encoder":
            assert torch.equal(random.state_dict()[name], tensor), name
    random_fields, distilled_fields = random.config.to_dict(), distilled.config.to_dict()
    assert {n for n in distilled_fields if random_fields[n] != distilled_fields[n]} == {"core_lineage"}


def test_both_cores_start_with_decoders_unrelated_to_their_frozen_rows():
    """The tied initialisation the control once had (decoder = frozen rows, cosine 1) made it a
    working autoencoder from step 0; now neither core's decoder knows its frozen rows."""
    core = distilled_core()
    for kind in (DMSAE, RANDOM_CORE):
        cosines = decoder_to_frozen_cosines(start(kind, core))
        assert cosines.abs().median() < 0.2, (kind.name, cosines.median())


def test_the_baseline_takes_the_same_path_without_a_core():
    baseline = start(BASELINE, distilled_core())
    assert baseline.config.core_size == 0 and baseline.config.core_lineage == []
    assert sum(baseline.config.group_sizes) == K
