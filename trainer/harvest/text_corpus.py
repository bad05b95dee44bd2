"""Text -> packed token contexts, from any HF dataset or the embedded offline corpus.

Public API:

- Its settings are ``trainer.config.DataConfig``: which dataset, which text column, context length,
  BOS / EOS / padding.
- :func:`packed_contexts` ``(tokenizer, cfg, start=0, count=None, sharding=None)``: the dataset's
  documents tokenized and packed into contexts of exactly ``cfg.context_length`` tokens, yielded as
  :class:`PackedContext` (global index, token ids, loss mask). Context ``i`` is always the same
  tokens, so ``start`` / ``count`` pick disjoint ranges (training, attribution, held-out).
- :class:`ContextSharding`: which contexts a process owns under Accelerate: blocks of
  ``block_size`` consecutive contexts dealt round-robin to the processes, so no context is seen
  twice and none is missed. :func:`process_state` is Accelerate's view of the processes.
- :func:`context_batches` ``(contexts, batch_size)``: stacks contexts into :class:`ContextBatch`.
- :func:`materialize_embedded_corpus` ``(directory=None) -> Path``: writes the embedded corpus.

Packing: documents are tokenized without special tokens, each is followed by EOS
(``append_eos``), and the stream is cut into contexts; each context starts with BOS when
``prepend_bos`` is on (default: whenever the tokenizer has a BOS token, whether or not it adds it
itself: SmolLM2's does not, and without it the first text token of every context becomes the
model's attention sink, a position of enormous norm; with it the sink sits on the masked BOS). The last incomplete context is dropped, or right-padded when ``pad_last_context``.

Loss mask (which positions count for SAE training and for attribution): by default every real
token except the BOS that starts a context; padding positions never count. ``mask_bos=False``
keeps BOS positions (as dictionary_learning does) and ``mask_eos=True`` drops the EOS separators.
BOS activations are excluded by default because they are huge outliers that carry no information
about the text and would dominate the reconstruction loss.

The embedded default corpus is real text that ships with CPython, so the default run needs no
download: the documentation topics of ``pydoc_data.topics`` (~465k characters) and the standard
library's top-level modules as code (~4.7M characters, in ~100-line chunks) unless
``embedded_code=False``, in one seeded random order so that every range of the stream (training,
attribution, held-out) holds the same mix. It is written once to a JSON-lines file and read
through ``datasets`` like any local dataset.
"""

from __future__ import annotations

import json
import os
import random
import sys
import sysconfig
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from datasets import IterableDataset, load_dataset
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from trainer.config import DataConfig
from trainer.errors import ConfigError, EmptyDatasetError
from trainer.run.files import atomic_path

LOCAL_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
TOKENIZE_BATCH_DOCUMENTS = 16  # documents per tokenizer call (the fast tokenizer batches in Rust)


class MissingTextColumnError(ConfigError, KeyError):
    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0])


class DatasetNotFoundError(ConfigError, FileNotFoundError):
    """--data.dataset names neither a local file nor a reachable Hub dataset."""


def describe_data(cfg: DataConfig) -> dict:
    """The fields that decide which tokens the contexts hold (recorded in activation caches)."""
    fields = asdict(cfg)
    del fields["corpus_dir"]
    if cfg.dataset:
        del fields["embedded_code"]
        if Path(cfg.dataset).expanduser().exists():  # ./x, x/ and /abs/x are one dataset
            fields["dataset"] = str(Path(cfg.dataset).expanduser().resolve())
    else:
        fields["python"] = sys.version.split()[0]  # the embedded text comes with the interpreter
        fields["embedded_layout"] = EMBEDDED_LAYOUT
    return fields


class PackedContext(NamedTuple):
    index: int  # position in the packed stream, the same whatever the process count
    input_ids: list[int]  # exactly context_length tokens
    mask: list[bool]  # True where the position counts for training and attribution


class ContextBatch(NamedTuple):
    input_ids: Tensor  # [B, T] long
    mask: Tensor  # [B, T] bool
    index: Tensor  # [B] long, the contexts' global indices


