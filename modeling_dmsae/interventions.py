"""The SAE inside a causal LM: which positions it reads, its latents of a text, what its latents
do to the logits, and a context manager that splices it into the model at ``config.hook_module``,
with edits.

- :func:`kept_positions`: the positions an SAE reads (the trainer's rule, the one source of it):
  the token mask (:func:`token_mask`) less the massive-norm positions.
- :func:`latents_from_text` (``DMSAEModel.latents_from_text``): the latents of tokenised text,
  [B, T, K], zero at the positions the SAE does not read.
- :func:`logit_effect`: each latent's direct effect on the next-token logits (its decoder
  direction through the base model's final norm and LM head).
- :func:`splice_sae` (``DMSAEModel.splice``): the SAE spliced into a causal LM, reconstruction
  alone or with the error term, latents ablated, clamped, scaled or added as steering vectors;
  it works under ``model.generate`` and leaves the positions the trainer excludes untouched.

This file is part of the Hub's ``trust_remote_code`` code: it imports torch and the model file
(which imports it back only inside the methods that hand over to it).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from .modeling_dmsae import DMSAEModel, SparseLatents, TextLatents

# ----------------------------------------------------------------------------------------------
# Which positions an SAE reads


def median_norm(hidden: Tensor, token_mask: Tensor) -> Tensor:
    """Median activation norm of the positions of ``hidden`` [B, T, d] that ``token_mask`` [B, T] keeps."""
    return hidden.float().norm(dim=-1)[token_mask].median()


def kept_positions(hidden: Tensor, token_mask: Tensor, max_norm_ratio: float, reference_norm: Tensor | None = None) -> Tensor:
    """[B, T] positions the SAE sees: ``token_mask`` (no BOS, no padding) less the positions whose
    activation norm exceeds ``max_norm_ratio`` x the median norm of the batch's masked-in
    positions (or x ``reference_norm`` when given: a splice uses the prompt's median for the single
    tokens of later generation steps). A batch median, not a running statistic: it needs no pass of
    its own, and it is the same for a shard whether it is cached, streamed or harvested by any process."""
    if max_norm_ratio <= 0 or not token_mask.any():
        return token_mask
    norms = hidden.float().norm(dim=-1)
    reference = norms[token_mask].median() if reference_norm is None else reference_norm
    # "not above", so that NaN rows stay in and meet the finiteness check instead of vanishing.
    return token_mask & ~(norms > max_norm_ratio * reference)


class ForwardInputs(NamedTuple):
    """What the causal LM's forward was called with, as far as the excluded positions need it."""

    input_ids: Tensor | None  # [B, T] the new tokens (None when called with inputs_embeds)
    attention_mask: Tensor | None  # [B, past + T] 2-D padding mask, when given
    past_length: int  # tokens already in the KV cache


def token_mask(hidden: Tensor, inputs: ForwardInputs | None, bos_token_id: int | None, mask_bos: bool) -> Tensor:
    """[B, T] positions of ``hidden`` [B, T, d] the trainer's data settings keep: not padding, and
    (with ``mask_bos``) not a BOS token at the first real position of its row. Without ``inputs``
    (the module ran outside a call of the model) nothing is known about the tokens: all are kept."""
    batch, length = hidden.shape[:2]
    mask = torch.ones(batch, length, dtype=torch.bool, device=hidden.device)
    if inputs is None:
        return mask
    starts = torch.zeros(batch, dtype=torch.long, device=hidden.device)
    if inputs.attention_mask is not None and inputs.attention_mask.shape == (batch, inputs.past_length + length):
        attention = inputs.attention_mask.to(hidden.device).bool()
        mask &= attention[:, inputs.past_length :]
        starts = attention.int().argmax(dim=1)  # first real token of each row (left padding)
    if mask_bos and bos_token_id is not None and inputs.input_ids is not None:
        positions = inputs.past_length + torch.arange(length, device=hidden.device)
        at_start = positions.unsqueeze(0) == starts.unsqueeze(1)
        mask &= ~(at_start & (inputs.input_ids.to(hidden.device) == bos_token_id))
    return mask


# ----------------------------------------------------------------------------------------------
# What a latent does to the logits

FINAL_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f")


