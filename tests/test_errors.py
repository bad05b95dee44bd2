"""A user's mistake prints as one line naming the problem and the fix; anything else is a bug and
shows its traceback (``trainer.errors``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trainer import distill
from trainer.config import DEFAULT_CONFIG, parse_config
from trainer.errors import ConfigError, CorruptRunFileError, UserError

ROOT = Path(__file__).resolve().parent.parent


def test_a_users_mistake_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DMSAE_DEBUG", raising=False)
    assert distill.cli(["--cycles.tau", "1.5", "--run.output_dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--cycles.tau 1.5: must be in (0, 1]" in err and "Traceback" not in err


def test_a_bug_shows_its_traceback(tmp_path, monkeypatch):
    """A bare ValueError (or KeyError, OSError) from our code is not a user's mistake."""
    from trainer.pipeline import checks

    def buggy(config):
        return {}["missing key"]

    monkeypatch.setattr(checks, "check_before_loading", buggy)
    with pytest.raises(KeyError):
        distill.cli(["--run.output_dir", str(tmp_path / "run"), "--run.dry_run", "true"])


def test_the_users_error_types_are_one_kind():
    from trainer.harvest.base_model import HookPathError
    from trainer.harvest.cache import CacheMismatchError, CorruptShardError, IncompleteCacheError, NonFiniteActivationsError
    from trainer.harvest.text_corpus import DatasetNotFoundError, MissingTextColumnError
    from trainer.sae.training import NonFiniteTrainingError

    kinds = [HookPathError, CacheMismatchError, CorruptShardError, IncompleteCacheError, NonFiniteActivationsError,
             DatasetNotFoundError, MissingTextColumnError, NonFiniteTrainingError]  # fmt: skip
    assert all(issubclass(kind, UserError) for kind in kinds)
    assert issubclass(CorruptShardError, CorruptRunFileError) and issubclass(NonFiniteTrainingError, FloatingPointError)


def old_config(tmp_path: Path, line: str, section: str = "optimizer") -> Path:
    """The default configuration with one more line in ``section``."""
    text = DEFAULT_CONFIG.read_text().replace(f"{section}:\n", f"{section}:\n  {line}\n", 1)
    path = tmp_path / "old.yaml"
    path.write_text(text)
    return path


def test_an_unknown_field_in_a_config_file_names_it_and_the_real_ones(tmp_path):
    with pytest.raises(ConfigError) as error:
        parse_config(["--config", str(old_config(tmp_path, "threshold_start_step: 1000"))])
    message = str(error.value)
    assert "'threshold_start_step'" in message and "'optimizer'" in message and "calibration_tokens" in message
    renamed = tmp_path / "renamed.yaml"
    renamed.write_text(DEFAULT_CONFIG.read_text().replace("optimizer:", "optimiser:"))
    with pytest.raises(ConfigError, match="unknown section 'optimiser'; the sections are model, data"):
        parse_config(["--config", str(renamed)])


def test_an_unknown_field_prints_one_line_without_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "trainer" / "distill.py"), "--config", str(old_config(tmp_path, "threshold_start_step: 1000")), "--dry-run"],
        capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    assert "threshold_start_step" in result.stderr