@dataclass(frozen=True)
class ContextSharding:
    """Deals blocks of ``block_size`` consecutive contexts round-robin to ``num_processes``."""

    process_index: int = 0
    num_processes: int = 1
    block_size: int = 1

    @classmethod
    def current(cls, block_size: int = 1) -> ContextSharding:
        """This process's sharding under Accelerate (one process when not launched)."""
        state = process_state()
        return cls(state.process_index, state.num_processes, block_size)

    def owns(self, offset: int) -> bool:
        """Whether this process handles the context ``offset`` places after the range start."""
        return (offset // self.block_size) % self.num_processes == self.process_index


def process_state() -> PartialState:
    """Accelerate's process state, set up as an Accelerator would: ACCELERATE_USE_CPU=1 makes
    several launched CPU processes one gloo group (PartialState alone would see one process)."""
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def node_index() -> int:
    """This process's node (machine): torchrun's GROUP_RANK, else its process index over the
    processes per node (LOCAL_WORLD_SIZE); 0 for one process."""
    if "GROUP_RANK" in os.environ:
        return int(os.environ["GROUP_RANK"])
    state = process_state()
    return state.process_index // max(int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes)), 1)


CODE_CHUNK_LINES = 100
EMBEDDED_LAYOUT = f"topics and {CODE_CHUNK_LINES}-line code chunks, shuffled (seed 0)"


def _code_chunks(source: str) -> Iterator[str]:
    """A module cut into pieces of at least CODE_CHUNK_LINES lines, each ending at a blank line."""
    chunk: list[str] = []
    for line in source.splitlines(keepends=True):
        chunk.append(line)
        if len(chunk) >= CODE_CHUNK_LINES and not line.strip():
            yield "".join(chunk)
            chunk = []
    if chunk:
        yield "".join(chunk)


def embedded_corpus_documents(include_code: bool = True) -> list[str]:
    """Python's documentation topics and, when asked, the standard library's modules in chunks of
    about CODE_CHUNK_LINES lines, in a seeded random order. Shuffled so that the training,
    attribution and held-out ranges of the packed stream (consecutive contexts) draw from the same
    mix: in file order, held-out metrics would be measured on other modules than the SAEs were
    trained on (the held-out L0 of a calibrated SAE was 33% above k that way)."""
    from pydoc_data.topics import topics

    documents = list(topics.values())
    if include_code:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        for path in sorted(stdlib.glob("*.py")):
            documents += _code_chunks(path.read_text(encoding="utf-8", errors="replace"))
    random.Random(0).shuffle(documents)
    return documents


def materialize_embedded_corpus(directory: str | os.PathLike | None = None, include_code: bool = True) -> Path:
    """Write the embedded corpus once as JSON lines (atomically) and return the file."""
    directory = Path(directory or Path.home() / ".cache" / "dmsae" / "embedded-corpus")
    version = "{}.{}".format(*sys.version_info[:2])
    path = directory / f"python{version}-{'docs-code' if include_code else 'docs'}-shuffled.jsonl"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as temporary, open(temporary, "w", encoding="utf-8") as file:
            for text in embedded_corpus_documents(include_code):
                file.write(json.dumps({"text": text}) + "\n")
    return path


def local_data_files(dataset: str) -> list[str] | None:
    """The files of a local dataset path or glob, None for a Hub id."""
    path = Path(dataset).expanduser()
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        return sorted(str(p) for p in path.rglob("*") if p.suffix in LOCAL_BUILDERS)
    matches = sorted(Path().glob(dataset)) if not path.is_absolute() else sorted(Path("/").glob(dataset[1:]))
    return [str(p) for p in matches if p.is_file()] or None


def load_text_dataset(cfg: DataConfig) -> IterableDataset:
    """The configured dataset, streamed (a Hub id is never downloaded whole)."""
    if not cfg.dataset:
        corpus = materialize_embedded_corpus(cfg.corpus_dir, cfg.embedded_code)
        return load_dataset("json", data_files=[str(corpus)], split="train", streaming=True)
    files = local_data_files(cfg.dataset)
    if files is None and (Path(cfg.dataset).suffix in LOCAL_BUILDERS or cfg.dataset.startswith((".", "/", "~"))):
        raise DatasetNotFoundError(f"--data.dataset {cfg.dataset!r}: no such file, directory or glob match in {Path.cwd()}")
    if files is None:
        try:
            return load_dataset(cfg.dataset, cfg.dataset_config, split=cfg.split, streaming=True)
        except (ConnectionError, FileNotFoundError) as error:  # datasets' DatasetNotFoundError is a FileNotFoundError
            raise DatasetNotFoundError(
                f"--data.dataset {cfg.dataset!r} is neither a local path (no file, directory or glob match in {Path.cwd()}) "
                f"nor reachable on the Hub ({error}): fix the path, or check the dataset id and the network"
            ) from None
    builders = {LOCAL_BUILDERS.get(Path(f).suffix) for f in files}
    if not files or None in builders or len(builders) > 1:
        raise ConfigError(
            f"--data.dataset {cfg.dataset!r}: a local dataset must be .txt, .json/.jsonl or .parquet files of one kind; "
            f"found {files[:5]}"
        )
    if all(Path(f).stat().st_size == 0 for f in files):
        raise _empty_dataset_error(cfg)  # datasets' json builder fails obscurely on empty files
    (builder,) = builders
    options = {"sample_by": "document"} if builder == "text" else {}  # one document per text file
    return load_dataset(builder, data_files=files, split="train", streaming=True, **options)


def _documents(dataset: IterableDataset, cfg: DataConfig) -> Iterator[str]:
    for number, example in enumerate(dataset):
        if cfg.text_column not in example:
            raise MissingTextColumnError(
                f"dataset {cfg.dataset or '(embedded corpus)'!r} has no text column {cfg.text_column!r}; "
                f"its columns are {sorted(example)}. Set --data.text_column to the one holding the text."
            )
        text = example[cfg.text_column]
        if not isinstance(text, str):
            raise MissingTextColumnError(
                f"column {cfg.text_column!r} of example {number} holds {type(text).__name__}, not text; "
                "set --data.text_column to a string column."
            )
        yield text


def _wants_bos(tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> bool:
    if cfg.prepend_bos is not None:
        if cfg.prepend_bos and tokenizer.bos_token_id is None:
            raise ConfigError("--data.prepend_bos is set but the tokenizer has no BOS token; set --data.prepend_bos false")
        return cfg.prepend_bos
    return tokenizer.bos_token_id is not None


def _pack(tokenizer: PreTrainedTokenizerBase, cfg: DataConfig, documents: Iterable[str]) -> Iterator[PackedContext]:
    """All contexts of the stream, in order."""
    if cfg.context_length < 2:
        raise ConfigError(f"--data.context_length {cfg.context_length}: must be at least 2 (a token and its successor)")
    bos = [tokenizer.bos_token_id] if _wants_bos(tokenizer, cfg) else []
    eos = tokenizer.eos_token_id
    if cfg.append_eos and eos is None:
        raise ConfigError("--data.append_eos is set but the tokenizer has no EOS token; set --data.append_eos false")
    body = cfg.context_length - len(bos)
    tokens: list[int] = []
    kept: list[bool] = []
    index = 0

    def context(ids: list[int], mask: list[bool]) -> PackedContext:
        return PackedContext(index, bos + ids, [not cfg.mask_bos] * len(bos) + mask)

    documents = iter(documents)
    while batch := list(islice(documents, TOKENIZE_BATCH_DOCUMENTS)):
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False).input_ids:
            tokens += ids
            kept += [True] * len(ids)
            if cfg.append_eos:
                tokens.append(eos)
                kept.append(not cfg.mask_eos)
            complete = len(tokens) // body * body
            for start in range(0, complete, body):
                yield context(tokens[start : start + body], kept[start : start + body])
                index += 1
            del tokens[:complete], kept[:complete]  # once per document: long documents stay linear
    if cfg.pad_last_context and tokens:
        padding = body - len(tokens)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        yield context(tokens + [pad] * padding, kept + [False] * padding)
        index += 1
    if index == 0:
        raise _empty_dataset_error(cfg)


def _empty_dataset_error(cfg: DataConfig) -> EmptyDatasetError:
    return EmptyDatasetError(
        f"dataset {cfg.dataset or '(embedded corpus)'!r} (split {cfg.split!r}, column {cfg.text_column!r}) "
        f"yields no context of {cfg.context_length} tokens: it is empty or too short. Point --data.dataset at "
        "more text, lower --data.context_length, or set --data.pad_last_context true."
    )


def packed_contexts(
    tokenizer: PreTrainedTokenizerBase,
    cfg: DataConfig,
    start: int = 0,
    count: int | None = None,
    sharding: ContextSharding | None = None,
) -> Iterator[PackedContext]:
    """Contexts ``start .. start + count - 1`` of the packed stream (fewer if the data ends),
    restricted to those ``sharding`` gives this process."""
    stop = None if count is None else start + count
    for packed in islice(_pack(tokenizer, cfg, _documents(load_text_dataset(cfg), cfg)), start, stop):
        if sharding is None or sharding.owns(packed.index - start):
            yield packed


def context_batches(contexts: Iterable[PackedContext], batch_size: int) -> Iterator[ContextBatch]:
    """Stack consecutive contexts into batches of ``batch_size`` (the last may be smaller)."""
    contexts = iter(contexts)
    while group := list(islice(contexts, batch_size)):
        yield ContextBatch(
            input_ids=torch.tensor([c.input_ids for c in group], dtype=torch.long),
            mask=torch.tensor([c.mask for c in group], dtype=torch.bool),
            index=torch.tensor([c.index for c in group], dtype=torch.long),
        )
