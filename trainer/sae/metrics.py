"""Held-out metrics of an SAE: reconstruction, sparsity, dead latents and spliced next-token loss.

All in inference mode (the calibrated threshold, one token at a time as users run it; BatchTopK
over the evaluation batch for an SAE that has no threshold, e.g. an imported checkpoint without one).

    FVE            = 1 - sum_u ||x_u - x^_u||^2 / sum_u ||x_u - mean(x)||^2
    MSE            = mean over tokens and dimensions of (x - x^)^2
    L0_core / L0_noncore / L0 = mean active latents per token (Eq. 9)
    dead_fraction  = latents that never fire on the held-out tokens / K (eval.tokens sizes the
                     held-out set: with 32,768 tokens a latent that fires once in 10,000 tokens
                     is counted dead by chance with probability (1 - 1e-4)^32768 = 4%)
    loss_recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean), CE = mean next-token loss
                     with the hooked activations left alone (clean), replaced by the SAE
                     reconstruction (spliced) or by zeros (zero-ablated)

Feature consistency across two SAEs (the paper's second contribution), on decoder directions:

    max_cos_j      = max over latents i of SAE B of cos(W_dec_A[j], W_dec_B[i]), for latent j of A
    matched        = latents j with max_cos_j >= 0.9, reported for j < c (the core) and j >= c

``evaluate`` is not used for these: its metrics collect predictions and references into Arrow
tables, which for [tokens, d] float activations means copying every activation off the
accelerator; the running sums below stream instead. The numbers feed the model cards'
model-index through huggingface_hub's ``EvalResult`` directly.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn
from transformers import PreTrainedModel

from modeling_dmsae import DMSAEModel, DMSAEOutput
from trainer.errors import ConfigError
from trainer.harvest.base_model import mean_next_token_loss


def _uses_threshold(sae: DMSAEModel) -> bool:
    return sae.config.threshold >= 0


@torch.no_grad()
def reconstruction_metrics(
    sae: DMSAEModel, batches: Iterable[torch.Tensor], on_batch: Callable[[DMSAEOutput, int], None] | None = None
) -> dict[str, float]:
    """FVE, MSE, L0 (core, core above the inference threshold, non-core, all) and the dead fraction over held-out [N, d] batches;
    ``on_batch(output, first_row)`` sees every batch's SAE output (the per-latent evidence reads
    the same forward pass: ``trainer.sae.evidence.EvidenceStream.add``)."""
    device, c = sae.W_dec.device, sae.config.core_size
    squared_error = total = total_sq = 0.0
    tokens = core_active = noncore_active = core_above_threshold = 0
    # A dense core's latents are ReLU only; counted again above the non-core latents' inference
    # threshold, L0_core is what it would be were the threshold applied to the core as well.
    threshold = sae.config.threshold if _uses_threshold(sae) else 0.0
    fired = torch.zeros(sae.config.num_latents, dtype=torch.bool, device=device)
    for batch in batches:
        x = batch.to(device, torch.float32)
        output = sae(x, use_threshold=_uses_threshold(sae), output_dense_latents=False)
        squared_error += float((x - output.reconstruction.float()).pow(2).sum())
        total += x.sum(0).double()
        total_sq += float(x.double().pow(2).sum())
        tokens += x.shape[0]
        cols = output.sparse_latents.cols
        core_active += int((cols < c).sum())
        core_above_threshold += int(((cols < c) & (output.sparse_latents.values > threshold)).sum())
        noncore_active += int((cols >= c).sum())
        fired |= output.fired
        if on_batch is not None:
            on_batch(output, tokens - x.shape[0])
    if tokens == 0:
        raise ConfigError("no held-out tokens to evaluate on: raise --eval.tokens")
    d = sae.config.d_in
    variance = total_sq - float((total**2).sum()) / tokens  # sum_u ||x_u - mean||^2
    return {
        "fve": 1.0 - squared_error / variance,
        "mse": squared_error / (tokens * d),
        "l0_core": core_active / tokens,
        "l0_core_above_threshold": core_above_threshold / tokens,
        "l0_noncore": noncore_active / tokens,
        "l0": (core_active + noncore_active) / tokens,
        "dead_fraction": 1.0 - float(fired.float().mean()),
        "eval_tokens": tokens,
    }


def downstream_loss_metrics(
    sae: DMSAEModel,
    base_model: PreTrainedModel,
    hook_module: nn.Module,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    clean: float,
    zero_ablated: float,
) -> dict[str, float]:
    """Next-token loss with the SAE's reconstruction spliced in, against the clean and the
    zero-ablated losses (the same for every SAE of a run, so computed once by the caller)."""

    def splice(hidden: torch.Tensor) -> torch.Tensor:
        output = sae(hidden, use_threshold=_uses_threshold(sae), output_dense_latents=False)
        return output.reconstruction.to(hidden.dtype)

    spliced = mean_next_token_loss(base_model, hook_module, input_ids, loss_mask, splice)
    return {
        "ce_loss_clean": clean,
        "ce_loss_spliced": spliced,
        "ce_loss_zero_ablated": zero_ablated,
        "loss_recovered": (zero_ablated - spliced) / (zero_ablated - clean) if zero_ablated != clean else float("nan"),
    }


MATCH_COSINE = 0.9


@torch.no_grad()
def decoder_consistency(sae_a: DMSAEModel, sae_b: DMSAEModel, core_size: int, rows_per_block: int = 4096) -> dict[str, dict]:
    """For every decoder direction of ``sae_a``, its best cosine match among ``sae_b``'s, summarised
    for latents [0, core_size) ("core") and the rest: how many reach MATCH_COSINE, and the mean
    max-cosine. Blocks of rows bound the [block, K] similarity matrix (65k x 65k at paper scale)."""
    directions_b = nn.functional.normalize(sae_b.W_dec.detach().float(), dim=-1)
    best = torch.cat(
        [
            (nn.functional.normalize(block.float(), dim=-1) @ directions_b.T).max(dim=1).values
            for block in sae_a.W_dec.detach().split(rows_per_block)
        ]
    )
    parts = {"core": best[:core_size], "rest": best[core_size:]}
    return {
        name: {
            "latents": part.numel(),
            "matched": int((part >= MATCH_COSINE).sum()),
            "mean_max_cosine": float(part.mean()) if part.numel() else float("nan"),
        }
        for name, part in parts.items()
    }


@torch.no_grad()
def chance_max_cosine(sae: DMSAEModel, num_directions: int = 4096, seed: int = 0) -> float:
    """The mean best cosine that random unit directions reach among ``sae``'s decoder directions:
    the level a consistency match must beat (about 0.15 for K = 4096 in d = 576), since in d
    dimensions the best of K random cosines grows with K."""
    generator = torch.Generator().manual_seed(seed)
    directions = nn.functional.normalize(sae.W_dec.detach().float(), dim=-1)
    random = nn.functional.normalize(torch.randn(num_directions, directions.shape[1], generator=generator), dim=-1)
    return float((random.to(directions.device) @ directions.T).max(dim=1).values.mean())
