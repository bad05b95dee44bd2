"""Tiny random causal LMs and a tokenizer trained in-process: real transformers models for the
tests, built without any network."""

from __future__ import annotations

import functools

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Sparse autoencoders read the residual stream of a language model.",
    "A Matryoshka dictionary nests its prefixes; the core is shared by all of them.",
]


@functools.cache
def tiny_tokenizer(adds_bos: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few sentences: any text, no network."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<bos>", "<eos>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(SENTENCES, trainer)
    if adds_bos:  # like Gemma's tokenizer
        tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def tiny_model(architecture: str = "llama", seed: int = 0, layers: int = 4):
    """A random 4-layer model with hidden size 32 and the tiny tokenizer's vocabulary."""
    torch.manual_seed(seed)
    sizes = dict(
        vocab_size=len(tiny_tokenizer()), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
        bos_token_id=0, eos_token_id=1, pad_token_id=2, initializer_range=0.2,
    )  # fmt: skip
    if architecture == "gemma2":  # softcapped attention and logits, alternating sliding windows
        config = Gemma2Config(**sizes, sliding_window=8, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
        return Gemma2ForCausalLM(config).eval().requires_grad_(False)
    return LlamaForCausalLM(LlamaConfig(**sizes)).eval().requires_grad_(False)


def random_batch(batch: int = 3, length: int = 24, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and a mask that drops BOS at position 0 and pads the tail of the last row."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, len(tiny_tokenizer()), (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[:, 0] = False
    mask[-1, -5:] = False
    return input_ids, mask
