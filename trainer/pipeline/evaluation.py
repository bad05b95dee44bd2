"""Evaluating a trained SAE on the held-out data and saving its stage folder."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save
from tqdm.auto import tqdm

from modeling_dmsae import DMSAEModel
from modeling_dmsae.evidence import EVIDENCE_JSON, EVIDENCE_TENSORS
from trainer.harvest.harvested import Harvest
from trainer.pipeline.context import RunContext
from trainer.run.files import atomic_folder, write_bytes, write_json
from trainer.run.layout import FIRING_FREQUENCIES, METRICS_JSON
from trainer.run.metrics_file import SAEMetrics
from trainer.sae import evidence as latent_evidence
from trainer.sae.evidence import EvidenceStream, FiringCounts, LatentEvidence, top_logit_effects
from trainer.sae.metrics import downstream_loss_metrics, reconstruction_metrics


def evaluate(
    run: RunContext, sae: DMSAEModel, harvest: Harvest, name: str, per_latent_evidence: bool = False
) -> tuple[dict[str, float], dict | None]:
    """Held-out metrics of one SAE (inference mode), and from the same pass the files
    :func:`save_stage` writes beside it: its firing frequencies, and with ``per_latent_evidence``
    (the final SAEs) the whole per-latent evidence. On the main process; ({}, None) on the others."""
    if not run.is_main:
        return {}, None
    sae.eval()
    batch_size = run.config.cycles.batch_size
    batches = tqdm(harvest.held_out_batches(batch_size), desc=f"evaluate {name}", total=len(harvest.held_out) // batch_size + 1)
    stream = (EvidenceStream if per_latent_evidence else FiringCounts)(sae.config.num_latents, sae.W_dec.device)
    metrics = reconstruction_metrics(sae, batches, stream.add)
    metrics.update(
        downstream_loss_metrics(sae, harvest.base_model, harvest.hook_module, harvest.ce_input_ids, harvest.ce_loss_mask, harvest.ce_clean, harvest.ce_zero_ablated)
    )
    if per_latent_evidence:
        effect = top_logit_effects(sae, harvest.base_model)
        files = evidence_files(stream.finish(sae, harvest.held_out, harvest.held_out_slots, harvest.held_out_tokens, effect), harvest.tokenizer)
    else:
        files = {FIRING_FREQUENCIES: save({"firing_frequency": stream.firing_frequency()})}
    sae.train()
    return metrics, files


def evidence_files(evidence: LatentEvidence, tokenizer) -> dict[str, bytes]:
    """The evidence as the files of a stage folder (format: ``modeling_dmsae.evidence``)."""
    used = torch.cat([t.flatten() for t in (evidence.context_tokens, evidence.promoted_tokens, evidence.suppressed_tokens)])
    ids = used.unique().tolist()
    settings = {
        "format": latent_evidence.FORMAT,
        "num_latents": int(evidence.firing_frequency.numel()),
        "top_n": latent_evidence.TOP_N,
        "quantiles": list(latent_evidence.QUANTILES),
        "quantile_sample_size": latent_evidence.SAMPLE_SIZE,
        "window": {"before": latent_evidence.WINDOW_BEFORE, "after": latent_evidence.WINDOW_AFTER},
        "histogram": "counts of nonzero activations in log10-spaced bins, edges in histogram_edges",
        "logit_effect": "W_U . FinalNorm(W_dec[j]): the direct path, every later layer ignored (modeling_dmsae.logit_effect)",
        "token_text": dict(zip(map(str, ids), tokenizer.batch_decode([[i] for i in ids]))),
    }
    tensors = evidence.tensors()
    return {
        EVIDENCE_TENSORS: save(tensors),
        FIRING_FREQUENCIES: save({"firing_frequency": tensors["firing_frequency"]}),
        EVIDENCE_JSON: settings,
    }


def save_stage(
    run: RunContext, folder: Path, sae: DMSAEModel, metrics: SAEMetrics, extra: Callable[[Path], None] | None = None, evidence: dict | None = None
) -> None:
    """Write an SAE's stage folder whole: save_pretrained, metrics.json, its evidence files and any ``extra`` files."""

    def write() -> None:
        with atomic_folder(folder) as partial:
            sae.save_pretrained(partial)
            metrics.write(partial / METRICS_JSON)
            for name, content in (evidence or {}).items():
                (write_json if isinstance(content, dict) else write_bytes)(partial / name, content)
            if extra is not None:
                extra(partial)

    run.on_main(write)
