"""Per-latent evidence of one SAE on held-out tokens: what each latent responds to (every final
SAE of a run), and the firing frequencies alone (every SAE, cycles included: :class:`FiringCounts`);
the files a run writes, their reader (:meth:`LatentEvidence.from_folder`), and the same evidence
computed on any texts (:meth:`LatentEvidence.from_texts`).

Computed from the SAE outputs of one pass over the held-out activations (the run's evaluation
hands every batch's output to :meth:`EvidenceStream.add`), so no second base-model pass is needed:

    firing frequency   tokens where the latent is active / held-out tokens
    mean, max          of the latent's activation over the tokens where it fires
    histogram          counts of its nonzero activations in HISTOGRAM_BINS log10-spaced bins
                       (edges ``histogram_edges``; the first and last bins also take what lies below / above)
    top examples       the TOP_N held-out tokens where it is largest, kept by streaming: a [K, TOP_N]
                       buffer and a bounded list of candidates above each latent's current N-th value,
                       merged by one sort whenever the list outgrows the buffer (never [tokens, K])
    quantile examples  a uniform random sample of SAMPLE_SIZE of its firing tokens, streamed the same
                       way with random priorities, read at QUANTILES of the sample's activations:
                       typical firings, beside the top ones, as feature dashboards show them
    windows            for every example, the latent's activation on the WINDOW_BEFORE tokens before
                       it and WINDOW_AFTER after it (NaN where a position never reached the SAE: BOS,
                       padding, massive-norm positions, outside the context)
    logit effect       the tokens the decoder direction promotes and suppresses (computed by the
                       caller, ``modeling_dmsae.logit_effect``)

The windows need the latent's activation at tokens that were not among its top ones. In inference
mode a DMSAE encodes one token at a time and each latent independently (ReLU for the dense core,
the calibrated threshold for the rest), so a window is one dot product per (example, offset) with
that latent's encoder row, over the in-memory activations: no second pass over the SAE's full
width. An SAE without a threshold (BatchTopK over the batch) is read with the mean BatchTopK cut of
the evaluation batches instead.

Saved beside each SAE: ``EVIDENCE_TENSORS`` (the tensors of :class:`EvidenceTensors`, latent-major),
``EVIDENCE_JSON`` (``format``: FORMAT, the settings, and ``token_text``: the text of every token id
used) and ``firing_frequencies.safetensors`` (``firing_frequency`` [K] float32). Size for K latents, E =
TOP_N + len(QUANTILES) examples and W = WINDOW_BEFORE + 1 + WINDOW_AFTER window tokens: about
K (2 E W + 8 E + 4 HISTOGRAM_BINS + 16 LOGIT_TOKENS + 12) bytes, 61 MB at K = 65,536 (5% of the
SAE's fp32 weights at d = 2304; :func:`evidence_bytes`), plus the held-out token ids (4 bytes a
token). Working memory (:func:`evidence_working_bytes`): 0.40 GB at K = 65,536.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HFValidationError
from safetensors.torch import load_file
from torch import nn

from .interventions import check_latents, hooked_activations, logit_effect
from .modeling_dmsae import DMSAEModel, DMSAEOutput, rank_in_groups

TOP_N = 10
QUANTILES = (0.1, 0.3, 0.5, 0.7, 0.9)
SAMPLE_SIZE = 32
WINDOW_BEFORE, WINDOW_AFTER = 12, 3
HISTOGRAM_BINS = 40
HISTOGRAM_RANGE = (-4.0, 2.0)  # log10 of the activation: 1e-4 .. 1e2 in the SAE's (normalised) units
LOGIT_TOKENS = 10
FORMAT = "dmsae-latent-evidence/1"
EVIDENCE_TENSORS, EVIDENCE_JSON = "latent_evidence.safetensors", "latent_evidence.json"


def window_length() -> int:
    return WINDOW_BEFORE + 1 + WINDOW_AFTER


def evidence_bytes(num_latents: int) -> int:
    """Bytes of one SAE's evidence tensors (without the held-out token ids)."""
    examples = TOP_N + len(QUANTILES)
    per_latent = 2 * examples * window_length() + 8 * examples + 4 * HISTOGRAM_BINS + 16 * LOGIT_TOKENS + 12
    return num_latents * per_latent


