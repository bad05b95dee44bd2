"""The README and docs/ against the code.

- The README's quickstart runs verbatim on the embedded SmolLM2, against a small real run that the
  trainer writes where `make run` writes (runs/default under the working directory).
- The README stays one page; every relative link, anchor and repository path the documents name
  exists; every Python snippet compiles; the documents speak of the software, not of how it was built.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import network_blocked

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_CHARACTERS = 12_000
DOC_FILES = ("index.md", "method.md", "training.md", "run-folder.md", "hub.md", "interop.md", "results.md",
             "benchmarks.md", "development.md")  # fmt: skip
QUICKSTART_HEADING = "## Quickstart"

# How the project was made is no part of its documentation (the same pattern as
# `grep -rniE '\bissue #?[0-9]+|\bwas lent\b|no gpu was' README.md docs`), nor are these phrases.
PROJECT_HISTORY = re.compile(r"\bissue #?[0-9]+|\bwas lent\b|no gpu was", re.IGNORECASE)
STORYTELLING = re.compile(r"measured before issues|pitfalls met|\bthis session\b|\bthese sessions\b", re.IGNORECASE)

FENCE = re.compile(r"^```[^\n]*\n.*?^```[ \t]*$", re.MULTILINE | re.DOTALL)
PYTHON_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
REPO_PATH = re.compile(r"^(?:trainer|modeling_dmsae|hub_cards|bench|tests|\.ci)/[\w./-]*$")


def documents() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md")), ROOT / "CHANGELOG.md"]


def prose(text: str) -> str:
    """The text without its fenced code blocks."""
    return FENCE.sub("", text)


def section(text: str, heading: str) -> str:
    """The text under ``heading`` (a '## ' line) up to the next '## ' heading."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    assert start is not None, f"README.md has no {heading!r} heading"
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "".join(lines[start + 1 : end])


def anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file."""
    seen: Counter[str] = Counter()
    result = set()
    for line in prose(markdown).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        result.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")
        seen[slug] += 1
    return result


# ---- The README's quickstart, verbatim, on the embedded model --------------------------------------

# The embedded default (SmolLM2-135M, layer 12, the embedded corpus) at a tiny size: one cycle and the
# k = 32 dense-core DMSAE the quickstart loads. No --run.output_dir: the run goes where `make run`'s does.
SMALL_EMBEDDED_RUN = [
    "--data.context_length", "32",
    "--harvest.train_tokens", "4096", "--harvest.attribution_tokens", "128", "--harvest.positions_per_context", "16",
    "--harvest.batch_size", "8", "--harvest.attribution_batch_size", "8", "--harvest.contexts_per_shard", "16",
    "--dictionary.num_latents", "256", "--dictionary.dead_tokens_threshold", "4096",
    "--optimizer.warmup_steps", "2", "--optimizer.lr", "0.003", "--optimizer.calibration_tokens", "1024",
    "--cycles.num_cycles", "1", "--cycles.k", "32", "--cycles.tokens_per_cycle", "2048", "--cycles.batch_size", "256",
    "--transfer.ks", "32", "--transfer.tokens", "2048", "--transfer.baseline", "false",
    "--transfer.random_core_control", "false", "--transfer.sparsity_matched", "false",
    "--eval.tokens", "512", "--eval.ce_contexts", "2", "--run.log_with", "none",
]  # fmt: skip


def quickstart_code() -> str:
    blocks = PYTHON_BLOCK.findall(section(README.read_text(encoding="utf-8"), QUICKSTART_HEADING))
    assert blocks, "the README's quickstart has no ```python block"
    return "\n".join(blocks)


def quickstart_sae_folder() -> str:
    match = re.search(r"AutoModel\.from_pretrained\(\"([^\"]+)\"\)", quickstart_code())
    assert match, "the quickstart loads no SAE with AutoModel.from_pretrained(\"...\")"
    return match.group(1)


@pytest.fixture(scope="module")
def run_cwd(tmp_path_factory) -> Path:
    """A working directory in which trainer/distill.py, run as a user runs it and offline, has written
    a small real run of the embedded default to runs/default (~1.5 min on 2 CPU cores)."""
    cwd = tmp_path_factory.mktemp("quickstart")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DMSAE_DEBUG": "1",
    }  # fmt: skip
    command = [sys.executable, str(ROOT / "trainer" / "distill.py"), *SMALL_EMBEDDED_RUN, "--data.corpus_dir", str(cwd / "corpus")]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, f"the small embedded run failed:\n{result.stderr[-4000:]}"
    return cwd


def test_the_quickstart_reads_the_sae_make_run_trains():
    """The folder the quickstart loads is the k = 32 DMSAE of the default run's folder."""
    default = yaml.safe_load((ROOT / "trainer" / "configs" / "default.yaml").read_text())
    ks = {default["cycles"]["k"], *default["transfer"]["ks"]}  # the transfer stage adds the distillation k
    variants = default["transfer"].get("variants", ["dense_core"])
    made = {f"{default['run']['output_dir']}/transfer/k-{k:04d}-{variant}" for k in ks for variant in variants}
    assert quickstart_sae_folder() in made, f"{quickstart_sae_folder()} is none of the default run's final DMSAEs {sorted(made)}"


