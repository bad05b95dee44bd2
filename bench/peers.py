"""The peer implementations the benchmark times and the numerics checks compare against.

dictionary_learning (saprmarks/dictionary_learning 0.1.0) trained the SAEBench Matryoshka
baselines; its trainer module needs only torch and einops, but the package's ``__init__``
imports nnsight (for its activation buffer). ``load_dictionary_learning_matryoshka`` imports the
trainer module alone, so neither the tests nor the benchmark need nnsight.

Documented differences from dictionary_learning's Matryoshka loss, everything else equal:
- prefix terms: we SUM the L prefix terms (paper, Eq. 5). dictionary_learning weights each term
  by group_weights = 1/L and then takes the mean of the weighted terms, i.e. sum / L^2. So our
  reconstruction loss is L^2 times its ``l2_loss``, and our gradients L^2 times its.
- AuxK dead latents: the model takes the dead mask it is given; dictionary_learning's trainer
  updates its firing counters first, so a latent that fires in the current batch is never dead
  for that batch's AuxK. The comparison hands us the mask dictionary_learning ends up with.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import NamedTuple

import torch

from modeling_dmsae import DMSAEModel

DICTIONARY_LEARNING_INSTALL = "pip install --no-deps dictionary-learning==0.1.0 einops"


def load_dictionary_learning_matryoshka() -> types.ModuleType:
    """``dictionary_learning.trainers.matryoshka_batch_top_k``, without running the package's
    ``__init__`` files: they are replaced by bare package modules pointing at the same folders."""
    module_name = "dictionary_learning.trainers.matryoshka_batch_top_k"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.find_spec("dictionary_learning")  # locates the package, runs nothing
    if spec is None or spec.origin is None:
        raise ImportError(f"dictionary_learning is not installed; install it with: {DICTIONARY_LEARNING_INSTALL}")
    package_dir = Path(spec.origin).parent
    for name, folder in (("dictionary_learning", package_dir), ("dictionary_learning.trainers", package_dir / "trainers")):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [str(folder)]
            sys.modules[name] = package
    return importlib.import_module(module_name)


def dictionary_learning_twin(model: DMSAEModel, total_steps: int = 100_000):
    """dictionary_learning's ``MatryoshkaBatchTopKTrainer`` for ``model``'s shape, its SAE holding
    ``model``'s weights. Only for c = 0: dictionary_learning has no core."""
    config = model.config
    if config.core_size != 0:
        raise ValueError(f"dictionary_learning has no core: compare a c = 0 model, got core_size={config.core_size}")
    matryoshka = load_dictionary_learning_matryoshka()
    trainer = matryoshka.MatryoshkaBatchTopKTrainer(
        steps=total_steps,
        activation_dim=config.d_in,
        dict_size=config.num_latents,
        k=config.k,
        layer=config.hook_layer,
        lm_name=config.base_model_id,
        group_fractions=[size / config.num_latents for size in config.group_sizes],
        device=str(model.W_dec.device),
    )
    if trainer.group_sizes != list(config.group_sizes):
        raise ValueError(f"dictionary_learning rounded the groups to {trainer.group_sizes}, ours are {config.group_sizes}")
    with torch.no_grad():
        # W_enc keeps our [K, d] memory layout, so both encoders run the same GEMM.
        trainer.ae.W_enc.data = model.encoder_weight.detach().T.clone()
        trainer.ae.b_enc.data = model.b_enc.detach().clone()
        trainer.ae.W_dec.data = model.W_dec.detach().clone()
        trainer.ae.b_dec.data = model.b_dec.detach().clone()
    return trainer


class Comparison(NamedTuple):
    """How our c = 0 model compares with dictionary_learning's trainer on one batch (all passed)."""

    latent_difference: float
    """max |f~ ours - f~ theirs| over the entries both keep."""
    swapped_at_cut: int
    """entries one side keeps and the other drops; all lie within fp32 tolerance of the BatchTopK cut."""
    prefix_difference: float
    """max |x^_m ours - x^_m theirs| over every prefix, token and dimension."""
    reconstruction_loss: float
    """ours: sum of the prefix terms."""
    dictionary_learning_l2_loss: float
    """theirs: mean of the 1/L-weighted prefix terms (ours / L^2)."""
    aux_loss: float
    dictionary_learning_aux_loss: float