def final_norm(base_model: nn.Module) -> nn.Module:
    """The norm the base model applies to its last hidden states before the LM head."""
    decoder = base_model.get_decoder()
    for name in FINAL_NORM_NAMES:
        module = getattr(decoder, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(
        f"cannot find the final norm of {type(base_model).__name__}: its decoder has none of the attributes "
        f"{', '.join(FINAL_NORM_NAMES)}"
    )


@torch.no_grad()
def logit_effect(
    sae: DMSAEModel, base_model: nn.Module, latents: Sequence[int] | Tensor | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    """[n, vocab] float32 (or ``dtype``): the logits the base model's final norm and LM head make of each latent's
    decoder direction alone, for ``latents`` (default: all K; mind the size, K x vocab).

    The direct effect of a latent on the next-token logits, skipping the layers between the hook
    and the head: sae-dashboard's and Neuronpedia's "logit weights" (W_dec W_U with the final norm's
    gain folded in). The norm makes it independent of the direction's scale, so it does not matter
    whether the SAE normalises its inputs; for RMSNorm it is sqrt(d) * (W_dec[j] * g) @ W_U^T with
    unit-norm decoder rows (the trainer keeps them unit-norm), so rows compare across latents.
    No logit softcapping: the effect is linear in the head's input. Its top entries name the
    tokens the latent promotes, its bottom ones the tokens it suppresses. ``dtype``: the head's
    product in another precision (bfloat16 halves its cost on CPUs with bf16 units; ~3 digits).
    """
    head = base_model.get_output_embeddings()
    if latents is None:
        latents = torch.arange(sae.config.num_latents)
    latents = torch.as_tensor(latents, dtype=torch.long, device=sae.W_dec.device).reshape(-1)
    check_latents(latents.tolist(), sae.config.num_latents, "logit_effect")
    directions = final_norm(base_model)(sae.W_dec[latents].to(head.weight.device, head.weight.dtype))
    if dtype is None:
        return head(directions).float()
    bias = None if head.bias is None else head.bias.to(dtype)
    return nn.functional.linear(directions.to(dtype), head.weight.to(dtype), bias)


# ----------------------------------------------------------------------------------------------
# The hooked module's output


def hidden_states_of(output) -> Tensor:
    """The hidden states a decoder layer returns: a tensor in transformers 5, a tuple's first
    element in older versions."""
    return output if isinstance(output, Tensor) else output[0]


def with_hidden_states(output, hidden: Tensor):
    """``output`` with its hidden states replaced by ``hidden`` (what a splicing hook returns)."""
    return hidden if isinstance(output, Tensor) else (hidden, *output[1:])


def hooked_module(sae: DMSAEModel, model: nn.Module) -> nn.Module:
    """``model``'s module ``config.hook_module``, whose output the SAE reads."""
    try:
        return model.get_submodule(sae.config.hook_module)
    except AttributeError:
        raise ValueError(
            f"{type(model).__name__} has no module {sae.config.hook_module!r} (config.hook_module): pass the causal LM "
            f"the SAE was trained on ({sae.config.base_model_id})"
        ) from None


def check_width(sae: DMSAEModel, hidden: Tensor) -> Tensor:
    """``hidden``, once its width is known to be the SAE's d_in."""
    if hidden.shape[-1] != sae.config.d_in:
        raise ValueError(
            f"{sae.config.hook_module} outputs width {hidden.shape[-1]}, the SAE reads d_in = {sae.config.d_in}: "
            "use the SAE with the model it was trained on"
        )
    return hidden


def bos_token_id(model: nn.Module) -> int | None:
    return getattr(model.config, "bos_token_id", None)


# ----------------------------------------------------------------------------------------------
# Latents of a text


class _StopForward(Exception):
    """Raised after the hooked module: nothing the model computes after it is needed."""


def check_token_inputs(input_ids: Tensor, attention_mask: Tensor | None) -> None:
    """Refuse what a tokenizer called with return_tensors="pt" would not have returned."""
    if not isinstance(input_ids, Tensor) or input_ids.ndim != 2 or input_ids.dtype.is_floating_point:
        raise ValueError(
            f"input_ids must be a [batch, tokens] tensor of token ids, got {getattr(input_ids, 'shape', type(input_ids))}: "
            "tokenise with return_tensors='pt'"
        )
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}: pass the mask the tokenizer returned with them"
        )


