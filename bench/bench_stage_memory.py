"""Memory across the stages of a run: what the Accelerator still references and the process's
resident memory when each stage starts.

    python bench/bench_stage_memory.py [OUT_DIR] [--section.field VALUE ...]

Runs a short distillation on the embedded default with K = 16,384 (one SAE with its gradients and
Adam's moments is 4 x 2 x K x d x 4 bytes = 302 MB at d = 576), so an SAE kept per stage shows
in the resident memory. For each stage, as its trainer is built: the models and optimisers the
Accelerator holds (after ``prepare``), and the resident memory before it (after a garbage
collection). Works on any revision of the trainer that has ``SAETrainer`` (the before/after
comparison that fixed the release of finished stages ran it on both).
"""

from __future__ import annotations

import gc
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer import distill  # noqa: E402
from trainer.sae.training import SAETrainer  # noqa: E402

SHORT_RUN = [
    "--dictionary.num_latents", "16384", "--harvest.train_tokens", "24576", "--harvest.contexts_per_shard", "16", "--cycles.num_cycles", "2",
    "--cycles.tokens_per_cycle", "8192", "--transfer.tokens", "8192", "--transfer.ks", "16", "64",
    "--transfer.sparsity_matched", "false", "--optimizer.calibration_tokens", "8192", "--eval.tokens", "4096",
    "--eval.ce_contexts", "4", "--run.log_with", "none",
]  # fmt: skip


def resident_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv: list[str]) -> None:
    output = argv[0] if argv and not argv[0].startswith("--") else tempfile.mkdtemp(prefix="stage-memory-")
    overrides = argv[1:] if argv and not argv[0].startswith("--") else argv
    rows = []
    original_init = SAETrainer.__init__

    def recording_init(self, model, *args, **kwargs):
        gc.collect()
        before = resident_mib()
        original_init(self, model, *args, **kwargs)
        rows.append((len(rows), before, len(self.accelerator._models), len(self.accelerator._optimizers)))

    SAETrainer.__init__ = recording_init
    distill.main([*SHORT_RUN, "--run.output_dir", str(Path(output) / "run"), *overrides])
    gc.collect()
    print(f"{'stage':>5} {'RSS at start (MiB)':>19} {'models held':>12} {'optimisers held':>16}")
    for stage, rss, models, optimizers in rows:
        print(f"{stage:>5} {rss:>19.0f} {models:>12} {optimizers:>16}")
    print(f"end   {resident_mib():>19.0f}")


if __name__ == "__main__":
    main(sys.argv[1:])
