#!/usr/bin/env bash
# Build the benchmark's own environment, .bench-venv, holding this project and the two peer
# implementations it is timed against (dictionary_learning, SAELens). Their dependencies stay
# here and never reach the project's .venv.
#
#   bash bench/setup_peers.sh            # creates /work/main/.bench-venv (or $BENCH_VENV)
#
# torch is installed first, pinned to the CPU build, and held there by a constraints file so
# that no peer dependency can pull another torch (an unpinned one downloads GBs of CUDA).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BENCH_VENV:-$ROOT/.bench-venv}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet)
"${PIP[@]}" --upgrade pip
"${PIP[@]}" "torch==$TORCH_VERSION"

CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH_VERSION" >"$CONSTRAINTS"

# This project (editable), so the benchmark times the working tree.
"${PIP[@]}" -c "$CONSTRAINTS" -e "$ROOT"

# dictionary_learning 0.1.0 pins nnsight<0.4, umap-learn, wandb, ... for its buffer, evaluation
# and training loop; the Matryoshka trainer module needs only torch and einops. Its package
# __init__ imports nnsight, so bench/peers.py loads the trainer module without running it.
"${PIP[@]}" -c "$CONSTRAINTS" --no-deps dictionary-learning==0.1.0
"${PIP[@]}" -c "$CONSTRAINTS" einops

# SAELens with its declared dependencies (transformer-lens, ...), torch held by the constraint.
"${PIP[@]}" -c "$CONSTRAINTS" sae-lens==6.54.12

"$VENV/bin/python" - <<'EOF'
import torch
assert "+cpu" in torch.__version__ or not torch.cuda.is_available(), torch.__version__
import sae_lens, modeling_dmsae  # noqa: F401
print(f"bench venv ready: torch {torch.__version__}, sae_lens {sae_lens.__version__}")
EOF
