"""Token pipeline: local datasets, packing, BOS / EOS / padding masks, slicing and sharding."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tiny_models import SENTENCES, tiny_tokenizer

from trainer.config import DataConfig
from trainer.errors import EmptyDatasetError
from trainer.harvest.text_corpus import (
    ContextSharding,
    MissingTextColumnError,
    context_batches,
    embedded_corpus_documents,
    packed_contexts,
)

DOCUMENTS = [sentence * (i + 1) for i, sentence in enumerate(SENTENCES * 3)]


def write_jsonl(path, documents, column="text"):
    path.write_text("".join(json.dumps({column: text, "id": i}) + "\n" for i, text in enumerate(documents)))
    return path


def stream_tokens(tokenizer, documents, eos=True):
    """The expected token stream: every document followed by EOS."""
    stream = []
    for text in documents:
        stream += tokenizer(text, add_special_tokens=False).input_ids + ([tokenizer.eos_token_id] if eos else [])
    return stream


def test_packing_follows_the_token_stream(tmp_path):
    tokenizer = tiny_tokenizer()
    cfg = DataConfig(dataset=str(write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS)), context_length=16, prepend_bos=False)
    contexts = list(packed_contexts(tokenizer, cfg))
    stream = stream_tokens(tokenizer, DOCUMENTS)
    assert [c.index for c in contexts] == list(range(len(stream) // 16))  # the incomplete tail is dropped
    assert sum((c.input_ids for c in contexts), []) == stream[: len(contexts) * 16]
    eos = tokenizer.eos_token_id
    # No BOS: every position counts, EOS separators included.
    assert all(all(c.mask) for c in contexts) and any(eos in c.input_ids for c in contexts)
    masked_eos = DataConfig(dataset=cfg.dataset, context_length=16, mask_eos=True, prepend_bos=False)
    for context in packed_contexts(tokenizer, masked_eos):
        assert [not kept for kept in context.mask] == [token == eos for token in context.input_ids]


@pytest.mark.parametrize("file_format", ["txt", "parquet", "json"])
def test_local_files_of_each_format(tmp_path, file_format):
    tokenizer = tiny_tokenizer()
    if file_format == "txt":  # one document per text file
        for i, text in enumerate(DOCUMENTS[:4]):
            (tmp_path / f"doc{i}.txt").write_text(text)
        dataset = str(tmp_path)
    elif file_format == "parquet":
        dataset = str(tmp_path / "docs.parquet")
        pq.write_table(pa.table({"body": DOCUMENTS[:4]}), dataset)
    else:
        dataset = str(write_jsonl(tmp_path / "docs.json", DOCUMENTS[:4], column="body"))
    column = "text" if file_format == "txt" else "body"
    cfg = DataConfig(dataset=dataset, text_column=column, context_length=8, pad_last_context=True, prepend_bos=False)
    contexts = list(packed_contexts(tokenizer, cfg))
    tokens = [t for c in contexts for t, kept in zip(c.input_ids, c.mask) if kept]
    assert tokens == stream_tokens(tokenizer, DOCUMENTS[:4])  # padding positions are masked out
    assert contexts[-1].input_ids[-1] == tokenizer.pad_token_id and not contexts[-1].mask[-1]


@pytest.mark.parametrize("adds_bos", [True, False], ids=["adds-bos-like-gemma", "has-bos-adds-none-like-smollm2"])
def test_bos_is_prepended_and_masked_by_default(tmp_path, adds_bos):
    tokenizer = tiny_tokenizer(adds_bos=adds_bos)  # either way BOS takes the attention sink, masked
    dataset = str(write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS))
    contexts = list(packed_contexts(tokenizer, DataConfig(dataset=dataset, context_length=12)))
    bos = tokenizer.bos_token_id
    assert all(c.input_ids[0] == bos and not c.mask[0] and all(c.mask[1:]) for c in contexts)
    assert sum((c.input_ids[1:] for c in contexts), []) == stream_tokens(tokenizer, DOCUMENTS)[: 11 * len(contexts)]
    kept = list(packed_contexts(tokenizer, DataConfig(dataset=dataset, context_length=12, mask_bos=False), count=2))
    assert all(all(c.mask) for c in kept)
    plain = list(packed_contexts(tokenizer, DataConfig(dataset=dataset, context_length=12, prepend_bos=False), count=2))
    assert all(bos not in c.input_ids for c in plain)


def test_a_tokenizer_without_bos_gets_none(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.bos_token = None  # like Qwen's: no BOS token at all (the norm cut guards these models)
    dataset = str(write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS))
    contexts = list(packed_contexts(tokenizer, DataConfig(dataset=dataset, context_length=12), count=3))
    assert sum((c.input_ids for c in contexts), []) == stream_tokens(tokenizer, DOCUMENTS)[:36]
    with pytest.raises(ValueError, match="no BOS token; set --data.prepend_bos false"):
        list(packed_contexts(tokenizer, DataConfig(dataset=dataset, context_length=12, prepend_bos=True), count=1))


def test_ranges_and_sharding_partition_the_stream(tmp_path):
    tokenizer = tiny_tokenizer()
    cfg = DataConfig(dataset=str(write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS)), context_length=8)
    everything = list(packed_contexts(tokenizer, cfg))
    assert len(everything) > 20
    assert list(packed_contexts(tokenizer, cfg, start=5, count=7)) == everything[5:12]
    for num_processes, block_size in [(2, 1), (3, 4)]:
        shards = [
            list(packed_contexts(tokenizer, cfg, 3, 17, ContextSharding(p, num_processes, block_size)))
            for p in range(num_processes)
        ]
        indices = sorted(c.index for shard in shards for c in shard)
        assert indices == list(range(3, 20))  # no overlap, nothing missed
        assert all(((c.index - 3) // block_size) % num_processes == p for p, shard in enumerate(shards) for c in shard)
    batch = next(context_batches(everything, 4))
    assert batch.input_ids.shape == batch.mask.shape == (4, 8) and batch.index.tolist() == [0, 1, 2, 3]


def test_missing_text_column(tmp_path):
    cfg = DataConfig(dataset=str(write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS, column="content")))
    with pytest.raises(MissingTextColumnError, match=r"no text column 'text'.*\['content', 'id'\].*--data.text_column"):
        next(packed_contexts(tiny_tokenizer(), cfg))


@pytest.mark.parametrize("documents", [[], ["too short"]])
def test_empty_dataset(tmp_path, documents):
    cfg = DataConfig(dataset=str(write_jsonl(tmp_path / "docs.jsonl", documents)), context_length=64)
    with pytest.raises(EmptyDatasetError, match="no context of 64 tokens.*--data.context_length"):
        list(packed_contexts(tiny_tokenizer(), cfg))


def test_embedded_corpus_is_real_text_and_code(tmp_path):
    documents = embedded_corpus_documents()
    assert documents == embedded_corpus_documents()  # the same seeded order every time
    from pydoc_data.topics import topics

    assert {"assert", "import"} <= {t for t in topics if topics[t] in documents}
    code = [d for d in documents if d not in topics.values()]
    assert len(code) > 1000 and sum("import " in d for d in code) > 100
    positions = [i for i, d in enumerate(documents) if d in topics.values()]
    # Topics are spread over the whole stream, not bunched: every tenth of it holds some.
    assert {10 * i // len(documents) for i in positions} == set(range(10))
    cfg = DataConfig(context_length=32, corpus_dir=str(tmp_path), embedded_code=False)
    contexts = list(packed_contexts(tiny_tokenizer(), cfg, count=3))
    assert [c.index for c in contexts] == [0, 1, 2]
    assert len(list(tmp_path.glob("*.jsonl"))) == 1  # materialised once as a local dataset
