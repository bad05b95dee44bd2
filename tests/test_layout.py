"""The import rule of ``trainer/`` (docs/development.md): rooms in one order, each importing only
from the rooms below it and, without a circle, from its own; the leaves import nothing above them;
``distill.py --help`` loads neither torch nor transformers. The model package imports no room, and
its model file does not import back the files that import it.

An import inside a function is an arrow for the rooms, but it runs when the function is called, not
when its module loads: the circles are those of the imports that run at load time (an ``if
TYPE_CHECKING:`` import counts among them, as a type checker follows it)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The rooms, lowest first. hub_cards publishes a finished run folder: a reader of the run's records
# (its layout, settings, kinds and metrics), handed to the pipeline as its publisher by the entry point.
ROOMS = [
    "trainer.errors",
    "trainer.config",
    "trainer.run",
    "trainer.harvest",
    "trainer.sae",
    "trainer.report",
    "trainer.pipeline",
    "hub_cards",
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


def package_of(path: Path) -> str:
    """The package a relative import in ``path`` starts from."""
    return module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]


def _names(node: ast.Import | ast.ImportFrom, package: str) -> set[str]:
    """The modules (and attributes) an import statement names, relative ones made absolute."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    base = node.module or ""
    if node.level:
        parent = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join([*parent, *([node.module] if node.module else [])])
    return {base, *(f"{base}.{alias.name}" for alias in node.names)}


def imported_modules(source: str, package: str, lazy: bool = True) -> set[str]:
    """Every module of our packages that ``source`` (a module of ``package``) imports: at load time
    (its top level, ``if TYPE_CHECKING:`` and ``try:`` blocks included) and, with ``lazy``, inside
    its functions too."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.update(_names(child, package))
            elif lazy or not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child)

    visit(ast.parse(source))
    return {name for name in found if name.split(".")[0] in PACKAGES}


def import_graph(lazy: bool = True) -> dict[str, set[str]]:
    """Module -> the modules of ours it imports (names that are attributes, not modules, dropped);
    without ``lazy``, only the imports that run when it loads."""
    files = {module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}
    return {
        module: {name for name in imported_modules(path.read_text(), package_of(path), lazy) if name in files and name != module}
        for module, path in files.items()
    }


def violations(graph: dict[str, set[str]], at_load: dict[str, set[str]] | None = None) -> list[str]:
    """Arrows of ``graph`` that point up or leave modeling_dmsae for trainer/hub_cards, and circles
    of ``at_load`` (the arrows that run at load time; default: ``graph``)."""
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
    wrong += [f"import circle: {' -> '.join(circle)}" for circle in circles(graph if at_load is None else at_load)]
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
    assert violations(import_graph(), import_graph(lazy=False)) == []


@pytest.mark.parametrize(
    "arrow, complaint",
    [
        (("trainer.config", "trainer.run.layout"), "imports from a room above it"),
        (("trainer.sae.training", "trainer.pipeline.training"), "imports from a room above it"),
        (("trainer.errors", "trainer.config"), "imports from a room above it"),
        (("modeling_dmsae.modeling_dmsae", "trainer.errors"), "the model package is standalone"),
        (("trainer.run.files", "trainer.run.timings"), "import circle"),
        (("trainer.pipeline.cycles", "hub_cards.publish"), "imports from a room above it"),
        (("hub_cards.cards", "trainer.distill"), "imports from a room above it"),
    ],
)
def test_the_rule_catches_a_wrong_arrow(arrow, complaint):
    graph, at_load = import_graph(), import_graph(lazy=False)
    for arrows in (graph, at_load):
        arrows[arrow[0]] = arrows[arrow[0]] | {arrow[1]}
    assert any(complaint in line for line in violations(graph, at_load))


MODEL, INTERVENTIONS = "modeling_dmsae.modeling_dmsae", "modeling_dmsae.interventions"


def test_the_model_file_and_interventions_import_one_way():
    """interventions use the model; the model file's methods that hand over to them import them
    when called, never when it loads."""
    at_load, graph = import_graph(lazy=False), import_graph()
    assert MODEL in at_load[INTERVENTIONS]  # the checker sees the relative import
    assert INTERVENTIONS not in at_load[MODEL], "modeling_dmsae.py imports interventions.py at load time: import it inside the method"
    assert INTERVENTIONS in graph[MODEL]  # ... and sees the lazy one as an arrow of the rooms' rule


def test_the_checker_sees_relative_type_checking_and_lazy_imports():
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from .modeling_dmsae import DMSAEModel\n"
        "try:\n    from . import configuration_dmsae\nexcept ImportError:\n    pass\n"
        "def splice():\n    from .interventions import splice_sae\n"
    )
    at_load = imported_modules(source, "modeling_dmsae", lazy=False)
    assert {MODEL, "modeling_dmsae.configuration_dmsae"} <= at_load and INTERVENTIONS not in at_load
    assert INTERVENTIONS in imported_modules(source, "modeling_dmsae")
    both_ways = import_graph(lazy=False)
    both_ways[MODEL] = both_ways[MODEL] | {INTERVENTIONS}
    assert any(INTERVENTIONS in line and "circle" in line for line in violations(import_graph(), both_ways))


def test_the_leaves_import_nothing_above_them():
    graph = import_graph()
    assert not any(m.startswith("trainer") for m in graph["trainer.errors"])
    assert {m for m in graph["trainer.config"] if m.startswith("trainer")} <= {"trainer.errors"}


def test_one_sae_knows_neither_the_data_source_nor_the_run_folder():
    """As SAELens's trainer: handed a data iterator and callbacks."""
    graph = import_graph()
    sae_imports = {target for module, targets in graph.items() if module.startswith("trainer.sae.") for target in targets}
    assert not sae_imports & {"trainer.harvest.cache", "trainer.harvest.harvested", "trainer.run.layout", "trainer.run.stages"}


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