def evidence_working_bytes(num_latents: int) -> int:
    """Peak memory of the evidence: the streaming [K, n] buffers (key, value, row, and the latent
    index while merging) with their candidate lists, each bounded by the buffer's size, the
    histogram counts, and the [K, E, W] indices the windows are read with."""
    buffers = 2 * num_latents * (TOP_N + SAMPLE_SIZE) * (4 + 4 + 8 + 8)
    windows = 3 * 8 * num_latents * (TOP_N + len(QUANTILES)) * window_length()
    return max(buffers, windows) + num_latents * (HISTOGRAM_BINS * 8 + 24)


def histogram_edges() -> torch.Tensor:
    low, high = HISTOGRAM_RANGE
    return torch.logspace(low, high, HISTOGRAM_BINS + 1)


class _TopPerLatent:
    """The n entries of largest key per latent, streamed: candidates below a latent's current n-th
    key are dropped at once, the rest wait in a list that is merged into the [K, n] buffer by one
    sort once it holds as many entries as the buffer (so memory stays within twice the buffer)."""

    def __init__(self, num_latents: int, n: int, device: torch.device):
        self.num_latents, self.n = num_latents, n
        self.keys = torch.full((num_latents, n), -math.inf, device=device)
        self.values = torch.zeros(num_latents, n, device=device)
        self.rows = torch.full((num_latents, n), -1, dtype=torch.long, device=device)
        self.floor = torch.full((num_latents,), -math.inf, device=device)
        self.pending: list[tuple[torch.Tensor, ...]] = []
        self.pending_size = 0

    def add(self, cols: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor) -> None:
        keep = keys > self.floor[cols]
        self.pending.append((cols[keep], keys[keep], values[keep], rows[keep]))
        self.pending_size += int(keep.sum())
        if self.pending_size >= self.keys.numel():
            self._merge()

    def _merge(self) -> None:
        filled = self.rows >= 0
        latent_of = torch.arange(self.num_latents, device=self.keys.device).unsqueeze(1).expand_as(self.rows)
        cols, keys, values, rows = (
            torch.cat([current[filled], *(part[i] for part in self.pending)])
            for i, current in enumerate((latent_of, self.keys, self.values, self.rows))
        )
        order, rank = rank_in_groups(cols, keys)  # by latent, then by descending key
        cols, keys, values, rows = cols[order], keys[order], values[order], rows[order]
        kept = rank < self.n
        self.keys.fill_(-math.inf)
        self.rows.fill_(-1)
        self.keys[cols[kept], rank[kept]] = keys[kept]
        self.values[cols[kept], rank[kept]] = values[kept]
        self.rows[cols[kept], rank[kept]] = rows[kept]
        self.floor = torch.where(self.rows[:, -1] >= 0, self.keys[:, -1], -math.inf)
        self.pending, self.pending_size = [], 0

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[K, n] values and rows (row -1 where the latent has fewer than n entries), by descending key."""
        self._merge()
        return self.values, self.rows


class Example(NamedTuple):
    """A token where a latent fires, in its context."""

    activation: float  # the latent's activation at the token
    tokens: list[str]  # up to WINDOW_BEFORE tokens before it, the token, up to WINDOW_AFTER after (within its context)
    activations: list[float]  # the latent on each of them; NaN where the SAE read nothing (BOS, padding, massive norm)
    index: int  # the token's place in ``tokens``
    context: int  # which context (row of ``context_tokens``) and where in it
    position: int

    @property
    def token(self) -> str:
        return self.tokens[self.index]


class LatentStats(NamedTuple):
    firing_frequency: float  # share of the tokens where the latent fires
    mean_activation: float  # over those tokens
    max_activation: float


class Histogram(NamedTuple):
    counts: list[int]  # nonzero activations per bin; the first and last bins also take what lies below / above
    edges: list[float]  # HISTOGRAM_BINS + 1 log10-spaced edges, in the SAE's normalised units


class TokenLogit(NamedTuple):
    token: str
    token_id: int
    logit: float


class LatentLogits(NamedTuple):
    """The tokens a latent's decoder direction promotes and suppresses most (the direct path
    through the final norm and unembedding: :func:`~.interventions.logit_effect`)."""

    promoted: list[TokenLogit]  # largest first
    suppressed: list[TokenLogit]  # most negative first


class EvidenceTensors(NamedTuple):
    """One SAE's evidence, as ``EVIDENCE_TENSORS`` holds it; example e of latent j sits at
    ``example_context[j, e]``, ``example_position[j, e]`` (-1: none); examples 0..TOP_N-1 are the
    top ones, the rest the QUANTILES samples."""

    firing_frequency: torch.Tensor  # [K] float32
    mean_activation: torch.Tensor  # [K] float32, over firing tokens (0 for a dead latent)
    max_activation: torch.Tensor  # [K] float32
    histogram: torch.Tensor  # [K, HISTOGRAM_BINS] int32
    histogram_edges: torch.Tensor  # [HISTOGRAM_BINS + 1] float32
    example_activation: torch.Tensor  # [K, E] float32
    example_context: torch.Tensor  # [K, E] int32
    example_position: torch.Tensor  # [K, E] int32
    window_activations: torch.Tensor  # [K, E, W] float16, NaN where no activation exists
    promoted_tokens: torch.Tensor  # [K, LOGIT_TOKENS] int32
    promoted_logits: torch.Tensor  # [K, LOGIT_TOKENS] float32
    suppressed_tokens: torch.Tensor  # [K, LOGIT_TOKENS] int32
    suppressed_logits: torch.Tensor  # [K, LOGIT_TOKENS] float32
    context_tokens: torch.Tensor  # [contexts, context length] int32: the token ids of the contexts

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: value.contiguous().cpu() for name, value in self._asdict().items()}


@dataclass(frozen=True)
class LatentEvidence:
    """What each latent of an SAE responds to, readable: its tensors and the text of every token
    id they use.

        evidence = LatentEvidence.from_folder("runs/default/transfer/k-0032-dense_core")
        for example in evidence.top_contexts(42):
            print(f"{example.activation:.2f}", "".join(example.tokens))
    """

    data: EvidenceTensors
    token_text: dict[int, str]

    # ---- Reading a run's files, or computing them on texts -------------------------------

    @classmethod
    def from_folder(cls, path_or_hub_id: str | os.PathLike, *, subfolder: str | None = None, revision: str | None = None) -> LatentEvidence:
        """The evidence a run wrote beside a final SAE: a local folder (``RUN/transfer/NAME``,
        ``RUN/hub/saes/NAME``) or a Hub repo id (downloaded with ``huggingface_hub``)."""
        tensors_file, settings_file = (_evidence_file(path_or_hub_id, name, subfolder, revision) for name in (EVIDENCE_TENSORS, EVIDENCE_JSON))
        settings = json.loads(Path(settings_file).read_text())
        if settings.get("format") != FORMAT:
            raise ValueError(f"{settings_file} holds evidence of format {settings.get('format')!r}; this dmsae reads {FORMAT!r}: upgrade dmsae")
        token_text = {int(token_id): text for token_id, text in settings["token_text"].items()}
        return cls(EvidenceTensors(**load_file(tensors_file)), token_text)

    @classmethod
    @torch.no_grad()
    def from_texts(
        cls, sae: DMSAEModel, model: nn.Module, tokenizer, texts: Sequence[str], *, batch_size: int = 8, max_length: int | None = None, seed: int = 0
    ) -> LatentEvidence:
        """The run's evidence, computed by the same code, on ``texts`` read by ``model`` (the causal
        LM the SAE was trained on): each text one context, tokenised as ``tokenizer`` does by default,
        padded on the right, cut at ``max_length`` tokens when given; the SAE reads the positions
        :meth:`DMSAEModel.latents_from_text` does, ``batch_size`` texts per forward."""
        if isinstance(texts, str) or not texts:
            raise ValueError("texts must be a non-empty list of strings: wrap a single text in a list")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token to batch texts of different lengths: set tokenizer.pad_token = tokenizer.eos_token")
        inputs = tokenizer(list(texts), return_tensors="pt", padding=True, padding_side="right", truncation=max_length is not None, max_length=max_length)
        stream = EvidenceStream(sae.config.num_latents, sae.W_dec.device, seed)
        activations, slots = _stream_texts(sae, model, inputs.input_ids, inputs.attention_mask, batch_size, stream)
        data = stream.finish(sae, activations, slots, inputs.input_ids, top_logit_effects(sae, model))
        ids = torch.cat([data.context_tokens.flatten(), data.promoted_tokens.flatten(), data.suppressed_tokens.flatten()]).unique().tolist()
        return cls(data, dict(zip(ids, tokenizer.batch_decode([[i] for i in ids]))))

    # ---- One latent -----------------------------------------------------------------------

    @property
    def num_latents(self) -> int:
        return self.data.firing_frequency.numel()

    def top_contexts(self, j: int) -> list[Example]:
        """Latent j's TOP_N largest activations (fewer if it fired less often), largest first."""
        return self._examples(j, range(TOP_N))

    def typical_contexts(self, j: int) -> list[Example]:
        """Latent j's typical firings: a random sample of them read at QUANTILES of its activations, rising."""
        return self._examples(j, range(TOP_N, self.data.example_context.shape[1]))

    def stats(self, j: int) -> LatentStats:
        self._check(j)
        return LatentStats(float(self.data.firing_frequency[j]), float(self.data.mean_activation[j]), float(self.data.max_activation[j]))

    def histogram(self, j: int) -> Histogram:
        """Latent j's nonzero activations in log10-spaced bins."""
        self._check(j)
        return Histogram(self.data.histogram[j].tolist(), self.data.histogram_edges.tolist())

    def logit_effect(self, j: int) -> LatentLogits:
        self._check(j)

        def pairs(tokens: torch.Tensor, logits: torch.Tensor) -> list[TokenLogit]:
            return [TokenLogit(self.token_text[t], t, v) for t, v in zip(tokens[j].tolist(), logits[j].tolist())]

        data = self.data
        return LatentLogits(pairs(data.promoted_tokens, data.promoted_logits), pairs(data.suppressed_tokens, data.suppressed_logits))

    def _examples(self, j: int, slots: range) -> list[Example]:
        self._check(j)
        data, length = self.data, self.data.context_tokens.shape[1]
        examples = []
        for e in slots:
            context, position = int(data.example_context[j, e]), int(data.example_position[j, e])
            if context < 0:
                continue
            first, last = max(position - WINDOW_BEFORE, 0), min(position + WINDOW_AFTER, length - 1)
            window = data.window_activations[j, e, first - position + WINDOW_BEFORE : last - position + WINDOW_BEFORE + 1]
            tokens = [self.token_text[t] for t in data.context_tokens[context, first : last + 1].tolist()]
            examples.append(Example(float(data.example_activation[j, e]), tokens, window.float().tolist(), position - first, context, position))
        return examples

    def _check(self, j: int) -> None:
        check_latents([j], self.num_latents, "LatentEvidence")