@torch.no_grad()
def hooked_activations(
    sae: DMSAEModel, model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(hidden [B, T, d], kept [B, T]): the output of ``config.hook_module`` for the tokens, from a
    forward that stops right after that module, and the positions the SAE reads there (the
    trainer's rule, with the batch's median norm, as the trainer harvests a batch of contexts)."""
    check_token_inputs(input_ids, attention_mask)
    captured: list[Tensor] = []

    def stop_after(module: nn.Module, args: tuple, output) -> None:
        captured.append(hidden_states_of(output))
        raise _StopForward

    device = getattr(model, "device", input_ids.device)
    handle = hooked_module(sae, model).register_forward_hook(stop_after)
    try:
        mask = None if attention_mask is None else attention_mask.to(device)
        model(input_ids=input_ids.to(device), attention_mask=mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"{sae.config.hook_module} never ran in {type(model).__name__}'s forward: pass the causal LM the SAE was trained on")
    hidden = check_width(sae, captured[0])
    inputs = ForwardInputs(input_ids, attention_mask, past_length=0)
    mask = token_mask(hidden, inputs, bos_token_id(model), sae.config.mask_bos)
    return hidden, kept_positions(hidden, mask, sae.config.max_norm_ratio)


@torch.no_grad()
def latents_from_text(
    sae: DMSAEModel,
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    use_threshold: bool = True,
    sparse: bool = False,
) -> TextLatents:
    """The latents of tokenised text (``DMSAEModel.latents_from_text``), on the SAE's device.

    The positions left out are the ones the trainer leaves out and a splice leaves untouched:
    padding (``attention_mask``), a BOS token first in its row, and positions whose activation norm
    exceeds ``config.max_norm_ratio`` x the median norm of the batch's other kept positions: a
    batch median, as in training, so a borderline position can fall either way in another batch.
    Without ``attention_mask`` every position is real; pad on the right so that each row's
    activations are those of its text alone."""
    hidden, kept = hooked_activations(sae, model, input_ids, attention_mask)
    kept = kept.to(sae.W_dec.device)
    shape = (*kept.shape, sae.config.num_latents)
    latents = SparseLatents(*(kept.new_zeros(0, dtype=dtype) for dtype in (torch.long, torch.long, sae.W_dec.dtype)))
    if kept.any():  # BatchTopK needs at least one token
        normalized = sae.normalize_activations(hidden[kept.to(hidden.device)].to(sae.W_dec.device))
        latents = sae.encode_sparse(normalized, use_threshold)[0]
    rows, positions = kept.nonzero(as_tuple=True)  # row-major: the order of hidden[kept]
    index = torch.stack([rows[latents.rows], positions[latents.rows], latents.cols])
    if sparse:
        dense_or_sparse = torch.sparse_coo_tensor(index, latents.values, shape, is_coalesced=True, check_invariants=False)
    else:
        dense_or_sparse = latents.values.new_zeros(shape).index_put_(tuple(index), latents.values)
    return TextLatents(dense_or_sparse, kept)


# ----------------------------------------------------------------------------------------------
# Latent edits


def check_latents(latents: Sequence[int], num_latents: int, what: str) -> None:
    bad = [j for j in latents if not 0 <= int(j) < num_latents]
    if bad:
        raise ValueError(f"{what}: latents {bad} are out of range; this SAE has latents 0..{num_latents - 1}")


@dataclass(frozen=True)
class LatentEdits:
    """Edits on the latents of every spliced position: ``new = old * multiplier + offset`` for the
    ``edited`` latents (ablate: 0, 0; clamp to v: 0, v; scale by s: s, 0), and ``steering``
    [d] added to the spliced activations."""

    edited: Tensor  # [m] latent indices
    multiplier: Tensor  # [m]
    offset: Tensor  # [m]
    steered: Tensor  # [s] latent indices
    strengths: Tensor  # [s]

    @classmethod
    def of(
        cls,
        num_latents: int,
        ablate: Sequence[int] = (),
        clamp: Mapping[int, float] | None = None,
        scale: Mapping[int, float] | None = None,
        steer: Mapping[int, float] | None = None,
    ) -> LatentEdits:
        """The edits, checked: latents in range, finite values, each latent edited at most once
        (steering may add to an edited latent's direction)."""
        clamp, scale, steer = dict(clamp or {}), dict(scale or {}), dict(steer or {})
        rules = {int(j): (0.0, 0.0) for j in ablate}
        for name, edits, rule in (("clamp", clamp, lambda v: (0.0, v)), ("scale", scale, lambda v: (v, 0.0))):
            twice = sorted(set(map(int, edits)) & set(rules))
            if twice:
                raise ValueError(f"latents {twice} are edited twice ({name} and another edit); give each latent one edit")
            rules.update({int(j): rule(float(v)) for j, v in edits.items()})
        for name, values in (("clamp", clamp), ("scale", scale), ("steer", steer)):
            if not all(math.isfinite(float(v)) for v in values.values()):
                raise ValueError(f"{name}: every value must be a finite number, got {values}")
        check_latents(list(rules), num_latents, "ablate/clamp/scale")
        check_latents(list(map(int, steer)), num_latents, "steer")
        return cls(
            edited=torch.tensor(list(rules), dtype=torch.long),
            multiplier=torch.tensor([m for m, _ in rules.values()]),
            offset=torch.tensor([o for _, o in rules.values()]),
            steered=torch.tensor(list(map(int, steer)), dtype=torch.long),
            strengths=torch.tensor([float(v) for v in steer.values()]),
        )

    def latent_delta(self, sae: DMSAEModel, latents: SparseLatents, num_tokens: int) -> Tensor | None:
        """[N, d] what the edits change in the reconstruction, in activation units:
        (new - old) @ W_dec[edited] * normalization_factor (b_dec cancels); None without edits."""
        if not self.edited.numel():
            return None
        W_dec = sae.W_dec
        edited = self.edited.to(W_dec.device)
        slot = torch.full((sae.config.num_latents,), -1, dtype=torch.long, device=W_dec.device)
        slot[edited] = torch.arange(edited.numel(), device=W_dec.device)
        entry_slots = slot[latents.cols]
        hit = entry_slots >= 0
        old = W_dec.new_zeros(num_tokens, edited.numel())
        old[latents.rows[hit], entry_slots[hit]] = latents.values[hit].to(W_dec.dtype)
        new = old * self.multiplier.to(old) + self.offset.to(old)
        return (new - old) @ W_dec[edited] * sae.config.normalization_factor

    def steering_vector(self, sae: DMSAEModel) -> Tensor | None:
        """[d] sum of strength x decoder direction, in activation units (as if each steered latent
        fired ``strength`` more: strength x normalization_factor x W_dec[j]); None without steering."""
        if not self.steered.numel():
            return None
        W_dec = sae.W_dec
        return self.strengths.to(W_dec) @ W_dec[self.steered.to(W_dec.device)] * sae.config.normalization_factor


# ----------------------------------------------------------------------------------------------
# The splice


def _past_length(kwargs: dict) -> int:
    """Tokens already in the KV cache of a forward call (transformers 5 passes ``cache``, older
    versions ``past_key_values`` and ``cache_position``)."""
    for name in ("cache", "past_key_values"):
        cache = kwargs.get(name)
        if cache is not None and hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
    cache_position = kwargs.get("cache_position")
    if isinstance(cache_position, Tensor) and cache_position.numel():
        return int(cache_position.reshape(-1)[0])
    return 0


class SAESplice:
    """The state of one :func:`splice_sae` context: its settings, and what the most recent forward
    pass did (``kept``: [B, T] the positions the SAE replaced; ``latents``: their SAE latents, as
    :class:`SparseLatents` over the kept positions in row-major order, before the edits)."""

    def __init__(self, sae: DMSAEModel, model: nn.Module, edits: LatentEdits, error_term: bool, use_threshold: bool):
        self.sae, self.edits = sae, edits
        self.error_term, self.use_threshold = error_term, use_threshold
        self.bos_token_id = bos_token_id(model)
        self.kept: Tensor | None = None
        self.latents: SparseLatents | None = None
        self._inputs: ForwardInputs | None = None
        self._prompt_median: Tensor | None = None

    # ---- Hooks ----------------------------------------------------------------------------

    def read_inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        self._inputs = ForwardInputs(
            input_ids if isinstance(input_ids, Tensor) else None,
            mask if isinstance(mask, Tensor) and mask.ndim == 2 else None,
            _past_length(kwargs),
        )

    def forget_inputs(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        self._inputs = None

    def replace_output(self, module: nn.Module, args: tuple, output):
        hidden = check_width(self.sae, hidden_states_of(output))
        kept = self.kept_positions(hidden)
        self.kept = kept
        if not kept.any():
            self.latents = None
            return None
        return with_hidden_states(output, hidden.index_put((kept,), self.replacement(hidden[kept])))

    # ---- What is replaced, and by what ----------------------------------------------------

    def kept_positions(self, hidden: Tensor) -> Tensor:
        """The trainer's rule (:func:`token_mask`, :func:`kept_positions`). A forward that starts a
        sequence (empty KV cache) uses its own batch median, as the trainer, and remembers it; a later
        generation step sees one new token per row, whose own median means nothing, so it uses the
        median of the forward that started the sequence (its own batch median when this splice saw none)."""
        mask = token_mask(hidden, self._inputs, self.bos_token_id, self.sae.config.mask_bos)
        ratio = self.sae.config.max_norm_ratio
        if ratio <= 0 or not mask.any():
            return mask
        starts_sequence = self._inputs is None or self._inputs.past_length == 0
        if starts_sequence or self._prompt_median is None:
            reference = median_norm(hidden, mask)
            if starts_sequence:
                self._prompt_median = reference
        else:
            reference = self._prompt_median
        return kept_positions(hidden, mask, ratio, reference)

    def replacement(self, x: Tensor) -> Tensor:
        """[n, d] what the model sees instead of ``x`` [n, d] (the kept positions): the edited
        reconstruction, plus the SAE's error ``x - reconstruction`` with ``error_term`` (computed
        as ``x + (edited - unedited reconstruction)``, so that without edits it is ``x`` exactly),
        plus the steering vector; in ``x``'s dtype and device."""
        sae = self.sae
        sae_input = x.to(sae.W_dec.device)
        output = sae(sae_input, use_threshold=self.use_threshold, output_dense_latents=False)
        self.latents = output.sparse_latents
        terms = [self.edits.latent_delta(sae, output.sparse_latents, x.shape[0]), self.edits.steering_vector(sae)]
        terms = [term for term in terms if term is not None]
        change = sum(terms[1:], terms[0]) if terms else None
        if self.error_term:
            return x if change is None else x + change.to(x.device, x.dtype)
        reconstruction = output.reconstruction if change is None else output.reconstruction + change
        return reconstruction.to(x.device, x.dtype)


@contextmanager
def splice_sae(
    sae: DMSAEModel,
    model: nn.Module,
    *,
    error_term: bool = False,
    ablate: Sequence[int] = (),
    clamp: Mapping[int, float] | None = None,
    scale: Mapping[int, float] | None = None,
    steer: Mapping[int, float] | None = None,
    use_threshold: bool | None = None,
) -> Iterator[SAESplice]:
    """Within the context, the output of ``model``'s module ``sae.config.hook_module`` is replaced, at
    the positions the SAE reads, by the SAE's reconstruction; every forward pass, ``model.generate``
    included (each step splices its new tokens).

    Args:
        model: the causal LM the SAE was trained on (any transformers model whose module path
            ``config.hook_module`` exists).
        error_term: add the SAE's error ``x - reconstruction(x)``: without edits the model is then
            unchanged (exactly), and edits act on the latents alone (SAELens's ``use_error_term``).
        ablate: latents set to 0.
        clamp: {latent: value} set to that value at every spliced position, fired or not.
        scale: {latent: factor} multiplied by that factor.
        steer: {latent: strength} adds strength x the latent's decoder direction, in the
            activations' units (what the latent firing ``strength`` more would add).
        use_threshold: default: the calibrated inference threshold when there is one (every
            position encoded alone), else BatchTopK over the spliced positions of each forward.

    Untouched in every mode, edits and steering included, as in training and in the metrics:
    padding (from a 2-D ``attention_mask``), a BOS token at the first real position of a row when
    ``config.mask_bos``, and positions whose activation norm exceeds ``config.max_norm_ratio`` x
    the median norm (:meth:`SAESplice.kept_positions` says which median under generation).
    BOS needs ``input_ids``: a model called with ``inputs_embeds`` is spliced at its BOS too,
    unless its norm excludes it.

    Yields the :class:`SAESplice`, whose ``kept`` and ``latents`` describe the latest forward pass.
    """
    hooked = hooked_module(sae, model)
    edits = LatentEdits.of(sae.config.num_latents, ablate, clamp, scale, steer)
    threshold = sae.config.threshold >= 0 if use_threshold is None else use_threshold
    if threshold and sae.config.threshold < 0:
        raise ValueError("use_threshold=True, but this DMSAE has no calibrated inference threshold (config.threshold < 0)")
    splice = SAESplice(sae, model, edits, error_term, threshold)
    handles = [
        model.register_forward_pre_hook(splice.read_inputs, with_kwargs=True),
        model.register_forward_hook(splice.forget_inputs, with_kwargs=True, always_call=True),
        hooked.register_forward_hook(splice.replace_output),
    ]
    try:
        yield splice
    finally:
        for handle in handles:
            handle.remove()
