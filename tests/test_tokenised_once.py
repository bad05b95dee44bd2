"""The run's text is tokenised once, whatever the number of processes and stages: the main
process packs the contexts the run uses into the context index (run folder, contexts/), and the
training harvest, the attribution sample and the held-out set slice them from there. A resumed run
tokenises nothing and reads the stored held-out set."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import torch
from ddp_worker import count_tokenised_texts
from safetensors.torch import load_file
from test_ddp import accelerate_launch
from test_distill import tiny_args, tiny_setup  # noqa: F401  (fixture)
from tiny_models import tiny_tokenizer

from trainer import distill
from trainer.config import DataConfig, parse_config
from trainer.harvest import harvested
from trainer.harvest.context_index import ContextIndex, open_context_index, tokenising_source
from trainer.harvest.harvested import held_out_contexts
from trainer.harvest.text_corpus import ContextSharding, packed_contexts

FAST = ("--transfer.ks", "16", "--transfer.random_core_control", "false", "--transfer.sparsity_matched", "false")


class CountingTokenizer:
    """A tokenizer that counts the texts it is given (every other attribute is the tokenizer's)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.texts = tokenizer, 0

    def __call__(self, texts, **kwargs):
        self.texts += len(texts)
        return self.tokenizer(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def documents_of_the_run(setup: dict, output: Path) -> int:
    """Documents packing the run's contexts (training, attribution, held-out) tokenises, once."""
    config = parse_config(tiny_args(setup, output))
    contexts = config.harvest.context_ranges(config.data.context_length).heldout_start + held_out_contexts(config)
    tokenizer = CountingTokenizer(tiny_tokenizer(adds_bos=True))
    assert len(list(packed_contexts(tokenizer, config.data, 0, contexts))) == contexts, "the corpus is too short for the test"
    return tokenizer.texts


def counted_texts(monkeypatch) -> list[str]:
    texts: list[str] = []
    count_tokenised_texts(monkeypatch.setattr, texts.extend)
    return texts


def test_two_processes_tokenise_every_text_once_tokenised_once(tiny_setup, tmp_path):
    """Every text of the run is tokenised once over both processes: before the index each process
    tokenised the stream for the training harvest, the attribution sample and the held-out set
    (six times the documents on two processes)."""
    counts, run = tmp_path / "counts", tmp_path / "run"
    accelerate_launch("count-tokenised", str(counts), *tiny_args(tiny_setup, run, *FAST), finished=lambda out: (run / "SUMMARY.md").exists())
    texts = [text for path in sorted(counts.glob("tokenised.*.json")) for text in json.loads(path.read_text())]
    assert len(texts) == len(set(texts)), f"{len(texts) - len(set(texts))} texts tokenised more than once"
    assert len(texts) == documents_of_the_run(tiny_setup, run)


def test_a_resumed_run_neither_tokenises_nor_recomputes_the_held_out_set_tokenised_once(tiny_setup, tmp_path, monkeypatch):
    run = tmp_path / "run"
    texts = counted_texts(monkeypatch)
    assert distill.main(tiny_args(tiny_setup, run, *FAST)) == 0
    assert len(texts) == documents_of_the_run(tiny_setup, run)  # once, for the index
    held_out = (run / "held_out.safetensors").stat().st_mtime_ns
    texts.clear()
    computed = []
    compute = harvested._held_out
    monkeypatch.setattr(harvested, "_held_out", lambda *args: computed.append(1) or compute(*args))
    shutil.rmtree(run / "transfer")  # the resume has work to do
    assert distill.main(tiny_args(tiny_setup, run, *FAST, "--run.resume", "true")) == 0
    assert (run / "transfer" / "k-0016-dense_core" / "model.safetensors").exists()
    assert texts == [] and computed == []
    assert (run / "held_out.safetensors").stat().st_mtime_ns == held_out


def test_the_index_trains_the_same_saes_byte_for_byte_as_tokenising_each_time_tokenised_once(tiny_setup, tmp_path, monkeypatch):
    """Reading the contexts from the index changes nothing the SAEs see: a run that tokenises the
    text for every stage, as runs did before the index, trains the same SAEs bit for bit."""
    indexed, tokenising = tmp_path / "indexed", tmp_path / "tokenising"
    assert distill.main(tiny_args(tiny_setup, indexed, *FAST)) == 0
    monkeypatch.setattr(harvested, "open_context_index", lambda folder, tokenizer, data, count: SimpleNamespace(contexts=tokenising_source(tokenizer, data)))
    assert distill.main(tiny_args(tiny_setup, tokenising, *FAST)) == 0
    assert not (tokenising / "contexts").exists()
    saes = sorted(path.relative_to(indexed) for path in indexed.rglob("model.safetensors"))
    assert len(saes) >= 5
    for sae in saes:
        first, second = load_file(indexed / sae), load_file(tokenising / sae)
        assert first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first), sae


def test_the_index_holds_the_packed_contexts_and_is_rebuilt_for_other_settings_tokenised_once(tiny_setup, tmp_path, capsys):
    """Slices of the index are what tokenising gives (ranges and process shares); an index
    tokenised with another context length, or too short for the run, is built again, saying why."""
    tokenizer, data = tiny_tokenizer(adds_bos=True), DataConfig(dataset=str(tiny_setup["corpus"]), context_length=16)
    index = open_context_index(tmp_path / "contexts", tokenizer, data, 40)
    assert list(index.contexts(0, 40)) == list(packed_contexts(tokenizer, data, 0, 40))
    sharding = ContextSharding(1, 2, 3)
    assert list(index.contexts(5, 20, sharding)) == list(packed_contexts(tokenizer, data, 5, 20, sharding))
    assert capsys.readouterr().out == ""
    longer = DataConfig(dataset=str(tiny_setup["corpus"]), context_length=24)
    rebuilt = open_context_index(tmp_path / "contexts", tokenizer, longer, 40)
    out = capsys.readouterr().out
    assert "tokenising the text again" in out and "another data" in out
    assert list(rebuilt.contexts(0, 3)) == list(packed_contexts(tokenizer, longer, 0, 3))
    open_context_index(tmp_path / "contexts", tokenizer, longer, 60)
    assert "holds 40 contexts, this run needs 60" in capsys.readouterr().out
    assert ContextIndex(tmp_path / "contexts").available == 60
