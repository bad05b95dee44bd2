"""Harvest throughput against the bare forward passes it is built on, in one run.

    python bench/bench_harvest.py                      # embedded SmolLM2-135M, layer 12, CPU
    python bench/bench_harvest.py --contexts 256 --rounds 5
    python bench/random_gemma2_2b.py /tmp/gemma2-2b           # a GPU, without Gemma-2-2B's weights:
    python bench/bench_harvest.py --model /tmp/gemma2-2b --contexts 512 --batch_size 32

Three measurements over the same contexts of the embedded corpus, in tokens (context positions)
per second:

- harvest: ``harvest_activations`` into a fresh cache: reading and tokenizing the text, the
  truncated forward pass, masking, shuffling and writing the shards;
- truncated forward: the forward pass alone on pre-tokenized batches, stopped after the hooked
  layer (what the harvest cannot avoid; the target is harvest >= 0.9x this);
- full forward: the whole model, LM head included, as a harvest without the early stop would run.

The methods take turns for ``--rounds`` rounds and each keeps its fastest round (by wall time),
which filters out load from other processes on a shared machine; ``--threads 1`` steadies it more.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field

import simple_parsing
import torch

from trainer.config import BaseModelConfig, DataConfig, HarvestConfig
from trainer.harvest.base_model import capture_activations, load_base_model, resolve_hook_module
from trainer.harvest.cache import harvest_activations
from trainer.harvest.text_corpus import context_batches, packed_contexts


@dataclass
class BenchConfig:
    contexts: int = 64
    """Contexts per measurement."""

    rounds: int = 3
    """Rounds of the three measurements; each keeps its fastest."""

    threads: int | None = None
    """torch intra-op threads (default: torch's choice). 1 is steadier on a machine shared with others."""

    base: BaseModelConfig = field(default_factory=BaseModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    harvest: HarvestConfig = field(default_factory=HarvestConfig)


def timed(run, device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process), the queued GPU work included."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def main(cfg: BenchConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, tokenizer = load_base_model(cfg.base)
    hook = resolve_hook_module(model, cfg.base.hook_module)
    contexts = list(packed_contexts(tokenizer, cfg.data, count=cfg.contexts))  # also materialises the corpus
    batches = [b.input_ids.to(model.device) for b in context_batches(contexts, cfg.harvest.batch_size)]
    tokens = cfg.contexts * cfg.data.context_length

    def harvest() -> None:
        with tempfile.TemporaryDirectory() as directory:
            harvest_cfg = HarvestConfig(**{**vars(cfg.harvest), "train_tokens": tokens, "cache_dir": directory})
            harvest_activations(model, tokenizer, cfg.base, cfg.data, harvest_cfg)

    def truncated_forward() -> None:
        with torch.inference_mode():
            for input_ids in batches:
                capture_activations(model, hook, input_ids)

    def full_forward() -> None:
        with torch.inference_mode():
            for input_ids in batches:
                model(input_ids=input_ids, use_cache=False)

    methods = {"harvest (cached)": harvest, "truncated forward": truncated_forward, "full forward": full_forward}
    truncated_forward()  # warm-up
    best = {name: (float("inf"), float("inf")) for name in methods}
    for _ in range(cfg.rounds):
        for name, run in methods.items():
            best[name] = min(best[name], timed(run, model.device))

    print(
        f"\n{cfg.base.model_id}, hook {cfg.base.hook_module}, {model.device}, {model.dtype}; "
        f"{cfg.contexts} contexts x {cfg.data.context_length} tokens, batch {cfg.harvest.batch_size} contexts, "
        f"storage {cfg.harvest.storage_dtype}, {torch.get_num_threads()} threads, best of {cfg.rounds}\n"
    )
    print(f"| {'method':<18} | {'tokens/s':>9} | {'vs truncated forward':>20} | {'tokens/CPU-s':>12} |")
    print(f"|{'-' * 20}|{'-' * 10}:|{'-' * 21}:|{'-' * 13}:|")
    for name, (wall, cpu) in best.items():
        ratio = best["truncated forward"][0] / wall
        print(f"| {name:<18} | {tokens / wall:>9.0f} | {ratio:>19.2f}x | {tokens / cpu:>12.0f} |")


if __name__ == "__main__":
    main(simple_parsing.parse(BenchConfig))
