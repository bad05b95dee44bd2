"""Every ``--flag`` the package's messages and docstrings tell a user to pass exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import simple_parsing
from simple_parsing import ArgumentGenerationMode, NestedMode

from modeling_dmsae.convert_checkpoints import ConvertArgs
from trainer.config import ALIASES, DistillConfig, parse_config
from trainer.errors import CommandLineError

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("modeling_dmsae", "trainer", "hub_cards")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_.-]*[a-z0-9_]")
# Flags of other programs that messages quote in full commands, and the usage placeholder.
OTHER_PROGRAMS = {
    "--no-deps": "pip install --no-deps", "--force": "hf auth login --force", "--section.field": "--section.field",
    "--include": "hf download", "--local-dir": "hf download",
    "--multi_gpu": "accelerate launch --multi_gpu", "--num_processes": "accelerate launch --multi_gpu --num_processes",
    "--mixed_precision": "accelerate launch --mixed_precision",
}  # fmt: skip


def option_strings(config_class: type, **parser_options) -> set[str]:
    """The options simple_parsing.parse(config_class, ...) accepts, built the way it builds them."""
    parser = simple_parsing.ArgumentParser(nested_mode=NestedMode.WITHOUT_ROOT, **parser_options)
    parser.add_arguments(config_class, dest="config")
    parser._preprocessing()  # simple_parsing adds the dataclass fields' options lazily
    return set(parser._option_string_actions)


DISTILL_FLAGS = option_strings(DistillConfig, argument_generation_mode=ArgumentGenerationMode.NESTED) | set(ALIASES) | {"--config", "--push-only"}
CONVERT_FLAGS = option_strings(ConvertArgs)


def mentioned_flags() -> list[tuple[str, str, str]]:
    """(flag, where, the string) for every --flag in a string literal of the package's source."""
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text())
            # An f-string is one message: its pieces are read together, the fields as "{}".
            pieces = {id(value) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for value in node.values}
            for node in ast.walk(tree):
                if isinstance(node, ast.JoinedStr):
                    text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
                elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in pieces:
                    text = node.value
                else:
                    continue
                for flag in FLAG.findall(text):
                    found.append((flag, f"{path.relative_to(ROOT)}:{node.lineno}", text))
    return found


def test_the_scan_finds_the_messages():
    flags = {flag for flag, _, _ in mentioned_flags()}
    assert {"--run.resume", "--harvest.cache_dir", "--data.text_column", "--push-only", "--transfer.ks"} <= flags


def test_the_parser_accepts_what_the_options_say():
    assert {"--cycles.k", "--data.context_length", "--run.resume"} <= DISTILL_FLAGS and "--dataset" not in DISTILL_FLAGS
    assert parse_config(["--data.text_column", "body", "--data.pad_last_context", "true"]).data.text_column == "body"
    with pytest.raises(CommandLineError, match="unknown flag --text_column: did you mean --data.text_column"):
        parse_config(["--text_column", "body"])


def test_every_flag_in_a_message_exists():
    wrong = []
    for flag, where, text in mentioned_flags():
        if flag in OTHER_PROGRAMS:
            if OTHER_PROGRAMS[flag] not in text:
                wrong.append(f"{where}: {flag} outside the command it belongs to")
            continue
        accepted = CONVERT_FLAGS if where.startswith("modeling_dmsae/convert_checkpoints.py") else DISTILL_FLAGS
        if flag not in accepted:
            wrong.append(f"{where} tells the user to pass {flag}, which the parser rejects: {text!r}")
    assert not wrong, "\n".join(wrong)
