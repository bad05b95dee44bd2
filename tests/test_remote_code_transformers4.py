"""A saved DMSAE folder runs its own code files under transformers 4.56 as under the current
transformers, in an environment without dmsae (``bench/remote_code_check.py``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.remote_code_check import DEFAULT_VENV, TOLERANCE, check

VENV = Path(os.environ.get("DMSAE_TF4_VENV", DEFAULT_VENV))


@pytest.mark.skipif(
    not (VENV / "bin" / "python").exists(),
    reason=f"no transformers 4.x environment at {VENV}: `python bench/remote_code_check.py` builds it (about 1 min)",
)
def test_a_saved_folder_encodes_and_splices_the_same_under_transformers_4():
    result = check([], VENV)
    assert result.versions["4.x"]["transformers"].startswith("4.56.")
    assert not result.versions["current"]["transformers"].startswith("4.")
    assert set(result.differences) == {"tiny/encode", "tiny/latents_from_text", "tiny/kept", "tiny/steered_logits"}
    assert all(count > 0 for count in result.active.values())
    assert max(result.differences.values()) <= TOLERANCE, result.differences
