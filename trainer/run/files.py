"""Reading and writing a run's files so that a kill never leaves half of one: every write goes to
a hidden temporary sibling that is renamed over the target once complete (a rename is atomic),
and a folder is built whole in a hidden sibling and swapped in."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from trainer.errors import CorruptRunFileError


def read_json(path: Path, fix: str = "delete the folder it belongs to and rerun with --run.resume true") -> Any:
    """The JSON in ``path``; CorruptRunFileError naming the file and ``fix`` when it is missing or
    not JSON (a run file is never half-written, so either means something deleted or damaged it)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CorruptRunFileError(f"{path} is missing: {fix}") from None
    except ValueError as error:
        raise CorruptRunFileError(f"{path} is not valid JSON ({error}): {fix}") from None


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a hidden temporary path of this process to write ``path``'s content to (with any
    writer: torch.save, savefig, ...); it becomes ``path`` once the block completes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield temporary
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    os.replace(temporary, path)


def write_bytes(path: Path, payload: bytes) -> None:
    with atomic_path(path) as temporary:
        temporary.write_bytes(payload)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, payload: Any) -> None:
    write_text(path, json.dumps(payload, indent=2))


def link_or_copy(source: Path, target: Path) -> None:
    """Place ``source``'s bytes at ``target`` atomically: a hard link (no copy of large weights)
    where the filesystem allows, a copy otherwise."""
    if target.exists() and os.path.samefile(source, target):
        return  # already linked (rename() onto the same inode would leave the temporary behind)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp{os.getpid()}")
    temporary.unlink(missing_ok=True)
    try:
        os.link(source, temporary)
    except OSError:
        shutil.copy2(source, temporary)
    os.replace(temporary, target)


@contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield a hidden folder to build ``target`` in; once the block completes it replaces
    ``target`` whole. A kill inside the block leaves the previous ``target`` (or none) and a hidden
    leftover that the next build of the same folder removes."""
    staging, previous = target.with_name(f".{target.name}.partial"), target.with_name(f".{target.name}.previous")
    for leftover in (staging, previous):
        shutil.rmtree(leftover, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        os.replace(target, previous)
    os.replace(staging, target)
    shutil.rmtree(previous, ignore_errors=True)


def require_files(folder: Path, names: tuple[str, ...], fix: str) -> None:
    """CorruptRunFileError naming the missing files of a finished stage's folder and the fix."""
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise CorruptRunFileError(f"{folder} is incomplete ({', '.join(missing)} missing): {fix}")
