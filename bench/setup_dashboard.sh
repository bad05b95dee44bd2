#!/usr/bin/env bash
# Build sae-dashboard's own environment, .dashboard-venv, for the render step of bench/field_viewers.py
# (sae-dashboard HTML and Neuronpedia batch JSON from a run's SAELens exports). sae-dashboard 0.8.0
# pins transformers < 4.57 while this project needs transformers >= 5, so the project is NOT installed
# here: the prepare step runs in the project's .venv and hands over plain files (a float32 HF checkpoint
# of the base model, token ids, the SAELens export, settings.json). Nothing reaches the project's .venv.
#
#   bash bench/setup_dashboard.sh          # creates ./.dashboard-venv (or $DASHBOARD_VENV)
#
# Pitfalls met on the way, each handled below:
# - torch: an unconstrained resolution replaces the CPU build with a ~7 GB CUDA one; it is installed
#   first and held by a constraints file;
# - torchvision (pulled in by decode-clt) arrives as PyPI's CUDA build, whose operators do not register
#   on the CPU torch, and transformers' lazy imports then fail: removed again, nothing here uses it;
# - pyarrow: transformer-lens 2.17 holds numpy < 2 on Python < 3.12, and the newest pyarrow (26.0.1
#   unconstrained) does not import with NumPy 1 ("pyarrow requires NumPy 2.0 or newer"): held below 20.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DASHBOARD_VENV:-$ROOT/.dashboard-venv}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
SAE_DASHBOARD_VERSION="${SAE_DASHBOARD_VERSION:-0.8.0}"

"$PYTHON" -m venv "$VENV"
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
printf 'torch==%s\npyarrow<20\n' "$TORCH_VERSION" >"$CONSTRAINTS"
PIP=("$VENV/bin/python" -m pip install --quiet -c "$CONSTRAINTS")
"${PIP[@]}" --upgrade pip
"${PIP[@]}" "torch==$TORCH_VERSION"
"${PIP[@]}" "sae-dashboard==$SAE_DASHBOARD_VERSION"
"$VENV/bin/python" -m pip uninstall --quiet --yes torchvision

"$VENV/bin/python" - <<'EOF'
import torch
assert "+cpu" in torch.__version__ or not torch.cuda.is_available(), torch.__version__
import sae_dashboard, sae_lens, transformer_lens, transformers  # noqa: F401
from sae_dashboard.neuronpedia.neuronpedia_runner import NeuronpediaRunner  # noqa: F401
from importlib.metadata import version
print("dashboard venv ready: " + ", ".join(
    f"{name} {version(name)}" for name in ("torch", "sae-dashboard", "sae-lens", "transformer-lens", "transformers", "pyarrow")))
EOF
