"""Evaluating a trained SAE on the held-out data and saving its stage folder."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from modeling_dmsae import DMSAEModel
from trainer.harvest.run_data import RunData
from trainer.pipeline.context import RunContext
from trainer.run.files import atomic_folder, write_json
from trainer.sae.metrics import downstream_loss_metrics, reconstruction_metrics
from trainer.run.layout import METRICS_JSON


def evaluate(run: RunContext, sae: DMSAEModel, data: RunData, name: str) -> dict[str, float]:
    """Held-out metrics of one SAE (inference mode), on the main process; {} on the others."""
    if not run.is_main:
        return {}
    sae.eval()
    batch_size = run.config.cycles.batch_size
    batches = tqdm(data.held_out_batches(batch_size), desc=f"evaluate {name}", total=len(data.held_out) // batch_size + 1)
    metrics = reconstruction_metrics(sae, batches)
    metrics.update(
        downstream_loss_metrics(sae, data.base_model, data.hook_module, data.ce_input_ids, data.ce_loss_mask, data.ce_clean, data.ce_zero_ablated)
    )
    sae.train()
    return metrics


def save_stage(run: RunContext, folder: Path, sae: DMSAEModel, metrics: dict, extra: Callable[[Path], None] | None = None) -> None:
    """Write an SAE's stage folder whole: save_pretrained, metrics.json and any ``extra`` files."""

    def write() -> None:
        with atomic_folder(folder) as partial:
            sae.save_pretrained(partial)
            write_json(partial / METRICS_JSON, metrics)
            if extra is not None:
                extra(partial)

    run.on_main(write)