def test_only_the_entry_point_imports_the_hub_code():
    """hub_cards reads a finished run; the trainer's rooms hand it nothing but through the publisher
    (trainer.pipeline.context.Publisher) that distill.py wires in."""
    graph = import_graph()
    importers = {module for module, targets in graph.items() if any(t.startswith("hub_cards") for t in targets)}
    assert {m for m in importers if not m.startswith("hub_cards")} == {"trainer.distill"}


# Where a kind's name may be spelled: its registry entry, and the CLI's choices and defaults.
KIND_NAME_HOMES = {ROOT / "trainer" / "run" / "kinds.py", ROOT / "trainer" / "config.py"}


def kind_spellings() -> set[str]:
    """Every name of a kind of SAE: the registry's names, folder prefixes and Hub suffixes, the
    masking variants, and the names metrics.json files used for a kind before the registry."""
    from trainer.run.kinds import KINDS

    names = {f'"{kind.name}"' for kind in KINDS.values()} | {f'"{kind.variant}"' for kind in KINDS.values()}
    names |= {kind.folder.split("{")[0].strip("-") for kind in KINDS.values() if not kind.folder.startswith("k-")}
    names |= {kind.hub_suffix.split("{")[0] for kind in KINDS.values() if kind.hub_suffix}  # a factor's, up to the factor
    return names | {'"random"', '"distilled"'}


def spelled_kind_names(path: Path) -> list[str]:
    text = path.read_text()
    return sorted(name for name in kind_spellings() if name in text)


def test_kind_names_are_spelled_only_in_the_registry_and_the_cli():
    offenders = {
        str(path.relative_to(ROOT)): spelled_kind_names(path)
        for package in ("trainer", "hub_cards")
        for path in sorted((ROOT / package).rglob("*.py"))
        if path not in KIND_NAME_HOMES and spelled_kind_names(path)
    }
    assert offenders == {}


def test_the_kind_name_check_catches_a_spelling(tmp_path):
    module = tmp_path / "report.py"
    module.write_text('if metrics.kind == "random-core":\n    pass\n')
    assert '"random-core"' in spelled_kind_names(module)
    module.write_text('name = f"k-{k:04d}-sparse_core"\n')
    assert spelled_kind_names(module) == []  # a folder's pattern alone says no kind name: the variant is quoted nowhere
    module.write_text('variant = "sparse_core"\n')
    assert spelled_kind_names(module) == ['"sparse_core"']
