"""Run by ``bench/remote_code_check.py`` in each transformers environment: load saved DMSAE folders
with ``trust_remote_code=True`` (their own code files, never the dmsae package), and write what
they compute on fixed inputs.

    python remote_code_probe.py SPEC.json

SPEC: {"saes": {name: folder}, "lm": folder of a causal LM for the first SAE, "inputs": a
safetensors file ({name}/x per SAE; input_ids and attention_mask), "out": the safetensors file
to write, "no_package": assert that modeling_dmsae cannot even be imported}. Prints the versions.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM


def load_sae(folder: str):
    sae = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    if not type(sae).__module__.startswith("transformers_modules"):
        raise SystemExit(f"{folder} loaded {type(sae).__module__}, not its own code files")
    return sae


@torch.no_grad()
def main(spec: dict) -> None:
    if spec["no_package"] and importlib.util.find_spec("modeling_dmsae") is not None:
        raise SystemExit("modeling_dmsae is importable here: run the probe where only the saved code files can run")
    inputs, outputs = load_file(spec["inputs"]), {}
    saes = {name: load_sae(folder) for name, folder in spec["saes"].items()}
    for name, sae in saes.items():
        outputs[f"{name}/encode"] = sae.encode(inputs[f"{name}/x"])
    first, sae = next(iter(saes.items()))
    model = AutoModelForCausalLM.from_pretrained(spec["lm"]).eval()
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    text = sae.latents_from_text(model, ids, mask)
    outputs[f"{first}/latents_from_text"], outputs[f"{first}/kept"] = text.latents, text.kept.int()
    with sae.splice(model, error_term=True, steer={3: 2.0}):
        outputs[f"{first}/steered_logits"] = model(input_ids=ids, attention_mask=mask).logits
    if "modeling_dmsae" in sys.modules:
        raise SystemExit("the dmsae package was imported: the check must run on the saved code alone")
    save_file({name: tensor.contiguous() for name, tensor in outputs.items()}, spec["out"])
    print(json.dumps({"transformers": transformers.__version__, "torch": torch.__version__}))


if __name__ == "__main__":
    main(json.loads(open(sys.argv[1]).read()))
