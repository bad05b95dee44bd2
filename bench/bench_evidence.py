"""What the per-latent evidence adds to the evaluation stage: every SAE of a finished run evaluated
as the run evaluates it (cycles: + firing frequencies; final SAEs: + the whole evidence) and
without (same held-out data, one process, taking turns per SAE), the parts, and the files' sizes.

    python bench/bench_evidence.py runs/default [--rounds 1]

Reads the run's configuration and harvest cache; the held-out activations are harvested again (one
base-model pass, not timed). The "with" time is the run's own: the shared pass, the logit effect,
the windows and the files' bytes (trainer.pipeline.evaluation.evidence_files), not the disk write.
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save

from modeling_dmsae import DMSAEModel
from trainer.config import parse_config
from trainer.harvest.base_model import load_base_model, mean_next_token_loss, resolve_hook_module
from trainer.harvest.harvested import _held_out
from hub_cards.publish import build_hub_folders
from trainer.pipeline.evaluation import evidence_files
from trainer.report.summary import write_report
from trainer.run.files import write_bytes, write_json
from trainer.run.layout import FIRING_FREQUENCIES, RunDirectory
from trainer.sae import evidence as ev
from trainer.sae.evidence import EvidenceStream, FiringCounts
from trainer.sae.metrics import downstream_loss_metrics, reconstruction_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--write", action="store_true", help="write each SAE's files into RUN_DIR (a copy of a run made "
                        "before the evidence existed), then its report, browser and Hub folders; times the evidence only")
    parser.add_argument("--saes", nargs="*", help="only these SAE folders (e.g. cycle-003 k-0032-dense_core); the stage's "
                        "figure is then extrapolated from the mean time of a cycle and of a final SAE")
    args = parser.parse_args()
    paths = RunDirectory(args.run_dir)
    config = parse_config(["--config", str(paths.config_file)])
    torch.manual_seed(0)
    model, tokenizer = load_base_model(config.model)
    hook = resolve_hook_module(model, config.model.hook_module)
    start = config.harvest.context_ranges(config.data.context_length).heldout_start
    held_out = _held_out(model, hook, config, tokenizer, start)
    clean = mean_next_token_loss(model, hook, held_out.ce_input_ids, held_out.ce_loss_mask)
    ablated = mean_next_token_loss(model, hook, held_out.ce_input_ids, held_out.ce_loss_mask, torch.zeros_like)
    batch_size = config.cycles.batch_size

    def without(sae: DMSAEModel) -> None:
        reconstruction_metrics(sae, held_out.activations.split(batch_size))
        downstream_loss_metrics(sae, model, hook, held_out.ce_input_ids, held_out.ce_loss_mask, clean, ablated)

    def frequencies(sae: DMSAEModel) -> dict:  # what a cycle's evaluation adds
        counts = FiringCounts(sae.config.num_latents, sae.W_dec.device)
        reconstruction_metrics(sae, held_out.activations.split(batch_size), counts.add)
        downstream_loss_metrics(sae, model, hook, held_out.ce_input_ids, held_out.ce_loss_mask, clean, ablated)
        return {FIRING_FREQUENCIES: save({"firing_frequency": counts.firing_frequency()})}

    def with_evidence(sae: DMSAEModel) -> dict:  # a final SAE's, timed in its parts
        stream = EvidenceStream(sae.config.num_latents, sae.W_dec.device)
        with timed("shared pass"):
            reconstruction_metrics(sae, held_out.activations.split(batch_size), stream.add)
        with timed("spliced loss"):
            downstream_loss_metrics(sae, model, hook, held_out.ce_input_ids, held_out.ce_loss_mask, clean, ablated)
        with timed("logit effect"):
            effect = ev.top_logit_effects(sae, model)
        with timed("windows"):
            evidence = stream.finish(sae, held_out.activations, held_out.slots, held_out.contexts, effect)
        with timed("files"):
            files = evidence_files(evidence, tokenizer)
        sizes.append(sum(len(content) for content in files.values() if isinstance(content, bytes)))
        return files

    def without_parts(sae: DMSAEModel) -> None:
        with timed("pass without evidence"):
            reconstruction_metrics(sae, held_out.activations.split(batch_size))
        downstream_loss_metrics(sae, model, hook, held_out.ce_input_ids, held_out.ce_loss_mask, clean, ablated)

    parts: dict[str, float] = {}
    sizes: list[int] = []

    @contextmanager
    def timed(name: str):
        began = time.perf_counter()
        yield
        parts[name] = parts.get(name, 0.0) + time.perf_counter() - began

    transfers = paths.transfers()
    folders = [f for f in paths.cycles() + transfers if not args.saes or f.name in args.saes]
    seconds = {(kind, name): [] for kind in ("cycle", "final") for name in ("without", "with")}
    for _ in range(args.rounds):
        for folder in folders:
            sae = DMSAEModel.from_pretrained(folder).eval()
            kind = "final" if folder in transfers else "cycle"
            actions = (("without", without_parts), ("with", with_evidence if kind == "final" else frequencies))
            for name, action in actions[1:] if args.write else actions:
                began = time.perf_counter()
                with torch.no_grad():
                    files = action(sae)
                seconds[kind, name].append(time.perf_counter() - began)
            if args.write:
                for file, content in files.items():
                    (write_json if isinstance(content, dict) else write_bytes)(folder / file, content)
            print(f"{folder.name}: " + ", ".join(f"{name} {seconds[kind, name][-1]:.1f} s" for name in ("without", "with") if seconds[kind, name]), flush=True)
    if args.write:
        print(write_report(config, paths))
        build_hub_folders(paths, config.hub)
        return
    print(f"K = {sae.config.num_latents}, {held_out.activations.shape[0]} held-out tokens; load average {os.getloadavg()}")
    counts = {"cycle": len(paths.cycles()), "final": len(transfers)}
    stage = {name: sum(counts[kind] * sum(seconds[kind, name]) / len(seconds[kind, name]) for kind in counts if seconds[kind, name])
             for name in ("without", "with")}
    for kind in counts:
        if seconds[kind, "with"]:
            mean = {name: sum(seconds[kind, name]) / len(seconds[kind, name]) for name in ("without", "with")}
            print(f"a {kind}: {mean['without']:.1f} s without, {mean['with']:.1f} s with (mean of {len(seconds[kind, 'with'])})")
    print(f"evaluation stage ({counts['cycle']} cycles, {counts['final']} final SAEs) without evidence: {stage['without']:.1f} s; "
          f"with: {stage['with']:.1f} s; +{100 * (stage['with'] / stage['without'] - 1):.0f}%")
    print("final SAEs, parts (s): " + ", ".join(f"{name} {seconds:.1f}" for name, seconds in parts.items()))
    print(f"evidence files per final SAE: {max(sizes) / 1e6:.1f} MB")
    print(f"evidence at K = 65,536: {ev.evidence_bytes(65_536) / 1e6:.0f} MB of tensors, streaming buffers {ev.evidence_working_bytes(65_536) / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
