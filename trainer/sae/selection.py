"""Attribution-guided core selection (paper, Eq. 6-7 and Algorithm 2).

For sampled token positions u with activation x_u and next-token-loss gradient g_u (from the
base model, no SAE spliced in):

    a_uj  = f~_j(x_u)                 latents masked exactly as in training (the model's own code)
    s_uj  = g_u . W_dec[j] / ||W_dec[j]||
    GxA_uj = |a_uj s_uj|
    A_j   = Quantile_q over u of GxA_uj            (Eq. 6; inactive positions count as 0)
    C     = shortest prefix of the candidates sorted by descending A_j whose A-sum
            reaches tau * sum_{j in P} A_j          (Eq. 7)

The candidate pool P is the most nested reconstruction, core + prefix-0: latents
[0, c + m_0). Ties in A_j are broken by the lower latent index, so the result is deterministic;
latents with A_j = 0 are never needed to reach the coverage unless the total is 0, which is an
error (nothing in the pool fired on the sample).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from modeling_dmsae import DMSAEModel
from trainer.errors import ConfigError


class CoreSelection(NamedTuple):
    """The ordered core C(t) and everything needed to explain it."""

    selected: list[int]
    """Latent indices (in the scored model's dictionary), by descending attribution."""
    scores: list[float]
    """A_j of the selected latents, same order."""
    pool_scores: torch.Tensor
    """A_j of every candidate in P, indexed by latent."""
    coverage_curve: torch.Tensor
    """Cumulative fraction of the total attribution covered by the top-r candidates, r = 1..|P|."""


def quantile_with_implicit_zeros(
    latent_ids: torch.Tensor, values: torch.Tensor, num_latents: int, num_samples: int, q: float
) -> torch.Tensor:
    """Per-latent q-quantile (linear interpolation, as torch.quantile) over ``num_samples``
    samples, given only the non-zero samples as (latent_ids, values) pairs; every other sample
    is 0. Memory is O(non-zeros), not O(samples x latents)."""
    order = torch.argsort(values, stable=True)
    order = order[torch.argsort(latent_ids[order], stable=True)]  # by latent, ascending value
    sorted_values = values[order]
    counts = torch.bincount(latent_ids, minlength=num_latents)
    starts = torch.cumsum(counts, 0) - counts
    zeros = num_samples - counts

    padded = torch.cat([sorted_values, values.new_zeros(1)])  # the last slot stands for an implicit zero

    def value_at_rank(rank: int) -> torch.Tensor:
        offset = rank - zeros  # position among the latent's sorted non-zeros when >= 0
        return padded[torch.where(offset >= 0, starts + offset, len(sorted_values))]

    position = q * (num_samples - 1)
    low, high = math.floor(position), math.ceil(position)
    low_value, high_value = value_at_rank(low), value_at_rank(high)
    return low_value + (high_value - low_value) * (position - low)


def gradient_times_activation(
    model: DMSAEModel, x: torch.Tensor, g: torch.Tensor, pool_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Non-zero GxA_uj of one attribution batch, restricted to the pool [0, pool_size).

    Returns (token ids, latent ids, values). Activations are those of training: BatchTopK over
    this batch (``use_threshold=False``), in the units of x (the normalisation factor undone).
    """
    with torch.no_grad():
        latents = model.encode_sparse(model.normalize_activations(x), use_threshold=False)[0]
        in_pool = latents.cols < pool_size
        rows, cols = latents.rows[in_pool], latents.cols[in_pool]
        activations = latents.values[in_pool] * model.config.normalization_factor
        directions = torch.nn.functional.normalize(model.W_dec[:pool_size].float(), dim=-1)
        projections = (g[rows].float() * directions[cols]).sum(-1)  # s_uj on the active entries only
        return rows, cols, (activations.float() * projections).abs()


def attribution_scores(
    model: DMSAEModel, x: torch.Tensor, g: torch.Tensor, pool_size: int, q: float, batch_size: int
) -> torch.Tensor:
    """A_j (Eq. 6) for the candidates [0, pool_size), from an (x, g) sample [U, d] each."""
    if x.shape != g.shape:
        raise ValueError(f"attribution sample mismatch: x is {tuple(x.shape)}, g is {tuple(g.shape)}")
    device = model.W_dec.device
    latent_ids, values = [], []
    for start in range(0, x.shape[0], batch_size):
        _, cols, gxa = gradient_times_activation(
            model, x[start : start + batch_size].to(device), g[start : start + batch_size].to(device), pool_size
        )
        latent_ids.append(cols)
        values.append(gxa)
    return quantile_with_implicit_zeros(torch.cat(latent_ids), torch.cat(values), pool_size, x.shape[0], q)


def select_by_coverage(pool_scores: torch.Tensor, tau: float) -> CoreSelection:
    """Eq. 7: the shortest prefix of the candidates sorted by descending score (ties: lower
    index first) whose scores sum to at least tau of the total."""
    if not 0 < tau <= 1:
        raise ValueError(f"coverage tau must be in (0, 1], got {tau}")
    scores = pool_scores.double().cpu()
    total = scores.sum()
    if not total > 0:
        raise ConfigError(
            "no candidate latent has a positive attribution score: nothing in core + prefix-0 fired on the "
            "attribution sample. Use a larger attribution sample, or check that the SAE is trained"
        )
    order = torch.argsort(-scores, stable=True)
    coverage = torch.cumsum(scores[order], 0) / total
    # Guard the comparison against summation rounding: coverage 1.0 must reach tau = 1.0.
    size = int(torch.searchsorted(coverage, torch.tensor([tau - 1e-12], dtype=torch.float64))[0]) + 1
    selected = order[:size]
    return CoreSelection(
        selected=selected.tolist(),
        scores=scores[selected].tolist(),
        pool_scores=pool_scores.cpu(),
        coverage_curve=coverage.float(),
    )


def select_core(
    model: DMSAEModel, x: torch.Tensor, g: torch.Tensor, q: float, tau: float, batch_size: int
) -> CoreSelection:
    """Algorithm 2 on a model: score core + prefix-0 and select the next core."""
    pool_size = model.config.core_size + model.config.group_sizes[0]
    return select_by_coverage(attribution_scores(model, x, g, pool_size, q, batch_size), tau)


def distilled_core(final_selected: Sequence[int], final_core_size: int) -> list[int]:
    """Eq. 8: C* = C(T) ∩ C(T-1): the latents of cycle T's core positions [0, c_T) (which hold
    C(T-1)) that cycle T selects again, in cycle T's score order."""
    return [j for j in final_selected if j < final_core_size]
