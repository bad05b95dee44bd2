"""The base model runs twice per distillation, whatever the number of cycles: once for the
training activations (cached, read by every cycle and transfer SAE) and once for the (x, g)
attribution sample; after the harvest only evaluation calls it, a fixed number of times per SAE."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
from test_distill import tiny_args, tiny_setup  # noqa: F401  (fixture)

from trainer import distill
from trainer.harvest import harvested
from trainer.harvest.base_model import load_base_model

CONTEXT_LENGTH = 32  # tiny_args' data.context_length


class ForwardCounter:
    """Counts the base model's forward calls (its input embedding runs once per call), split
    into the harvest (prepare_harvest) and everything after it, with the contexts they read."""

    def __init__(self, monkeypatch):
        self.phase = "before"
        self.calls: Counter[str] = Counter()
        self.contexts: Counter[str] = Counter()

        def counted_load(config):
            model, tokenizer = load_base_model(config)
            model.get_input_embeddings().register_forward_pre_hook(self._record)
            return model, tokenizer

        def counted_prepare(*args, **kwargs):
            self.phase = "harvest"
            data = prepare(*args, **kwargs)
            self.phase = "after harvest"
            return data

        prepare = harvested.prepare_harvest
        monkeypatch.setattr(harvested, "load_base_model", counted_load)
        monkeypatch.setattr("trainer.pipeline.run.prepare_harvest", counted_prepare)

    def _record(self, module, args):
        input_ids = args[0]
        self.calls[self.phase] += 1
        if input_ids.shape[-1] == CONTEXT_LENGTH:  # not the width probes
            self.contexts[self.phase] += input_ids.shape[0]


def run(setup, output: Path, monkeypatch, num_cycles: int, *extra: str) -> tuple[ForwardCounter, dict]:
    counter = ForwardCounter(monkeypatch)
    args = tiny_args(setup, output, "--cycles.num_cycles", str(num_cycles), "--transfer.ks", "16", *extra)
    assert distill.main(args) == 0
    return counter, json.loads((output / "run_config.yaml").with_name("metrics.json").read_text())


def evaluated_saes(metrics: dict) -> int:
    return len(metrics["cycles"]) + len(metrics["transfer"])


def test_base_model_runs_twice_whatever_the_number_of_cycles(tiny_setup, tmp_path, monkeypatch):
    short, short_metrics = run(tiny_setup, tmp_path / "t1", monkeypatch, 1)
    long, long_metrics = run(tiny_setup, tmp_path / "t3", monkeypatch, 3)
    cache = tmp_path / "t3" / "cache"
    activations = json.loads((cache / "activations" / "manifest.json").read_text())["num_contexts"]
    attribution = json.loads((cache / "attribution" / "manifest.json").read_text())["num_contexts"]
    held_out = max(math.ceil(1024 / CONTEXT_LENGTH), 4)  # eval.tokens, eval.ce_contexts of tiny_args
    # The harvest: every training context once, every attribution context once, the held-out
    # contexts once plus the clean and zero-ablated loss of the spliced-loss contexts.
    assert long.contexts["harvest"] == short.contexts["harvest"] == activations + attribution + held_out + 2 * 4
    assert long.calls["harvest"] == short.calls["harvest"]
    # After it: evaluation only, the same number of calls for each SAE evaluated.
    extra_saes = evaluated_saes(long_metrics) - evaluated_saes(short_metrics)
    assert extra_saes == 2
    per_sae = (long.calls["after harvest"] - short.calls["after harvest"]) / extra_saes
    assert per_sae > 0 and long.calls["after harvest"] == per_sae * evaluated_saes(long_metrics)

    # The counter sees training reads: streamed activations rerun the model for every SAE trained.
    streamed, _ = run(tiny_setup, tmp_path / "streamed", monkeypatch, 1, "--run.stream_activations", "true")
    streamed_training = streamed.contexts["after harvest"] - short.contexts["after harvest"]
    assert streamed_training >= evaluated_saes(short_metrics) * 2048 / CONTEXT_LENGTH  # >= transfer.tokens each
