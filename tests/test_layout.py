"""The import rule of ``trainer/`` (README, "Development"): rooms in one order, each importing only
from the rooms below it and, without a circle, from its own; the leaves import nothing above them;
``distill.py --help`` loads neither torch nor transformers."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The rooms, lowest first. hub_cards publishes a finished run folder: it reads the run's layout
# and settings, and the pipeline calls it.
ROOMS = [
    "trainer.errors",
    "trainer.config",
    "trainer.run",
    "trainer.harvest",
    "trainer.sae",
    "trainer.report",
    "hub_cards",
    "trainer.pipeline",
    "trainer.distill",
]
PACKAGES = ("trainer", "hub_cards", "modeling_dmsae")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room_of(module: str) -> str | None:
    """The room a module belongs to (the longest room name it starts with)."""
    matches = [room for room in ROOMS if module == room or module.startswith(room + ".")]
    return max(matches, key=len) if matches else None


def imported_modules(path: Path) -> set[str]:
    """Every module of our packages that ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.split(".")[0] in PACKAGES}


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports (names that are attributes, not modules, dropped)."""
    files = {module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}
    return {module: {name for name in imported_modules(path) if name in files and name != module} for module, path in files.items()}


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Arrows that point up, leave modeling_dmsae for trainer/hub_cards, or close a circle."""
    wrong = []
    for module, targets in graph.items():
        for target in targets:
            source_room, target_room = room_of(module), room_of(target)
            if module.startswith("modeling_dmsae") and target_room is not None:
                wrong.append(f"{module} -> {target}: the model package is standalone (it is the Hub's remote code)")
            elif source_room is None or target_room is None:
                continue
            elif ROOMS.index(target_room) > ROOMS.index(source_room):
                wrong.append(f"{module} ({source_room}) -> {target} ({target_room}): imports from a room above it")
    wrong += [f"import circle: {' -> '.join(circle)}" for circle in circles(graph)]
    return wrong


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per module that can reach itself (package __init__ files that only hold the
    package are not arrows)."""
    found = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            module, path = stack.pop()
            for target in graph[module]:
                if target == start:
                    found.append(path + [start])
                    stack.clear()
                    break
                if target not in seen:
                    seen.add(target)
                    stack.append((target, path + [target]))
    return found


def test_every_module_of_trainer_is_in_a_room():
    assert [m for m in import_graph() if m.startswith("trainer.") and room_of(m) is None] == []


def test_imports_point_down_the_rooms():
    assert violations(import_graph()) == []


@pytest.mark.parametrize(
    "arrow, complaint",
    [
        (("trainer.config", "trainer.run.layout"), "imports from a room above it"),
        (("trainer.sae.training", "trainer.pipeline.training"), "imports from a room above it"),
        (("trainer.errors", "trainer.config"), "imports from a room above it"),
        (("modeling_dmsae.modeling_dmsae", "trainer.errors"), "the model package is standalone"),
        (("trainer.run.files", "trainer.run.timings"), "import circle"),
    ],
)
def test_the_rule_catches_a_wrong_arrow(arrow, complaint):
    graph = import_graph()
    graph[arrow[0]] = graph[arrow[0]] | {arrow[1]}
    assert any(complaint in line for line in violations(graph))


def test_the_leaves_import_nothing_above_them():
    graph = import_graph()
    assert not any(m.startswith("trainer") for m in graph["trainer.errors"])
    assert {m for m in graph["trainer.config"] if m.startswith("trainer")} <= {"trainer.errors"}


def test_one_sae_knows_neither_the_data_source_nor_the_run_folder():
    """As SAELens's trainer: handed a data iterator and callbacks."""
    graph = import_graph()
    sae_imports = {target for module, targets in graph.items() if module.startswith("trainer.sae.") for target in targets}
    assert not sae_imports & {"trainer.harvest.cache", "trainer.harvest.run_data", "trainer.run.layout", "trainer.run.plan"}


def test_help_imports_neither_torch_nor_transformers():
    result = subprocess.run(
        [sys.executable, "-X", "importtime", str(ROOT / "trainer" / "distill.py"), "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "--cycles.k" in result.stdout
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "simple_parsing" in imported  # the check reads what it should
    assert {"torch", "transformers", "datasets", "huggingface_hub", "accelerate"} & imported == set()


def test_the_cli_default_group_fractions_are_saebenchs():
    from modeling_dmsae.configuration_dmsae import SAEBENCH_GROUP_FRACTIONS
    from trainer.config import DictionaryConfig

    assert DictionaryConfig().group_fractions == list(SAEBENCH_GROUP_FRACTIONS)
