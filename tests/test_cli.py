"""``distill.py --help`` starts with examples and lists every setting under its section, with its
docstring; a mistyped flag or a flag without its value is one line on stderr, never a usage dump or
a traceback."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from simple_parsing.docstring import get_attribute_docstring

from trainer import distill
from trainer.config import DistillConfig, parse_config
from trainer.errors import CommandLineError

ROOT = Path(__file__).resolve().parent.parent
DISTILL = str(ROOT / "trainer" / "distill.py")


def run_distill(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, DISTILL, *args], capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})


@pytest.fixture(scope="module")
def help_text() -> str:
    result = run_distill("--help")
    assert result.returncode == 0 and result.stderr == ""
    return result.stdout


def test_help_starts_with_the_examples_and_the_short_forms(help_text):
    top = "\n".join(help_text.splitlines()[:30])
    for example in (
        "python trainer/distill.py\n",
        "accelerate launch --multi_gpu --num_processes 8 trainer/distill.py \\\n      --config trainer/configs/paper_gemma2_l12.yaml",
        "--dry-run",
        "--push-only runs/default --push-to-hub ORG/NAME",
        "--config runs/default/run_config.yaml --resume",
    ):
        assert example in top
    short_forms = help_text[help_text.index("short forms:") :]
    for short_form in ("--config FILE", "--dry-run", "--resume", "--push-to-hub ORG/NAME", "--core SPEC", "--push-only RUN_DIR"):
        assert f"\n  {short_form} " in short_forms


def test_help_lists_every_field_with_its_docstring_under_its_section(help_text):
    flat = " ".join(help_text.split())  # a docstring wrapped over lines reads as one
    for section in dataclasses.fields(DistillConfig):
        assert f"\n{section.name}: " in help_text  # the section as the flags spell it, not its class
        for field in dataclasses.fields(section.default_factory):
            first_words = " ".join(get_attribute_docstring(section.default_factory, field.name).docstring_below.split()[:4])
            assert f"--{section.name}.{field.name} " in help_text and first_words.replace("``", "") in flat, field.name
    assert "--config_path" not in help_text and "Config ['config" not in help_text
    assert "--transfer.ks INT [INT ...]" in help_text and "--dictionary.group_fractions FLOAT [FLOAT ...]" in help_text


def test_help_shows_the_defaults_of_the_config_it_follows():
    paper = run_distill("--config", str(ROOT / "trainer" / "configs" / "paper_gemma2_l12.yaml"), "--help").stdout
    assert "paper_gemma2_l12.yaml" in paper and "Sparsity targets of the final SAEs. (default: 20 40 80 160 320 640)" in paper


def test_push_only_without_its_run_folder_is_one_line():
    result = run_distill("--push-only")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") <= 3 and "Traceback" not in result.stderr
    assert "--push-only needs a value: --push-only RUN_DIR" in result.stderr


def test_an_unknown_flag_is_one_line_naming_it_and_a_close_match():
    result = run_distill("--cycles.kk", "3")
    assert result.returncode == 1 and result.stderr.count("\n") <= 2 and "usage" not in result.stderr
    assert "unknown flag --cycles.kk: did you mean --cycles.k?" in result.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--core"], "--core needs a value: --core SPEC"),
        (["--push-to-hub", "--dry-run"], "--push-to-hub needs a value: --push-to-hub ORG/NAME"),
        (["--config"], "--config needs a value: --config FILE"),
        (["--cycles.k"], "--cycles.k needs a value: --cycles.k INT"),
        (["--cycles.k", "x"], "--cycles.k: invalid int value: 'x'"),
        (["--bogus"], "unknown flag --bogus"),
        (["--push_to_hub", "org/run"], "unknown flag --push_to_hub: did you mean --push-to-hub?"),
        (["--cycles.k", "3", "4"], "unexpected value '4'"),
    ],
)
def test_a_mistyped_command_line_is_one_line(argv, message, capsys):
    assert distill.cli(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "(--help lists every flag)" in err
    with pytest.raises(CommandLineError):
        parse_config(argv)
