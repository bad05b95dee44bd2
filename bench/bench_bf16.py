"""What bf16 SAE training (``--mixed_precision bf16``) changes against fp32, on real activations.

    .venv/bin/python bench/bench_bf16.py                        # the default run (runs/default)
    .venv/bin/python bench/bench_bf16.py --run runs/after --steps 300 --batch_size 1024

Reads a finished run folder: the trained SAE ``transfer/k-0032-dense_core`` (d = 576, K = 4096 at
the default shape) and the cached training activations ``cache/activations``; the last shard is
held out. Two measurements:

(a) one training-mode forward (BatchTopK) of the trained SAE on the held-out tokens, with the
    encoder GEMM and the decode in fp32 and in bf16 (``DMSAEModel.compute_dtype``): FVE, L0, the
    fraction of BatchTopK-selected (token, latent) entries that differ, and the ties at the cut;
(b) ``--steps`` training steps of ``SAETrainer`` from the same initialisation (the trained SAE's
    frozen core, fresh non-core weights) on the same batches, under ``Accelerator(mixed_precision=
    "no")`` and ``"bf16"``; each SAE's threshold is calibrated on training batches, then FVE and L0
    are measured on the held-out tokens in eval mode (the calibrated threshold, exact fp32).

FVE = 1 - sum ||x - x^||^2 / sum ||x - mean(x)||^2 over the held-out tokens. Prints a markdown table.
"""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import simple_parsing
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make the project importable
    sys.path.insert(0, str(ROOT))

from modeling_dmsae import DMSAEModel  # noqa: E402


@dataclass
class BenchBf16Config:
    run: Path = Path("runs/default")
    """A finished run folder (its transfer/ SAEs and cache/activations) of the default shape."""
    sae: str = "transfer/k-0032-dense_core"
    """The trained SAE inside the run folder."""
    steps: int = 300
    """Training steps of each precision in (b)."""
    batch_size: int = 1024
    """Tokens per training step in (b)."""
    eval_tokens: int = 4096
    """Held-out tokens of (a) and (b) (from the last activation shard)."""
    calibration_batches: int = 4
    """Training batches the inference threshold is calibrated on in (b)."""
    seed: int = 0