@pytest.mark.timeout(900)
def test_the_readme_quickstart_runs_verbatim(run_cwd, monkeypatch, capsys):
    folder = run_cwd / quickstart_sae_folder()
    assert (folder / "config.json").is_file(), f"the run wrote no SAE at {folder} (it has {sorted(p.name for p in (run_cwd / 'runs/default/transfer').glob('*'))})"
    monkeypatch.chdir(run_cwd)
    namespace = {"__name__": "__readme_quickstart__"}
    with network_blocked():
        exec(compile(quickstart_code(), f"{README} ({QUICKSTART_HEADING[3:]})", "exec"), namespace)
    printed = capsys.readouterr().out

    sae, out, input_ids = namespace["sae"], namespace["out"], namespace["input_ids"]
    assert out.latents.shape == (*input_ids.shape, sae.config.num_latents)
    assert out.kept.shape == input_ids.shape and not out.kept[0, 0] and out.kept[0, 1:].any()
    assert (out.latents[~out.kept] == 0).all(), "positions the SAE did not encode must have zero latents"
    assert "(not encoded)" in printed and f"latent {namespace['j']} promotes" in printed and "unsteered" in printed


# ---- The documents -------------------------------------------------------------------------------


def test_the_readme_is_one_page():
    size = len(README.read_text(encoding="utf-8"))
    assert size <= MAX_README_CHARACTERS, f"README.md has {size:,} characters; at most {MAX_README_CHARACTERS:,} (move detail to docs/)"


def test_docs_holds_every_document_and_the_index_lists_them():
    missing = [name for name in DOC_FILES if not (DOCS / name).is_file()]
    assert not missing, f"docs/ lacks {missing}"
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    assert not [name for name in DOC_FILES if name != "index.md" and f"({name})" not in index], "docs/index.md must link every document"


def test_the_documents_speak_of_the_software_not_of_its_making():
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in documents() if path.exists()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if PROJECT_HISTORY.search(line) or STORYTELLING.search(line)
    ]  # fmt: skip
    assert not found, "documents that tell how the project was made:\n" + "\n".join(found)


def test_every_relative_link_and_anchor_exists():
    broken = []
    for path in documents():
        for target in LINK.findall(prose(path.read_text(encoding="utf-8"))):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text(encoding="utf-8")):
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_every_repository_path_the_documents_name_exists():
    """Paths in `code spans` under the package and tool folders: the documents mirror the code."""
    missing = sorted(
        f"{path.relative_to(ROOT)}: {span}"
        for path in documents()
        for span in CODE_SPAN.findall(prose(path.read_text(encoding="utf-8")))
        if REPO_PATH.match(span) and not (ROOT / span).exists()
    )
    assert not missing, "paths that do not exist (renamed or moved?):\n" + "\n".join(missing)


def test_every_python_snippet_compiles():
    for path in documents():
        for number, block in enumerate(PYTHON_BLOCK.findall(path.read_text(encoding="utf-8")), 1):
            compile(block, f"{path.relative_to(ROOT)} python block {number}", "exec")
