"""The training curves of a run: one JSON line per logged step in ``logs/STAGE.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path

from trainer.run.files import write_text


def read_records(path: Path) -> list[dict]:
    """A stage's logged records; empty when it logged nothing."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def read_curve(path: Path, name: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one logged quantity; empty when the stage logged nothing."""
    records = read_records(path)
    return [r["step"] for r in records], [r[name] for r in records]


def truncate_log(path: Path, steps_taken: int) -> None:
    """Drop log records a resumed stage will write again."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] < steps_taken]
    write_text(path, "".join(line + "\n" for line in kept))


def append_record(path: Path, record: dict) -> None:
    with path.open("a") as log:
        log.write(json.dumps(record) + "\n")