def load_activations(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(training rows, held-out rows) [N, d] fp32: every shard but the last, and the last."""
    shards = sorted(folder.glob("shard_*.safetensors"))
    rows = [load_file(str(shard))["x"].float() for shard in shards]
    return torch.cat(rows[:-1]), rows[-1]


def fve_and_l0(sae: DMSAEModel, x: torch.Tensor) -> tuple[float, float]:
    """FVE and mean active latents per token of one forward (BatchTopK in train mode, threshold in eval)."""
    with torch.no_grad():
        out = sae(x, output_dense_latents=False)
    residual = (x - out.reconstruction).pow(2).sum()
    return float(1 - residual / (x - x.mean(0)).pow(2).sum()), float(out.l0)


def selected_entries(sae: DMSAEModel, x: torch.Tensor) -> tuple[set, int]:
    """The BatchTopK-selected (token, latent) entries of a train-mode forward and the ties at the cut."""
    with torch.no_grad():
        weights = sae._compute_weights(sae.compute_dtype)
        latents, relu_pre, cut = sae.encode_sparse(sae.normalize_activations(x), False, None, weights)
    ties = int((relu_pre[:, sae._unmasked_columns():] == cut).sum())
    return set(zip(latents.rows.tolist(), latents.cols.tolist())), ties


def forward_comparison(sae: DMSAEModel, held_out: torch.Tensor) -> list[tuple[str, str]]:
    """(a): the trained SAE's train-mode forward in fp32 and in bf16."""
    sae.train()
    measured = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        sae.compute_dtype = dtype
        measured[name] = (*fve_and_l0(sae, held_out), *selected_entries(sae, held_out))
    sae.compute_dtype = None
    (fve32, l032, kept32, ties32), (fve16, l016, kept16, ties16) = measured["fp32"], measured["bf16"]
    return [
        ("(a) FVE fp32 / bf16 / difference", f"{fve32:.5f} / {fve16:.5f} / {fve16 - fve32:+.2e}"),
        ("(a) L0 fp32 / bf16", f"{l032:.3f} / {l016:.3f}"),
        ("(a) selected entries that differ", f"{len(kept32 ^ kept16) / len(kept32):.3%} of {len(kept32):,}"),
        ("(a) entries tied at the cut fp32 / bf16", f"{ties32} / {ties16}"),
    ]


def train(trained: DMSAEModel, precision: str, train_rows: torch.Tensor, config: BenchBf16Config) -> DMSAEModel:
    """A fresh SAE with ``trained``'s core, ``config.steps`` steps under ``precision``, calibrated."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from trainer.config import OptimizerConfig
    from trainer.sae.training import SAETrainer

    torch.manual_seed(config.seed)
    sae = DMSAEModel.from_core(copy.deepcopy(trained.config), trained.core_encoder)
    sae.config.threshold = -1.0
    AcceleratorState._reset_state(reset_partial_state=True)  # one Accelerator precision per process otherwise
    trainer = SAETrainer(sae, OptimizerConfig(), config.steps, Accelerator(cpu=True, mixed_precision=precision))
    # The cache holds ~100k tokens: longer runs go over it again, in the same order for both precisions.
    order = torch.arange(config.steps * config.batch_size) % len(train_rows)
    batches = train_rows[order].split(config.batch_size)
    for batch in batches:
        trainer.step(batch)
    trainer.calibrate_threshold(batches[: config.calibration_batches])
    return trainer.release().eval()


def training_comparison(trained: DMSAEModel, train_rows: torch.Tensor, held_out: torch.Tensor, config: BenchBf16Config) -> list[tuple[str, str]]:
    """(b): the same short run in fp32 and in bf16, evaluated exactly on the held-out tokens."""
    results, seconds = {}, {}
    for precision in ("no", "bf16"):
        start = time.perf_counter()
        sae = train(trained, precision, train_rows, config)
        seconds[precision] = time.perf_counter() - start
        results[precision] = (*fve_and_l0(sae, held_out), sae.config.threshold, sae.W_dec.detach().clone())
    (fve32, l032, theta32, dec32), (fve16, l016, theta16, dec16) = results["no"], results["bf16"]
    cosine = torch.nn.functional.cosine_similarity(dec32, dec16, dim=-1)
    return [
        (f"(b) held-out FVE after {config.steps} steps fp32 / bf16 / difference", f"{fve32:.5f} / {fve16:.5f} / {fve16 - fve32:+.2e}"),
        ("(b) held-out L0 (calibrated threshold) fp32 / bf16", f"{l032:.3f} / {l016:.3f} ({l016 - l032:+.3f})"),
        ("(b) threshold fp32 / bf16", f"{theta32:.5f} / {theta16:.5f}"),
        ("(b) cosine of the decoder rows fp32 vs bf16: median / min", f"{cosine.median():.5f} / {cosine.min():.5f}"),
        ("(b) wall seconds fp32 / bf16 (CPU, shared)", f"{seconds['no']:.0f} / {seconds['bf16']:.0f}"),
    ]


def main() -> None:
    config = simple_parsing.parse(BenchBf16Config)
    torch.manual_seed(config.seed)
    trained = DMSAEModel.from_pretrained(config.run / config.sae)
    train_rows, held_out = load_activations(config.run / "cache" / "activations")
    held_out = held_out[: config.eval_tokens]
    c = trained.config
    print(f"SAE {config.sae}: d = {c.d_in}, K = {c.num_latents}, c = {c.core_size}, k = {c.k}; {len(held_out)} held-out tokens\n")
    rows = forward_comparison(trained, held_out)
    rows += training_comparison(trained, train_rows, held_out, config)
    print("| measurement | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
