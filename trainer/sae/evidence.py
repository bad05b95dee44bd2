"""Per-latent evidence of one SAE on held-out tokens. The computation and the files' format live in
``modeling_dmsae.evidence``, beside their reader, so that a user computes the same on their own
texts and reads a run's files without the trainer."""

from modeling_dmsae.evidence import (
    FORMAT,
    QUANTILES,
    SAMPLE_SIZE,
    TOP_N,
    WINDOW_AFTER,
    WINDOW_BEFORE,
    EvidenceStream,
    FiringCounts,
    evidence_bytes,
    evidence_working_bytes,
    top_logit_effects,
    window_length,
)
from modeling_dmsae.evidence import EvidenceTensors as LatentEvidence

__all__ = [
    "FORMAT",
    "QUANTILES",
    "SAMPLE_SIZE",
    "TOP_N",
    "WINDOW_AFTER",
    "WINDOW_BEFORE",
    "EvidenceStream",
    "FiringCounts",
    "LatentEvidence",
    "evidence_bytes",
    "evidence_working_bytes",
    "top_logit_effects",
    "window_length",
]
