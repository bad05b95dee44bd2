"""metrics.json has one typed reader and writer (trainer.run.metrics_file): files of every format
read back to the same values, and nothing outside the metric registry gets in or out."""

from __future__ import annotations

import json
import math

import pytest

from trainer.errors import CorruptRunFileError
from trainer.run.kinds import BASELINE, DMSAE_SPARSE_CORE, RANDOM_CORE
from trainer.run.metrics_file import METRICS_FORMAT, SAEMetrics

VALUES = {"fve": 0.81, "l0": 33.5, "dead_fraction": 0.0, "core_size": 0, "k": 32, "k_noncore": 32, "carry_over": math.nan}


@pytest.mark.parametrize(
    "core, variant, kind", [("distilled", "sparse_core", DMSAE_SPARSE_CORE), ("random", "dense_core", RANDOM_CORE), ("none", "dense_core", BASELINE)]
)
def test_a_file_written_before_the_format_reads_as_its_kind(tmp_path, core, variant, kind):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({**VALUES, "core": core, "variant": variant, "seed": 2}))
    metrics = SAEMetrics.read(path)
    assert (metrics.sae_kind, metrics.seed, metrics.k) == (kind, 2, 32)
    assert metrics["fve"] == 0.81 and set(metrics.values) == set(VALUES)


def test_writing_and_reading_back_gives_the_same_record(tmp_path):
    path = tmp_path / "metrics.json"
    SAEMetrics(VALUES, RANDOM_CORE.name, seed=1).write(path)
    written = json.loads(path.read_text())
    assert written["format"] == METRICS_FORMAT and written["kind"] == RANDOM_CORE.name and "core" not in written
    again = SAEMetrics.read(path)
    assert (again.kind, again.seed) == (RANDOM_CORE.name, 1) and math.isnan(again["carry_over"])
    assert {k: v for k, v in again.values.items() if k != "carry_over"} == {k: v for k, v in VALUES.items() if k != "carry_over"}


def test_a_cycle_names_no_kind(tmp_path):
    path = tmp_path / "metrics.json"
    SAEMetrics({"fve": 0.7, "core_size": 12}).write(path)
    assert "kind" not in json.loads(path.read_text())
    with pytest.raises(ValueError, match="no kind"):
        SAEMetrics.read(path).sae_kind


def test_only_registered_metrics_get_in_or_out(tmp_path):
    with pytest.raises(ValueError, match="unregistered metric.*fvee.*register"):
        SAEMetrics({"fvee": 0.8})
    metrics = SAEMetrics({"fve": 0.8})
    with pytest.raises(KeyError, match="not a registered metric"):
        metrics.get("fvee")
    assert metrics.get("loss_recovered") is None and not metrics.has("loss_recovered")
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"format": METRICS_FORMAT + 1, "fve": 0.8}))
    with pytest.raises(CorruptRunFileError, match="newer than this dmsae reads"):
        SAEMetrics.read(path)
