"""Which next tokens a latent's decoder direction promotes and suppresses.

    effect_j = W_U . FinalNorm(w_j)        w_j = W_dec[j] (unit norm), FinalNorm = the base model's own
                                           final norm module, W_U = its unembedding (output embeddings)

The approximation (the direct path, as feature dashboards show it): the direction is read as if it
were the whole residual stream at the last layer. Every layer after the hook is ignored, and so is
the scale the rest of the residual stream would give the norm (an RMSNorm divides by the RMS of the
whole residual, not of w_j alone; for a unit w_j in d dimensions it multiplies by sqrt(d) times the
norm's gain). Logit soft-capping, where a model has it, is monotone and left out. The ranking of
tokens within a latent is what this is for; values compare across the latents of one SAE.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from transformers import PreTrainedModel


class LogitEffect(NamedTuple):
    """[K, n] each: the n most promoted / suppressed token ids and their logit effects."""

    promoted_tokens: torch.Tensor
    promoted_logits: torch.Tensor
    suppressed_tokens: torch.Tensor
    suppressed_logits: torch.Tensor


def final_norm(base_model: PreTrainedModel) -> nn.Module:
    """The norm before the unembedding (``model.norm`` of Llama, Gemma, Qwen, Mistral; identity if none)."""
    decoder = base_model.get_decoder() if hasattr(base_model, "get_decoder") else base_model
    for name in ("norm", "final_layernorm", "ln_f"):
        if isinstance(getattr(decoder, name, None), nn.Module):
            return getattr(decoder, name)
    return nn.Identity()


@torch.no_grad()
def logit_effect(sae, base_model: PreTrainedModel, num_tokens: int = 10, rows_per_block: int = 1024) -> LogitEffect:
    """The ``num_tokens`` most promoted and suppressed tokens of every latent of ``sae`` (a
    DMSAEModel), in blocks of decoder rows so that [block, vocab] bounds the memory."""
    unembedding = base_model.get_output_embeddings().weight.detach()
    norm = final_norm(base_model)
    parts = []
    for rows in sae.W_dec.detach().split(rows_per_block):
        logits = norm(rows.to(unembedding.device, unembedding.dtype)) @ unembedding.T
        top, bottom = logits.float().topk(num_tokens, dim=1), logits.float().topk(num_tokens, dim=1, largest=False)
        parts.append((top.indices, top.values, bottom.indices, bottom.values))
    return LogitEffect(*(torch.cat([part[i] for part in parts]).cpu() for i in range(4)))