def _stream_texts(
    sae: DMSAEModel, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int, stream: EvidenceStream
) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed ``stream`` the SAE's outputs at the positions it reads, ``batch_size`` texts per forward,
    as the run's evaluation feeds it the held-out rows; return those rows' activations [N, d] and
    their slots (text * length + position)."""
    rows, slots = [], []
    for start in range(0, len(input_ids), batch_size):
        batch = slice(start, start + batch_size)
        hidden, kept = hooked_activations(sae, model, input_ids[batch], attention_mask[batch])
        x = hidden[kept].to(sae.W_dec.device, torch.float32)  # as the run keeps its held-out rows
        stream.add(sae(x, use_threshold=sae.config.threshold >= 0, output_dense_latents=False), sum(map(len, rows)))
        rows.append(x)
        slots.append(kept.cpu().flatten().nonzero().squeeze(1) + start * kept.shape[1])
    return torch.cat(rows), torch.cat(slots)


def _evidence_file(path_or_hub_id: str | os.PathLike, name: str, subfolder: str | None, revision: str | None) -> Path:
    """The local path of an evidence file of a folder or a Hub repo."""
    folder = Path(path_or_hub_id, subfolder or "")
    if folder.is_dir():
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{folder} holds no {name}: the per-latent evidence is written beside each final SAE of a run "
                "(RUN/transfer/NAME, RUN/hub/saes/NAME); a cycle's SAE has only firing_frequencies.safetensors"
            )
        return folder / name
    try:
        return Path(hf_hub_download(str(path_or_hub_id), name, subfolder=subfolder, revision=revision))
    except HFValidationError:
        raise FileNotFoundError(f"{path_or_hub_id} is neither a folder nor a Hub repo id: pass the folder of a final SAE or its repo id") from None


def row_of_slot(slots: torch.Tensor, num_slots: int) -> torch.Tensor:
    """[num_slots] the activation row of every (context, position) slot, -1 where the position
    reached no SAE; ``slots[r]`` = context * length + position of row r."""
    rows = torch.full((num_slots,), -1, dtype=torch.long)
    rows[slots] = torch.arange(slots.numel())
    return rows


class FiringCounts:
    """Fed every evaluation batch: how many held-out tokens each latent fires on."""

    def __init__(self, num_latents: int, device: torch.device):
        self.num_latents = num_latents
        self.counts = torch.zeros(num_latents, dtype=torch.long, device=device)
        self.tokens = 0

    @torch.no_grad()
    def add(self, output: DMSAEOutput, first_row: int) -> None:
        self.counts += torch.bincount(output.sparse_latents.cols, minlength=self.num_latents)
        self.tokens += output.reconstruction.shape[0]

    def firing_frequency(self) -> torch.Tensor:
        """[K] float32: the fraction of held-out tokens each latent fires on."""
        return (self.counts.float() / max(self.tokens, 1)).cpu()


class EvidenceStream(FiringCounts):
    """Pass one, fed every evaluation batch: counts, sums, maxima, histogram, top and sampled rows."""

    def __init__(self, num_latents: int, device: torch.device, seed: int = 0):
        super().__init__(num_latents, device)
        self.sums = torch.zeros(num_latents, dtype=torch.float64, device=device)
        self.maxima = torch.zeros(num_latents, device=device)
        self.histogram = torch.zeros(num_latents * HISTOGRAM_BINS, dtype=torch.long, device=device)
        self.top = _TopPerLatent(num_latents, TOP_N, device)
        self.sample = _TopPerLatent(num_latents, SAMPLE_SIZE, device)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.cuts: list[float] = []

    @torch.no_grad()
    def add(self, output: DMSAEOutput, first_row: int) -> None:
        super().add(output, first_row)
        rows, cols, values = output.sparse_latents
        values = values.detach().float()
        rows = rows + first_row
        self.cuts.append(float(output.batchtopk_threshold))
        self.sums.index_add_(0, cols, values.double())
        self.maxima.scatter_reduce_(0, cols, values, reduce="amax")
        low, high = HISTOGRAM_RANGE
        bins = ((values.log10() - low) / (high - low) * HISTOGRAM_BINS).floor().clamp(0, HISTOGRAM_BINS - 1).long()
        self.histogram += torch.bincount(cols * HISTOGRAM_BINS + bins, minlength=self.histogram.numel())
        self.top.add(cols, values, values, rows)
        priority = torch.rand(values.shape, generator=self.generator, device=values.device)
        self.sample.add(cols, priority, values, rows)

    def quantile_examples(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[K, Q] values and rows: the sampled firings at QUANTILES of the sample's activations."""
        values, rows = self.sample.result()
        values = torch.where(rows >= 0, values, math.inf)  # unfilled slots sort last
        order = values.argsort(dim=1)
        values, rows = values.gather(1, order), rows.gather(1, order)
        sampled = (rows >= 0).sum(1, keepdim=True)
        q = torch.tensor(QUANTILES, device=values.device).unsqueeze(0)
        index = (q * (sampled - 1).clamp_min(0)).round().long()
        picked_rows = rows.gather(1, index)
        return values.gather(1, index).masked_fill(picked_rows < 0, 0), picked_rows

    def finish(
        self,
        sae: DMSAEModel,
        activations: torch.Tensor,
        slots: torch.Tensor,
        context_tokens: torch.Tensor,
        effects: LogitEffect,
    ) -> EvidenceTensors:
        """Pass two (the windows, on the in-memory held-out ``activations``) and the result.
        ``slots[r]`` = context * length + position of row r in ``context_tokens`` [contexts, length];
        ``effects``: :func:`top_logit_effects`."""
        top_values, top_rows = self.top.result()
        quantile_values, quantile_rows = self.quantile_examples()
        rows = torch.cat([top_rows, quantile_rows], dim=1).cpu()
        length = context_tokens.shape[1]
        example_slots = torch.where(rows >= 0, slots.cpu()[rows.clamp_min(0)], -1)
        threshold = sae.config.threshold if sae.config.threshold >= 0 else sum(self.cuts) / max(len(self.cuts), 1)
        windows = latent_windows(sae, activations, row_of_slot(slots.cpu(), context_tokens.numel()), length, example_slots, threshold)
        promoted, promoted_logits, suppressed, suppressed_logits = effects
        return EvidenceTensors(
            firing_frequency=self.firing_frequency(),
            mean_activation=(self.sums / self.counts.clamp_min(1)).float().cpu(),
            max_activation=self.maxima.cpu(),
            histogram=self.histogram.reshape(self.num_latents, HISTOGRAM_BINS).int().cpu(),
            histogram_edges=histogram_edges(),
            example_activation=torch.cat([top_values, quantile_values], dim=1).float().cpu(),
            example_context=torch.where(example_slots >= 0, example_slots // length, -1).int(),
            example_position=torch.where(example_slots >= 0, example_slots % length, -1).int(),
            window_activations=windows.half(),
            promoted_tokens=promoted.int().cpu(),
            promoted_logits=promoted_logits.float().cpu(),
            suppressed_tokens=suppressed.int().cpu(),
            suppressed_logits=suppressed_logits.float().cpu(),
            context_tokens=context_tokens.int().cpu(),
        )


@torch.no_grad()
def latent_windows(
    sae: DMSAEModel,
    activations: torch.Tensor,
    slot_rows: torch.Tensor,
    length: int,
    example_slots: torch.Tensor,
    threshold: float,
    examples_per_block: int = 1024,
) -> torch.Tensor:
    """[K, E, W] latent j's inference-mode activation around each of its examples (slots [K, E],
    -1: none; ``slot_rows``: :func:`row_of_slot`; contexts of ``length`` tokens): relu(centred x .
    encoder row j + b_enc[j]), kept if j is a dense-core latent or above ``threshold``; NaN where
    the window's position has no activation row. The held-out activations are normalised and
    centred once, on the SAE's device; each block gathers [block, W, d] of them and one encoder
    row per example."""
    K, E = example_slots.shape
    offsets = torch.arange(-WINDOW_BEFORE, WINDOW_AFTER + 1)
    slots = example_slots.unsqueeze(-1) + offsets  # [K, E, W]
    same_context = (example_slots.unsqueeze(-1) >= 0) & (slots // length == example_slots.unsqueeze(-1) // length) & (slots >= 0)
    rows = torch.where(same_context, slot_rows[slots.clamp(0, slot_rows.numel() - 1)], -1).reshape(K * E, -1)
    latent_of = torch.arange(K).repeat_interleave(E)
    windows = torch.full(rows.shape, math.nan)
    device = sae.W_dec.device
    encoder, b_enc = sae.encoder_weight.detach(), sae.b_enc.detach()
    centred = sae.normalize_activations(activations.to(device)) - sae.b_dec.detach()  # once: the gathers read it
    for block in (rows >= 0).any(1).nonzero().squeeze(1).split(examples_per_block):
        block_rows = rows[block].to(device)
        j = latent_of[block].to(device)
        pre = torch.einsum("bwd,bd->bw", centred[block_rows.clamp_min(0)], encoder[j].to(centred.dtype)) + b_enc[j].unsqueeze(1)
        bound = torch.where(j < sae._unmasked_columns(), 0.0, threshold).unsqueeze(1)
        kept = torch.where(pre > bound, pre, 0.0).float()
        windows[block] = torch.where(block_rows >= 0, kept, math.nan).cpu()
    return windows.reshape(K, E, -1)


class LogitEffect(NamedTuple):
    """[K, n] each: the n most promoted / suppressed token ids of every latent and their logit effects."""

    promoted_tokens: torch.Tensor
    promoted_logits: torch.Tensor
    suppressed_tokens: torch.Tensor
    suppressed_logits: torch.Tensor


@torch.no_grad()
def top_logit_effects(sae: DMSAEModel, base_model, num_tokens: int = LOGIT_TOKENS, rows_per_block: int = 1024) -> LogitEffect:
    """The ``num_tokens`` most promoted and suppressed tokens of every latent, from
    ``modeling_dmsae.logit_effect`` (the one formula, and its approximation: the direct path
    through the final norm and unembedding), its head product in bfloat16 (half the cost of the
    [K, d] x [d, vocab] product, the evidence's largest part; near-ties within ~0.4% may swap), in
    blocks of latents so that [block, vocab] bounds the memory."""
    parts = []
    for block in torch.arange(sae.config.num_latents).split(rows_per_block):
        logits = logit_effect(sae, base_model, block, dtype=torch.bfloat16)
        top, bottom = logits.topk(num_tokens, dim=1), logits.topk(num_tokens, dim=1, largest=False)
        parts.append((top.indices, top.values.float(), bottom.indices, bottom.values.float()))
    return LogitEffect(*(torch.cat([part[i] for part in parts]).cpu() for i in range(4)))
