"""Remote code on transformers 4.x and 5.x: a saved DMSAE folder loads with
``AutoModel.from_pretrained(folder, trust_remote_code=True)`` under transformers 4.56, in an
environment without dmsae, and computes there what it computes under this environment's transformers.

    python bench/remote_code_check.py [FINAL_SAE_FOLDER ...] [--venv .tf4-venv]

Saves a tiny DMSAE and a tiny Llama with this environment (``save_pretrained`` writes the code
files beside the weights), re-saves each given folder the same way (a run's final SAE, e.g.
``runs/default/hub/saes/dmsae-smollm2-l12-k32``: its weights with the current code files), and runs
``bench/remote_code_probe.py`` on them with this environment's python and with the 4.x one's, each
from an empty folder: ``encode`` of fixed activations for every SAE, and for the tiny one
``latents_from_text`` and an error-term splice with steering through the tiny Llama. Prints the
largest difference of every output; exits 1 if one exceeds TOLERANCE.

The 4.x environment is built on first use: torch 2.13.0 first, then transformers 4.56.* with torch
held by constraints.txt, so that pip never swaps in a CUDA build of torch.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_dmsae import DMSAEConfig, DMSAEModel

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VENV = ROOT / ".tf4-venv"
TRANSFORMERS_4 = "transformers==4.56.*"
TORCH = "torch==2.13.0"
PROBE = ROOT / "bench" / "remote_code_probe.py"
TOLERANCE = 1e-4  # same torch and code on both sides: only the LM's kernels may round differently


class CheckResult(NamedTuple):
    versions: dict[str, dict]  # environment -> its transformers and torch versions
    differences: dict[str, float]  # output -> largest absolute difference between the environments
    active: dict[str, int]  # output -> nonzero entries (the comparison compares something)


def build_venv(venv: Path) -> Path:
    """The 4.x environment's python, built when missing."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, TORCH], check=True)
        subprocess.run([*pip, "-c", str(ROOT / "constraints.txt"), TRANSFORMERS_4], check=True)
    return python


def save_tiny_models(folder: Path) -> tuple[Path, Path]:
    """(SAE folder, LM folder): a DMSAE on layer 1 of a random 2-layer Llama with hidden size 32."""
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, bos_token_id=0, eos_token_id=1, pad_token_id=2, initializer_range=0.2,
    ))  # fmt: skip
    lm.save_pretrained(folder / "lm")
    config = DMSAEConfig(d_in=32, num_latents=64, group_sizes=[16, 48], k=4, hook_module="model.layers.1", normalization_factor=3.0, threshold=0.05)
    DMSAEModel(config).save_pretrained(folder / "tiny")
    return folder / "tiny", folder / "lm"


def fixed_inputs(saes: dict[str, Path]) -> dict[str, torch.Tensor]:
    """Activations at each SAE's typical norm (normalization_factor), and two rows of token ids:
    a BOS first, and right padding."""
    generator = torch.Generator().manual_seed(0)
    inputs = {}
    for name, folder in saes.items():
        config = DMSAEConfig.from_pretrained(folder)
        x = torch.randn(16, config.d_in, generator=generator)
        inputs[f"{name}/x"] = x / math.sqrt(config.d_in) * config.normalization_factor
    inputs["input_ids"] = torch.tensor([[0, 5, 9, 17, 33, 40, 41, 42], [7, 8, 9, 10, 11, 12, 2, 2]])
    inputs["attention_mask"] = torch.tensor([[1] * 8, [1] * 6 + [0, 0]])
    return inputs


def probe(python: Path, spec: dict, workdir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(versions, outputs) of the probe run by ``python`` from an empty folder, with no PYTHONPATH."""
    workdir.mkdir()
    (workdir / "spec.json").write_text(json.dumps({**spec, "out": str(workdir / "out.safetensors")}))
    result = subprocess.run(
        [str(python), str(PROBE), str(workdir / "spec.json")], cwd=workdir, capture_output=True, text=True,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HOME": str(workdir / "hf_home")},
    )
    if result.returncode != 0:
        raise RuntimeError(f"the probe failed under {python}:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1]), load_file(workdir / "out.safetensors")


def check(folders: list[Path], venv: Path) -> CheckResult:
    """Every output of the probe under this environment and under the 4.x one, compared."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tiny, lm = save_tiny_models(work)
        saes = {"tiny": tiny}
        for folder in folders:  # the given weights with the current code files beside them
            saes[folder.name] = work / folder.name
            DMSAEModel.from_pretrained(folder).save_pretrained(saes[folder.name])
        save_file(fixed_inputs(saes), work / "inputs.safetensors")
        spec = {"saes": {name: str(path) for name, path in saes.items()}, "lm": str(lm), "inputs": str(work / "inputs.safetensors")}
        current_versions, current = probe(Path(sys.executable), {**spec, "no_package": False}, work / "current")
        old_versions, old = probe(build_venv(venv), {**spec, "no_package": True}, work / "transformers-4")
    differences = {name: float((current[name].float() - old[name].float()).abs().max()) for name in current}
    active = {name: int(tensor.count_nonzero()) for name, tensor in current.items()}
    return CheckResult({"current": current_versions, "4.x": old_versions}, differences, active)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", type=Path, nargs="*", help="saved DMSAE folders to check besides the tiny one")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help=f"the transformers 4.x environment (built if missing; default {DEFAULT_VENV})")
    args = parser.parse_args()
    result = check(args.folders, args.venv)
    for name, versions in result.versions.items():
        print(f"{name:>8}: transformers {versions['transformers']}, torch {versions['torch']}")
    for name, difference in result.differences.items():
        print(f"{name:<48} max |diff| {difference:.3g}   ({result.active[name]} nonzero)")
    worst = max(result.differences.values())
    print(f"{'same' if worst <= TOLERANCE else 'DIFFERENT'}: largest difference {worst:.3g} (tolerance {TOLERANCE:g})")
    sys.exit(0 if worst <= TOLERANCE else 1)


if __name__ == "__main__":
    main()
