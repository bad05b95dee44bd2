"""The run's packed contexts, tokenised once per run into an on-disk index that every process and
every stage reads by position.

Without it every process tokenised the whole text stream and kept its share, once for the
training activations (again on every epoch when they are streamed), once for the attribution
sample and once for the held-out set, on every start and resume: at 500M tokens, hours of CPU per
process. With it the text is tokenised once, by the main process, and the others slice it.

One writer, not a split among the processes: packing makes context ``i`` depend on every document
before it (documents are cut at arbitrary token counts), so a process cannot start packing at its
share without the token counts of all the text before it; a split would tokenise in one pass and
pack again in a second. The fast tokenizer tokenises in Rust, so the single pass takes minutes
where the old way took each process hours; the others wait for it in one barrier.

Layout (``RunDirectory.contexts``, in the run folder, shared by every node)::

    manifest.json     what the index was tokenised from (tokenizer, data settings) and how many
                      contexts it was asked for ("num_contexts") and holds ("available")
    input_ids.npy     [num_contexts, context_length] int32 token ids
    mask.npy          [num_contexts, context_length] bool loss masks (PackedContext.mask)

Row ``i`` is context ``i`` of the packed stream (``text_corpus.packed_contexts``). The arrays are
memory-mapped: a process reads only the rows of its own contexts. The folder is built whole and
swapped in (``atomic_folder``), so a killed build leaves no index; an index tokenised from other
settings, or holding fewer contexts than the run needs, is built again with a line saying why.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from transformers import PreTrainedTokenizerBase

from trainer.config import DataConfig
from trainer.errors import CorruptRunFileError
from trainer.harvest.text_corpus import ContextSharding, PackedContext, describe_data, packed_contexts, process_state
from trainer.run.files import atomic_folder, read_json, write_json

INDEX_FORMAT = 1
MANIFEST, IDS, MASK = "manifest.json", "input_ids.npy", "mask.npy"
# (start, count, sharding) -> the contexts start .. start + count - 1 a process owns, in order
ContextSource = Callable[[int, "int | None", "ContextSharding | None"], Iterator[PackedContext]]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Its vocabulary's hash: what decides the token ids of a text (with the special tokens)."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(vocab.encode()).hexdigest()[:16]


def tokenising_source(tokenizer: PreTrainedTokenizerBase, data: DataConfig) -> ContextSource:
    """Contexts tokenised from the text on every call (what the index saves the run from)."""
    return lambda start, count=None, sharding=None: packed_contexts(tokenizer, data, start, count, sharding)


def _manifest(tokenizer: PreTrainedTokenizerBase, data: DataConfig, num_contexts: int) -> dict:
    special = {name: getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "pad")}
    return {
        "format": INDEX_FORMAT,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "special_tokens": special,
        "data": describe_data(data),
        "num_contexts": num_contexts,
    }


def _stale(existing: dict | None, expected: dict) -> str | None:
    """Why an existing index cannot serve (None: it can)."""
    if existing is None:
        return None
    changed = [key for key in ("format", "tokenizer_fingerprint", "special_tokens", "data") if existing.get(key) != expected[key]]
    if changed:
        return f"it was tokenised with another {' and '.join(changed)}"
    if existing.get("num_contexts", 0) < expected["num_contexts"]:
        return f"it holds {existing.get('num_contexts')} contexts, this run needs {expected['num_contexts']}"
    return None


def _read_manifest(folder: Path) -> dict | None:
    if not (folder / MANIFEST).exists():
        return None
    return read_json(folder / MANIFEST, fix=f"delete {folder}: the run tokenises its text again")


def build_context_index(folder: Path, tokenizer: PreTrainedTokenizerBase, data: DataConfig, num_contexts: int) -> None:
    """Tokenise contexts 0 .. num_contexts - 1 into ``folder`` (fewer when the text ends first)."""
    with atomic_folder(folder) as staging:
        shape = (num_contexts, data.context_length)
        ids = np.lib.format.open_memmap(staging / IDS, mode="w+", dtype=np.int32, shape=shape)
        mask = np.lib.format.open_memmap(staging / MASK, mode="w+", dtype=np.bool_, shape=shape)
        available = 0
        for context in packed_contexts(tokenizer, data, 0, num_contexts):
            ids[context.index], mask[context.index] = context.input_ids, context.mask
            available += 1
        ids.flush(), mask.flush()
        del ids, mask
        write_json(staging / MANIFEST, {**_manifest(tokenizer, data, num_contexts), "available": available})


class ContextIndex:
    """A built index, memory-mapped: :meth:`contexts` is a :data:`ContextSource`."""

    def __init__(self, folder: Path):
        self.folder = folder
        manifest = _read_manifest(folder)
        if manifest is None:
            raise CorruptRunFileError(f"no context index in {folder}: rerun with --run.resume true to tokenise the text again")
        self.manifest = manifest
        self.available = int(manifest["available"])
        self._ids = np.load(folder / IDS, mmap_mode="r")
        self._mask = np.load(folder / MASK, mmap_mode="r")

    def contexts(self, start: int, count: int | None = None, sharding: ContextSharding | None = None) -> Iterator[PackedContext]:
        """What ``packed_contexts(tokenizer, data, start, count, sharding)`` yields, read from disk."""
        stop = self.available if count is None else min(self.available, start + count)
        for index in range(start, stop):
            if sharding is None or sharding.owns(index - start):
                yield PackedContext(index, self._ids[index].tolist(), self._mask[index].tolist())


def open_context_index(folder: Path, tokenizer: PreTrainedTokenizerBase, data: DataConfig, num_contexts: int) -> ContextIndex:
    """The run's index of contexts 0 .. num_contexts - 1: built by the main process when missing
    or stale (the others wait), then opened by every process."""
    state = process_state()
    expected = _manifest(tokenizer, data, num_contexts)
    if state.is_main_process:
        existing = _read_manifest(folder)
        reason = _stale(existing, expected)
        if reason:
            print(f"tokenising the text again into {folder}: {reason}")
        if existing is None or reason:
            build_context_index(folder, tokenizer, data, num_contexts)
    state.wait_for_everyone()
    index = ContextIndex(folder)
    if _stale(index.manifest, expected):  # a run folder that is not shared, or a concurrent writer
        raise CorruptRunFileError(f"the context index in {folder} does not match this run: {_stale(index.manifest, expected)}")
    return index
