"""Throughputs the ``--dry-run`` cost plan estimates wall time from, measured on this device for
one configuration's base model and SAE shapes, and kept in ``trainer/report/throughputs.json``
(shipped with the package) under the device's kind (``trainer.report.dry_run.device_kind``: e.g.
``cpu-2core``, ``cuda-nvidia-h100-80gb-hbm3``).

    python bench/bench_throughputs.py [--record-as MODEL_ID] [--config FILE] [--section.field VALUE ...]

``--record-as`` files the base-model figures under another model id: a random-weight stand-in of the
same architecture (``bench/random_gemma2_2b.py``) runs as fast as the real model.

Measures, with the run's own functions: loading the base model; the activation harvest, the
(x, g) attribution pass and the full forward of the spliced loss (tokens/s, on the configured
data); one SAE optimisation step at every sparsity the run trains (c = 0, the configured batch);
the threshold calibration, the attribution scoring and the held-out reconstruction metrics (per
token). A kind measured before keeps its other entries; an entry at the same model or shape is replaced.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from modeling_dmsae import DMSAEModel  # noqa: E402
from trainer.config import parse_config  # noqa: E402
from trainer.harvest.base_model import load_base_model, mean_next_token_loss, resolve_hook_module  # noqa: E402
from trainer.harvest.cache import _activation_shard, _attribution_shard  # noqa: E402
from trainer.harvest.text_corpus import context_batches, packed_contexts  # noqa: E402
from trainer.report.dry_run import SAE_SHAPE_FIELDS, THROUGHPUTS_FILE, base_model_key, device_kind  # noqa: E402
from trainer.run.stages import batch_shape, cycle0_sae_config, final_saes  # noqa: E402
from trainer.sae.metrics import reconstruction_metrics  # noqa: E402
from trainer.sae.selection import select_core  # noqa: E402
from trainer.sae.training import SAETrainer  # noqa: E402


def timed(action) -> tuple[float, object]:
    start = time.perf_counter()
    result = action()
    return time.perf_counter() - start, result


def measure_base_model(config, contexts: int = 64) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    load_s, (model, tokenizer) = timed(lambda: load_base_model(config.model))
    hook = resolve_hook_module(model, config.model.hook_module)
    packed = list(packed_contexts(tokenizer, config.data, 0, contexts))
    positions = len(packed) * config.data.context_length
    harvest = config.harvest
    _activation_shard(model, hook, harvest, packed[: harvest.batch_size], 0)  # warm-up
    activation_s, shard = timed(lambda: _activation_shard(model, hook, harvest, packed, 0))
    attribution_contexts = packed[: max(harvest.attribution_batch_size, contexts // 4)]
    attribution_s, sample = timed(lambda: _attribution_shard(model, hook, harvest, attribution_contexts, 0))
    batch = next(context_batches(packed, config.eval.ce_contexts))
    forward_s, _ = timed(lambda: mean_next_token_loss(model, hook, batch.input_ids, batch.mask))
    figures = {
        "load_s": round(load_s, 2),
        "activation_tokens_per_s": round(positions / activation_s, 1),
        "attribution_tokens_per_s": round(len(attribution_contexts) * config.data.context_length / attribution_s, 1),
        "full_forward_tokens_per_s": round(batch.input_ids.numel() / forward_s, 1),
        "context_length": config.data.context_length,
        "dtype": str(model.dtype).removeprefix("torch."),
    }
    return figures, shard.tensors["x"].float(), sample.tensors["x"].float(), sample.tensors["g"].float()


def measure_sae(config, k: int, x: torch.Tensor, attribution_x, attribution_g, steps: int = 16) -> dict:
    sae_config = cycle0_sae_config(config, x.shape[1])
    sae_config.k = k
    sae_config.normalization_factor = float(x.pow(2).sum(-1).mean().sqrt())
    batch_size = batch_shape(config).per_process  # what one process trains on per step
    rows = x.repeat(max(1, -(-batch_size * 2 // len(x))), 1)
    trainer = SAETrainer(DMSAEModel(sae_config), config.optimizer, total_steps=steps + 2)
    batches = [rows[torch.randperm(len(rows))[:batch_size]] for _ in range(steps + 2)]
    times = [timed(lambda b=b: trainer.step(b))[0] for b in batches]
    calibration_s, sae = timed(lambda: trainer.calibrate_threshold(batches[:2]))
    sae.eval()
    held_out = rows[: min(len(rows), config.eval.tokens)]
    evaluation_s, _ = timed(lambda: reconstruction_metrics(sae, held_out.split(batch_size)))
    c = config.cycles
    selection_s, _ = timed(lambda: select_core(sae, attribution_x, attribution_g, c.quantile, c.tau, c.batch_size))
    return {
        "d_in": sae_config.d_in, "num_latents": sae_config.num_latents, "k": k, "batch_size": batch_size,
        "step_s": round(statistics.median(times[2:]), 4),
        "calibration_s_per_token": calibration_s / (2 * batch_size),
        "evaluation_s_per_token": evaluation_s / len(held_out),
        "selection_s_per_token": selection_s / len(attribution_x),
    }


def measured_note() -> str:
    """When and how the figures were measured (the load matters on a shared machine)."""
    load = os.getloadavg()
    return (
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {load[0]:.1f} (1 min) {load[1]:.1f} (5 min) at the end"
    )


def recorded_key(config, record_as: str | None) -> str:
    """The base model's key in the table, under ``record_as``'s model id when given (a stand-in's
    figures filed under the real model)."""
    model = dataclasses.replace(config.model, model=record_as) if record_as else config.model
    return base_model_key(dataclasses.replace(config, model=model))


def file_figures(table: dict, kind: str, measured: str, base_key: str, base: dict, steps: list[dict]) -> dict:
    """File one measurement in ``table`` (throughputs.json's content) under ``kind``: a base model
    or SAE shape measured before is replaced, other entries are kept. Returns what was filed."""
    entry = table.setdefault(kind, {})  # a kind may hold only its published specifications so far
    entry.setdefault("base_model", {})
    entry.setdefault("sae", [])
    entry["measured"] = measured
    entry["base_model"][base_key] = base
    new_shapes = {tuple(s[name] for name in SAE_SHAPE_FIELDS) for s in steps}
    entry["sae"] = [s for s in entry["sae"] if tuple(s[name] for name in SAE_SHAPE_FIELDS) not in new_shapes] + steps
    return {kind: {"base_model": {base_key: base}, "sae": steps, "measured": measured}}


def read_table() -> dict:
    return json.loads(THROUGHPUTS_FILE.read_text()) if THROUGHPUTS_FILE.exists() else {}


def main() -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--record-as", default=None)
    known, rest = parser.parse_known_args()
    config = parse_config(rest)
    kind = device_kind()
    base, x, attribution_x, attribution_g = measure_base_model(config)
    ks = sorted({config.cycles.k, *(run.k for run in final_saes(config))})
    steps = [measure_sae(config, k, x, attribution_x, attribution_g) for k in ks]
    table = read_table()
    filed = file_figures(table, kind, measured_note(), recorded_key(config, known.record_as), base, steps)
    THROUGHPUTS_FILE.write_text(json.dumps(table, indent=2) + "\n")
    print(json.dumps(filed, indent=2))


if __name__ == "__main__":
    main()