def dictionary_learning_dead_mask(model: DMSAEModel, activations: torch.Tensor, dead_candidates: torch.Tensor) -> torch.Tensor:
    """The dead latents dictionary_learning's AuxK uses when ``dead_candidates`` had gone long
    enough without firing: those that do not fire on this batch either."""
    with torch.no_grad():
        fired = model(activations, use_threshold=False, output_dense_latents=False).fired
    return dead_candidates & ~fired


def mark_dead(trainer, dead_candidates: torch.Tensor) -> None:
    """Make ``dead_candidates`` look unfired for the dead-latent window in dictionary_learning's trainer."""
    trainer.num_tokens_since_fired[dead_candidates] = trainer.dead_feature_threshold


def compare_with_dictionary_learning(
    model: DMSAEModel,
    activations: torch.Tensor,
    dead_candidates: torch.Tensor | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> Comparison:
    """Our BatchTopK encode, prefix reconstructions and losses against dictionary_learning's on the
    same weights and batch (c = 0). Raises AssertionError beyond fp32 tolerance.

    The two encoders round the pre-activations differently in the last bit, so an entry within
    that distance of the BatchTopK cut may be kept by one side only; such swaps are checked to lie
    at the cut and counted, and the prefixes are then compared on our latents.
    """
    trainer = dictionary_learning_twin(model)
    ae, config = trainer.ae, model.config
    x = model.normalize_activations(activations)
    num_groups = len(config.group_sizes)
    dead = None
    if dead_candidates is not None:
        dead = dictionary_learning_dead_mask(model, activations, dead_candidates)
        mark_dead(trainer, dead_candidates)
    with torch.no_grad():
        ours = model(activations, dead_latents=dead, use_threshold=False)
        our_latents = ours.latents.reshape(x.shape[0], -1)
        their_latents = ae.encode(x, use_threshold=False)
        their_log = trainer.loss(x, step=0, logging=True).losses

        swapped = (our_latents > 0) != (their_latents > 0)
        if swapped.any():
            pre_activations = torch.relu((x - ae.b_dec) @ ae.W_enc + ae.b_enc)[swapped]
            torch.testing.assert_close(
                pre_activations, ours.batchtopk_threshold.expand_as(pre_activations), rtol=rtol, atol=atol,
                msg="BatchTopK kept different latents, and not only at the cut",
            )
        kept_by_both = ~swapped & (our_latents > 0)
        torch.testing.assert_close(our_latents[kept_by_both], their_latents[kept_by_both], rtol=rtol, atol=atol)

        decoded = their_latents if not swapped.any() else our_latents
        column = torch.arange(config.num_latents, device=x.device)
        their_prefixes = torch.stack(
            [ae.decode(torch.where(column < width, decoded, 0.0)) for width in config.prefix_sizes]
        )
        our_prefixes = model.decode_prefixes(ours.sparse_latents, x.shape[0])
        torch.testing.assert_close(our_prefixes, their_prefixes, rtol=rtol, atol=atol)

    their_l2 = their_log["l2_loss"] * num_groups**2
    torch.testing.assert_close(ours.reconstruction_loss.item(), their_l2, rtol=rtol, atol=atol)
    torch.testing.assert_close(ours.aux_loss.item(), float(their_log["auxk_loss"]), rtol=rtol, atol=atol)
    return Comparison(
        latent_difference=float((our_latents - their_latents)[kept_by_both].abs().max()),
        swapped_at_cut=int(swapped.sum()),
        prefix_difference=float((our_prefixes - their_prefixes).abs().max()),
        reconstruction_loss=ours.reconstruction_loss.item(),
        dictionary_learning_l2_loss=their_log["l2_loss"],
        aux_loss=ours.aux_loss.item(),
        dictionary_learning_aux_loss=float(their_log["auxk_loss"]),
    )
