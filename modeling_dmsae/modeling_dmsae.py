"""Distilled Matryoshka Sparse Autoencoder (DMSAE): the whole model in one file.

Notation (paper, Eq. 1-9): x in R^d, K latents, the first c of them the frozen core, the
non-core latents split into Matryoshka groups with cumulative sizes m_0 < ... < m_L.

    f(x)      = ReLU((x - b_dec) W_enc + b_enc)                               (Eq. 1)
    f~(x)     = (f(x)_{0:c}, BatchTopK_{k_noncore}(f(x)_{c:K}))  dense core  (Eq. 3)
              =  BatchTopK_k(f(x))                              sparse core
    x^_m(x)   = b_dec + sum_{j < c + m} f~_j(x) W_dec[j]                      (Eq. 2)
    L         = sum_{m in M} ||x - x^_m||^2 + alpha * AuxK                    (Eq. 5)
    k_noncore = round(k (K - c) / K)                                         (Eq. 4)

Every formula has one implementation here; the trainer and the attribution step call it.

Speed: only the encoder GEMM is dense. BatchTopK finds its cut without a full sort
(``batch_topk_entries``); under torch.distributed it cuts the processes' batches as one, through
a few reductions of counts, never a gather of activations. Latents are kept as a sparse list of (token, latent, value) entries;
the decoder gathers the active rows (``embedding_bag``) once for all prefixes, and the backward
runs through the kept entries only (``_SparseDecodePrefixes``, ``_SparseEncoderValues``); the
ReLU-only core columns use small dense products instead. The core encoder rows are a buffer: no
gradient, no optimizer state, bitwise frozen.

The SAE inside a causal LM (the splice, the logit effect, latents from text) lives in
``interventions.py``, which imports this file; the methods here that hand over to it import it
when called, so this file loads, and reads, without it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import ContextManager, NamedTuple, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_dmsae import DMSAEConfig


class SparseLatents(NamedTuple):
    """Active latents of a batch of N tokens, sorted by (row, col).

    rows: [nnz] token index; cols: [nnz] latent index; values: [nnz] activation (> 0).
    """

    rows: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor

    def to_dense(self, num_tokens: int, num_latents: int) -> torch.Tensor:
        dense = self.values.new_zeros(num_tokens, num_latents)
        return dense.index_put((self.rows, self.cols), self.values)


class TextLatents(NamedTuple):
    """SAE latents of tokenised text (:meth:`DMSAEModel.latents_from_text`).

    latents: [B, T, K] activations, zero at the positions the SAE does not read; a dense tensor, or
        with ``sparse=True`` a sparse COO tensor (``latents.to_dense()`` gives the dense one from either).
    kept: [B, T] bool, the positions the SAE read: not padding, not a BOS token starting its row
        (``config.mask_bos``), not a massive-norm position (``config.max_norm_ratio``).
    """

    latents: torch.Tensor
    kept: torch.Tensor

    def top(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(values [B, T, n], indices [B, T, n]): each position's n most active latents, largest
        first; where fewer than n are active, the rest have value 0 and index -1."""
        batch, length, num_latents = self.latents.shape
        if not isinstance(n, int) or not 1 <= n <= num_latents:
            raise ValueError(f"top(n): n must be an integer in [1, {num_latents}], got {n!r}")
        entries = (self.latents if self.latents.is_sparse else self.latents.to_sparse()).coalesce()
        (rows, positions, latents), values = entries.indices(), entries.values()
        position_of = rows * length + positions
        order, rank = rank_in_groups(position_of, values)
        chosen = order[rank < n]
        slots = (position_of[chosen], rank[rank < n])
        top_values = values.new_zeros(batch * length, n).index_put_(slots, values[chosen])
        top_indices = torch.full_like(top_values, -1, dtype=torch.long).index_put_(slots, latents[chosen])
        return top_values.reshape(batch, length, n), top_indices.reshape(batch, length, n)


@dataclass
class DMSAEOutput(ModelOutput):
    """Output of :meth:`DMSAEModel.forward`.

    loss: reconstruction_loss + aux_alpha * aux_loss (Eq. 5).
    reconstruction_loss: sum over prefixes c + m_i of the batch-mean squared error (no core-only term).
    prefix_losses: [L+1] the individual terms of that sum.
    aux_loss: normalised AuxK loss on the dead latents (0 when none are dead or none given).
    reconstruction: x^ from the full dictionary, in the input's units and shape.
    latents: dense [..., K] activations f~(x) (None when ``output_dense_latents=False``).
    sparse_latents: the same activations as a :class:`SparseLatents` over the flattened tokens.
    l0_core, l0_noncore, l0: mean active latents per token in the core, the rest, and in all (Eq. 9).
    fired: [K] bool, latents active on at least one token of the batch.
    batchtopk_threshold: smallest activation BatchTopK kept (logged while training).
    """

    loss: torch.Tensor | None = None
    reconstruction_loss: torch.Tensor | None = None
    prefix_losses: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    reconstruction: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    sparse_latents: SparseLatents | None = None
    l0_core: torch.Tensor | None = None
    l0_noncore: torch.Tensor | None = None
    l0: torch.Tensor | None = None
    fired: torch.Tensor | None = None
    batchtopk_threshold: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------
# Sparse building blocks
# ----------------------------------------------------------------------------------------


def _bag_offsets(sorted_bag_ids: torch.Tensor, num_bags: int) -> torch.Tensor:
    """Start offset of each bag in a list of entries sorted by bag id."""
    counts = torch.bincount(sorted_bag_ids, minlength=num_bags)
    return torch.cumsum(counts, 0) - counts


def gather_rows_weighted(
    row_ids: torch.Tensor,
    bag_ids: torch.Tensor,
    weights: torch.Tensor,
    table: torch.Tensor,
    num_bags: int,
    bags_sorted: bool = False,
) -> torch.Tensor:
    """out[b] = sum over entries e with bag_ids[e] == b of weights[e] * table[row_ids[e]].

    The sparse matrix product at the heart of the decoder and of the encoder backward,
    without materialising the [nnz, d] gathered rows. ``bag_ids`` are sorted first unless
    ``bags_sorted`` says they already are. Not differentiable through ``table`` at speed:
    use it inside the autograd functions below, which give the table's gradient its own gather.
    """
    if not bags_sorted:
        order = torch.argsort(bag_ids, stable=True)
        row_ids, bag_ids, weights = row_ids[order], bag_ids[order], weights[order]
    return F.embedding_bag(
        row_ids, table, offsets=_bag_offsets(bag_ids, num_bags), per_sample_weights=weights.to(table.dtype), mode="sum"
    )


def sampled_row_dots(
    left: torch.Tensor, left_ids: torch.Tensor, right: torch.Tensor, right_ids: torch.Tensor
) -> torch.Tensor:
    """out[e] = left[left_ids[e]] . right[right_ids[e]] for ``left_ids`` sorted (an SDDMM), without
    materialising the [nnz, d] gathered rows: the gradient of the weights of a sparse product."""
    if left.dtype in (torch.bfloat16, torch.float16):  # sampled_addmm has no CPU kernel for them; widening is exact
        left, right = left.float(), right.float()
    counts = torch.bincount(left_ids, minlength=left.shape[0])
    row_offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    with warnings.catch_warnings():  # torch flags sparse CSR as beta on every construction
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        pattern = torch.sparse_csr_tensor(
            row_offsets, right_ids, left.new_zeros(right_ids.shape), (left.shape[0], right.shape[0]),
            check_invariants=False,
        )
    return torch.sparse.sampled_addmm(pattern, left, right.T, beta=0.0).values()


def rank_in_groups(groups: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, rank): the entries sorted by group, then by descending key (ties in their given
    order), and each sorted entry's rank within its group (0 for the largest key)."""
    by_key = keys.argsort(descending=True, stable=True)
    order = by_key[groups[by_key].argsort(stable=True)]
    sorted_groups = groups[order]
    return order, torch.arange(order.numel(), device=order.device) - torch.searchsorted(sorted_groups, sorted_groups)


def _scatter_dense(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    return values.new_zeros(shape).index_put_((rows, cols), values)


def _core_and_rest(cols: torch.Tensor, core_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the entries in the core columns and of the others, each in their given order.

    The core columns go through small dense products ([N, c] x [c, d]) instead of row gathers: the
    dense core is ReLU-only, so about half of its entries are active, and the product costs only
    c / K of the encoder GEMM whatever their number."""
    in_core = cols < core_size
    return in_core.nonzero().squeeze(1), (~in_core).nonzero().squeeze(1)


class _SparseDecodePrefixes(torch.autograd.Function):
    """Prefix reconstructions from sparse latents (Eq. 2 for every prefix at once):

        x^_{m_i}[u] = b_dec + sum_{blocks b <= i} sum_{entries e of token u in block b} v_e W_dec[j_e]

    Forward: the core columns (all in block 0) as one dense product; every other entry through one
    gather of the active decoder rows binned by (block, token); then a running sum over blocks.
    Backward: a block's gradient G_b is the sum over the prefixes that contain it; then
    d v_e = G_{b_e}[u_e] . W_dec[j_e] and d W_dec[j] = sum_{e: j_e = j} v_e G_{b_e}[u_e].
    ``b_dec`` may be None: a plain sparse product (AuxK's reconstruction, one block).
    """

    @staticmethod
    def forward(ctx, values, W_dec, b_dec, rows, cols, blocks, core_size, num_blocks, num_tokens):
        core, rest = _core_and_rest(cols, core_size)
        core_acts = _scatter_dense(rows[core], cols[core], values[core].to(W_dec.dtype), (num_tokens, core_size))
        # Non-core entries sorted by bag (block, token) once; rows are gathered per bag, never materialised.
        bags = blocks[rest] * num_tokens + rows[rest]
        bag_order = torch.argsort(bags, stable=True)
        rest, bags = rest[bag_order], bags[bag_order]
        contributions = gather_rows_weighted(
            cols[rest], bags, values[rest], W_dec, num_blocks * num_tokens, bags_sorted=True
        )
        prefixes = contributions.view(num_blocks, num_tokens, -1)
        if core_size:
            prefixes[0].addmm_(core_acts, W_dec[:core_size])
        if b_dec is not None:
            prefixes[0] += b_dec
        for block in range(1, num_blocks):
            prefixes[block] += prefixes[block - 1]
        ctx.save_for_backward(values, rows, cols, core, core_acts, rest, bags, W_dec)
        return prefixes

    @staticmethod
    def backward(ctx, grad_prefixes):
        values, rows, cols, core, core_acts, rest, bags, W_dec = ctx.saved_tensors
        num_blocks, num_tokens, d = grad_prefixes.shape
        core_size = core_acts.shape[1]
        grad_blocks = torch.empty_like(grad_prefixes)  # reverse running sum over the prefixes
        grad_blocks[-1] = grad_prefixes[-1]
        for block in range(num_blocks - 2, -1, -1):
            torch.add(grad_prefixes[block], grad_blocks[block + 1], out=grad_blocks[block])
        grad_bags = grad_blocks.view(num_blocks * num_tokens, d)
        grad_values = grad_W_dec = grad_b_dec = None
        if ctx.needs_input_grad[0]:
            grad_values = torch.empty_like(values)
            grad_values[rest] = sampled_row_dots(grad_bags, bags, W_dec, cols[rest]).to(values.dtype)
            if core_size:
                grad_values[core] = (grad_blocks[0] @ W_dec[:core_size].T)[rows[core], cols[core]].to(values.dtype)
        if ctx.needs_input_grad[1]:
            grad_W_dec = gather_rows_weighted(bags, cols[rest], values[rest], grad_bags, W_dec.shape[0])
            if core_size:
                torch.mm(core_acts.T, grad_blocks[0], out=grad_W_dec[:core_size])
        if ctx.needs_input_grad[2]:
            grad_b_dec = grad_blocks[0].sum(0)
        return grad_values, grad_W_dec, grad_b_dec, None, None, None, None, None, None


class _SparseEncoderValues(torch.autograd.Function):
    """Differentiable values of the kept entries of relu((x - b_dec) W_enc + b_enc).

    The values were already computed by the dense no-grad GEMM (from ``centered`` = x - b_dec);
    this function only routes the gradient through the kept entries, with g_j = sum_u g_uj:
    d W_enc[j] = sum_u g_uj (x_u - b_dec), d b_enc[j] = g_j, d x_u = sum_j g_uj W_enc[j] and
    d b_dec = -sum_u d x_u = -sum_j g_j W_enc[j]. The last one is a single [K] x [K, d] product,
    so the per-token d x is only gathered when the input itself needs a gradient. The frozen core
    rows receive no gradient; their share of d x is one dense [N, c] x [c, d] product (see
    ``_core_and_rest``).
    """

    @staticmethod
    def forward(ctx, normalized, b_dec, centered, encoder, b_enc, core_encoder, rows, cols, values):
        ctx.save_for_backward(centered, encoder, core_encoder, rows, cols)
        return values

    @staticmethod
    def backward(ctx, grad_values):
        centered, encoder, core_encoder, rows, cols = ctx.saved_tensors
        core_size = core_encoder.shape[0]
        core, rest = _core_and_rest(cols, core_size)
        noncore_cols, noncore_grads = cols[rest] - core_size, grad_values[rest]
        needs_input, needs_b_dec, needs_encoder, needs_b_enc = (ctx.needs_input_grad[i] for i in (0, 1, 3, 4))
        grad_input = grad_b_dec = grad_encoder = grad_b_enc = None
        if needs_input:
            num_tokens = centered.shape[0]
            # Entries keep their token order, so the bags (tokens) are already sorted.
            grad_input = gather_rows_weighted(noncore_cols, rows[rest], noncore_grads, encoder, num_tokens, bags_sorted=True)
            if core_size:
                grad_core = _scatter_dense(rows[core], cols[core], grad_values[core].to(encoder.dtype), (num_tokens, core_size))
                grad_input.addmm_(grad_core, core_encoder)
            grad_b_dec = -grad_input.sum(0) if needs_b_dec else None
        if needs_b_enc or needs_b_dec:
            per_latent = grad_values.new_zeros(core_size + encoder.shape[0]).index_add_(0, cols, grad_values)
            grad_b_enc = per_latent if needs_b_enc else None
            if needs_b_dec and grad_b_dec is None:
                per_latent = per_latent.to(encoder.dtype)
                grad_b_dec = -(per_latent[core_size:] @ encoder + per_latent[:core_size] @ core_encoder)
        if needs_encoder:
            grad_encoder = gather_rows_weighted(rows[rest], noncore_cols, noncore_grads, centered, encoder.shape[0])
        return grad_input, grad_b_dec, None, grad_encoder, grad_b_enc, None, None, None, None



def matryoshka_prefix_losses(prefixes: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[L+1] mean over tokens of ||x - x^_m||^2 for each prefix m (the terms of Eq. 5's sum)."""
    return F.mse_loss(prefixes, x.expand_as(prefixes), reduction="none").sum(-1).mean(-1)


@torch.no_grad()
def relu_preactivations(centered: torch.Tensor, core_encoder: torch.Tensor, encoder: torch.Tensor, b_enc: torch.Tensor) -> torch.Tensor:
    """f(x) = ReLU(centered W_enc + b_enc) as a dense no-grad [N, c + n] (Eq. 1): the encoder GEMM,
    for the c frozen ``core_encoder`` rows and the n trainable ``encoder`` rows (of the whole SAE,
    or of one latent-parallel shard).

    The core and non-core rows are multiplied into their column ranges of one output, so the
    encoder is never concatenated (a copy as large as the weights, every step)."""
    c = core_encoder.shape[0]
    relu_pre = centered.new_empty(centered.shape[0], c + encoder.shape[0])
    if c:
        torch.addmm(b_enc[:c], centered, core_encoder.T, out=relu_pre[:, :c])
    torch.addmm(b_enc[c:], centered, encoder.T, out=relu_pre[:, c:])
    return relu_pre.relu_()


def largest_positive(relu_pre: torch.Tensor, unmasked_columns: int, budget: int) -> torch.Tensor:
    """The ``budget`` largest positive entries of ``relu_pre`` outside its first ``unmasked_columns``
    columns (those BatchTopK competes over; fewer when fewer are positive): the candidates
    :func:`calibrated_threshold` reads the inference threshold off."""
    positive = relu_pre[:, unmasked_columns:]
    positive = positive[positive > 0]
    return positive.topk(min(budget, positive.numel()), sorted=False).values


def normalized_aux_error(
    residual: torch.Tensor, aux_reconstruction: torch.Tensor, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """AuxK's loss: the dead latents' squared error on the residual over the residual's variance
    (dictionary_learning / OpenAI; over the batches of every process of ``group``), 0 where the
    residual has none."""
    error = (residual - aux_reconstruction).pow(2).sum(-1).mean()
    return (error / batch_variance(residual, group)).nan_to_num(0.0)


def batch_process_group(global_batch: bool) -> dist.ProcessGroup | None:
    """The process group whose batches form one global batch: the default group when
    ``global_batch`` and more than one process runs, else None (this process's batch alone)."""
    if global_batch and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def _all_reduce(tensor: torch.Tensor, group: dist.ProcessGroup | None, op=None) -> torch.Tensor:
    """``tensor`` reduced over ``group`` (SUM by default) in place; unchanged without a group."""
    if group is not None:
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM, group=group)
    return tensor


def _exclusive_prefix_over_ranks(count: int, like: torch.Tensor, group: dist.ProcessGroup | None) -> int:
    """Sum of ``count`` over the ranks before this one (0 without a group)."""
    if group is None:
        return 0
    counts = like.new_zeros(dist.get_world_size(group), dtype=torch.long)
    counts[dist.get_rank(group)] = count
    return int(_all_reduce(counts, group)[: dist.get_rank(group)].sum())


def kth_largest(values: torch.Tensor, rank: int, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Exactly the ``rank``-th largest (1-based) of the non-negative ``values`` of every process in
    ``group``, without gathering them: a radix select over the float32 bit patterns (monotone for
    non-negative floats), 8 bits per round, each round one all_reduce of a 256-bin histogram."""
    bits = values.float().view(torch.int32)
    prefix, remaining = 0, rank
    for shift in (24, 16, 8, 0):
        digits = (bits >> shift) & 255
        histogram = _all_reduce(torch.bincount(digits, minlength=256), group)
        from_top = histogram.flip(0).cumsum(0)
        position = int(torch.searchsorted(from_top, from_top.new_tensor(remaining)))
        digit = 255 - position
        remaining -= int(from_top[position] - histogram[digit])
        bits = bits[digits == digit]
        prefix |= digit << shift
    return torch.tensor(prefix, dtype=torch.int32).view(torch.float32).to(values.device)


# Size of the strided sample that estimates where BatchTopK's cut falls.
_BATCHTOPK_SAMPLE_SIZE = 2**18


def _entries_above(acts: torch.Tensor, bound: torch.Tensor | float, unmasked_columns: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the entries of ``acts`` [N, n] above ``bound``, or above 0 in the first
    ``unmasked_columns`` columns; ``nonzero`` returns them sorted by row, then column."""
    column_bounds = acts.new_full((acts.shape[1],), float(bound))
    column_bounds[:unmasked_columns] = 0
    return (acts > column_bounds).nonzero(as_tuple=True)


def _sampled_rank_value(acts: torch.Tensor, rank: int, slack: float) -> torch.Tensor:
    """A value that about ``slack * rank`` entries of ``acts`` [N, n] exceed, read off a strided grid
    sample of ~2^18 entries (0 once that rank covers the whole sample)."""
    if not acts.numel():  # a latent shard holding only core columns: it bounds nothing
        return acts.new_tensor(float("inf"))
    stride = max(1, math.isqrt(acts.numel() // _BATCHTOPK_SAMPLE_SIZE))
    sample = acts[::stride, ::stride].flatten()
    expected = rank * sample.numel() / acts.numel()
    sample_rank = math.ceil(slack * expected + 4 * math.sqrt(expected))
    if sample_rank >= sample.numel():
        return acts.new_zeros(())
    return sample.topk(sample_rank, sorted=False).values.min()


def _candidates(relu_acts: torch.Tensor, estimate: int, budget: int, unmasked_columns: int, group: dist.ProcessGroup | None):
    """(rows, cols, candidates, global candidate count): the entries above a bound every process
    agrees on (the smallest of their sampled bounds, each process sampling for the ``estimate``
    entries it expects to keep), and which of them lie in the masked columns. The bound is lowered
    until the candidates of all processes cover the ``budget`` kept over all of them, so every
    entry BatchTopK keeps anywhere is a candidate; the test is global, so every process leaves the
    loop together."""
    masked = relu_acts[:, unmasked_columns:]
    slack = 1.25
    while True:
        bound = _all_reduce(_sampled_rank_value(masked, estimate, slack).float().reshape(1), group, dist.ReduceOp.MIN)[0]
        rows, cols = _entries_above(relu_acts, bound, unmasked_columns)
        candidates = (cols >= unmasked_columns).nonzero().squeeze(1)
        total = int(_all_reduce(torch.tensor([candidates.numel()], device=relu_acts.device), group)[0])
        if total >= budget or bound == 0:
            return rows, cols, candidates, total
        slack *= 4


def _budget_and_estimate(
    relu_acts: torch.Tensor, k_per_token: int, unmasked_columns: int, group: dist.ProcessGroup | None, shards_latents: bool
) -> tuple[int, int]:
    """(entries BatchTopK keeps over every process, the share of them this process expects). With
    the tokens split over the processes each keeps k of its own tokens' worth on average; with the
    latents split, the k N entries of the one shared batch are expected in proportion to each
    process's masked columns."""
    num_tokens, masked = relu_acts.shape[0], relu_acts.shape[1] - unmasked_columns
    if not shards_latents:
        local = k_per_token * num_tokens
        return int(_all_reduce(torch.tensor([local], device=relu_acts.device), group)[0]), local
    budget = k_per_token * num_tokens
    all_masked = int(_all_reduce(torch.tensor([masked], device=relu_acts.device), group)[0])
    return budget, math.ceil(budget * masked / max(all_masked, 1))


def batch_topk_entries(
    relu_acts: torch.Tensor,
    k_per_token: int,
    unmasked_columns: int = 0,
    group: dist.ProcessGroup | None = None,
    shards_latents: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BatchTopK on non-negative ``relu_acts`` [N, n]: the k * N largest positive entries of the
    flattened batch over columns ``unmasked_columns:``, plus every positive entry of the first
    ``unmasked_columns`` columns (the dense core, Eq. 3).

    With a process ``group`` the entries are those of every process: the same entries are kept as
    if one process held them all. Each process holds other tokens (the batch is the concatenation
    of the processes' batches in rank order, N their total) or, with ``shards_latents``, other
    latents of the same N tokens (its columns a slice of the K; ``unmasked_columns`` counts its own
    core columns). Ties at the cut are kept in (rank, row, column) order, so the result is
    deterministic.

    Returns rows, cols (sorted by row, then col) and the smallest value BatchTopK kept (the same on
    every process). torch's CPU topk over all N * n entries is one single-threaded partial sort,
    the slowest op of a training step, and a gather of every process's [N, n] activations would
    dwarf the step. Instead: a lower bound on the cut from a sample (agreed by an all_reduce MIN),
    one vectorised pass for the candidates above it, and an exact radix select of the cut among the
    candidates (``kth_largest``: four all_reduces of 256 counts).
    """
    num_kept, estimate = _budget_and_estimate(relu_acts, k_per_token, unmasked_columns, group, shards_latents)
    rows, cols, candidates, num_candidates = _candidates(relu_acts, estimate, num_kept, unmasked_columns, group)
    values = relu_acts[rows[candidates], cols[candidates]].float()
    if num_candidates <= num_kept:  # fewer positive entries than the budget: keep them all
        smallest = values.min() if values.numel() else values.new_tensor(float("inf"))
        smallest = _all_reduce(smallest.reshape(1), group, dist.ReduceOp.MIN)[0]
        return rows, cols, smallest if num_candidates else values.new_zeros(())
    cut = kth_largest(values, num_kept, group)
    ties = (values == cut).nonzero().squeeze(1)
    above_everywhere = int(_all_reduce((values > cut).sum().reshape(1), group)[0])
    ties_before = _exclusive_prefix_over_ranks(ties.numel(), values, group)
    ties_kept = min(max(num_kept - above_everywhere - ties_before, 0), ties.numel())
    dropped = torch.cat([(values < cut).nonzero().squeeze(1), ties[ties_kept:]])
    keep = torch.ones_like(rows, dtype=torch.bool).index_fill_(0, candidates[dropped], False)
    return rows[keep], cols[keep], cut.to(relu_acts.dtype)


def calibrated_threshold(
    candidates: torch.Tensor, num_tokens: int, k_per_token: int, group: dist.ProcessGroup | None = None
) -> float:
    """The inference threshold theta for which "keep entries > theta", applied one token at a time,
    keeps what BatchTopK over all ``num_tokens`` calibration tokens at once keeps: the
    (k N + 1)-th largest candidate of every process in ``group`` (:func:`kth_largest`, no gather),
    or 0, i.e. ReLU, when no more than k N entries are positive. ``candidates`` must hold at least
    each process's k N + 1 largest positive entries (:meth:`DMSAEModel.threshold_candidates`)."""
    candidates = candidates[candidates > 0].float()
    budget = k_per_token * num_tokens
    if int(_all_reduce(candidates.new_tensor(candidates.numel()), group)) <= budget:
        return 0.0
    return float(kth_largest(candidates, budget + 1, group))


def batch_variance(rows: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Mean squared distance of the rows [N, d] of every process of ``group`` to their mean."""
    sums = _all_reduce(torch.cat([rows.sum(0), rows.new_tensor([len(rows)])]), group)
    mean = sums[:-1] / sums[-1]
    squares = _all_reduce((rows - mean).pow(2).sum().reshape(1), group)[0]
    return squares / sums[-1]


def geometric_median(
    points: torch.Tensor, max_iter: int = 100, tol: float = 1e-5, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Weiszfeld iterations for the point minimising the summed distance to ``points`` [N, d] (the
    points of every process of ``group`` together: each iteration all-reduces d + 1 sums)."""
    points = points.float()

    def weighted_mean(weights: torch.Tensor) -> torch.Tensor:
        sums = _all_reduce(torch.cat([weights @ points, weights.sum().reshape(1)]), group)
        return sums[:-1] / sums[-1]

    guess = weighted_mean(points.new_ones(len(points)))
    for _ in range(max_iter):
        previous = guess
        guess = weighted_mean(1 / torch.linalg.vector_norm(points - guess, dim=1).clamp_min(1e-12))
        if torch.linalg.vector_norm(guess - previous) < tol:
            break
    return guess


# ----------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------


class _ComputeWeights(NamedTuple):
    """The weights the encoder GEMM and the decode multiply with: the parameters themselves, or
    copies of them in a lower compute dtype made once per forward, through which the gradients flow
    back to the fp32 masters (autograd casts them on the way)."""

    core_encoder: torch.Tensor
    encoder: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor


class DMSAEPreTrainedModel(PreTrainedModel):
    config_class = DMSAEConfig
    base_model_prefix = "dmsae"
    main_input_name = "activations"
    _supports_sdpa = False

    def _init_weights(self, module: nn.Module) -> None:
        """Random unit-norm decoder rows; encoder rows = decoder rows (W_enc = W_dec^T);
        zero biases. Tensors already loaded from a checkpoint are left alone."""
        if not isinstance(module, DMSAEModel):
            return
        targets = (module.W_dec, module.encoder, module.core_encoder)
        if all(getattr(t, "_is_hf_initialized", False) for t in targets):
            return
        directions = F.normalize(torch.randn(module.W_dec.shape, device=module.W_dec.device), dim=-1)
        c = module.config.core_size
        _initialize(module.W_dec, directions)
        _initialize(module.core_encoder, directions[:c])
        _initialize(module.encoder, directions[c:])
        _initialize(module.b_enc, 0.0)
        _initialize(module.b_dec, 0.0)


@torch.no_grad()
def _initialize(tensor: torch.Tensor, value: torch.Tensor | float) -> None:
    """tensor <- value, unless from_pretrained has loaded it already (transformers 5 marks such
    tensors; transformers 4 loads the checkpoint after initialising). Plain torch rather than
    ``transformers.initialization``, which transformers 4 does not have."""
    if getattr(tensor, "_is_hf_initialized", False):
        return
    if isinstance(value, torch.Tensor):
        tensor.copy_(value)
    else:
        tensor.fill_(value)


class DMSAEModel(DMSAEPreTrainedModel):
    """Matryoshka BatchTopK sparse autoencoder with a frozen core (dense- or sparse-core).

    Weights (SAEBench shapes): ``W_enc`` [d, K] (a view built from the frozen ``core_encoder``
    [c, d] buffer and the trainable ``encoder`` [K-c, d] rows), ``b_enc`` [K], ``W_dec`` [K, d]
    with unit-norm rows, ``b_dec`` [d].

    ``compute_dtype`` (runtime only, not saved in the config; None: the parameters' own dtype): the
    dtype of the training-mode forward's encoder GEMM and decode. bfloat16 multiplies bf16 copies of
    the weights, made once per forward, while the parameters, their gradients, the optimizer state
    and the loss stay fp32; every other path (``encode``, eval mode, threshold calibration) computes
    with the stored weights.
    """

    compute_dtype: torch.dtype | None = None

    def __init__(self, config: DMSAEConfig):
        super().__init__(config)
        d, K, c = config.d_in, config.num_latents, config.core_size
        # Frozen core rows: a buffer, so no gradient, optimizer moment or weight decay can reach it.
        self.register_buffer("core_encoder", torch.empty(c, d))
        self.encoder = nn.Parameter(torch.empty(K - c, d))
        self.b_enc = nn.Parameter(torch.empty(K))
        self.W_dec = nn.Parameter(torch.empty(K, d))
        self.b_dec = nn.Parameter(torch.empty(d))
        self.post_init()

    # ---- SAEBench-facing views -----------------------------------------------------------

    @property
    def encoder_weight(self) -> torch.Tensor:
        """[K, d] encoder rows, core first (the paper's W_enc[j, :])."""
        if self.config.core_size == 0:  # no copy of the whole encoder when there is no core
            return self.encoder
        return torch.cat([self.core_encoder, self.encoder], dim=0)

    @property
    def W_enc(self) -> torch.Tensor:
        """[d, K] as SAEBench and dictionary_learning lay it out."""
        return self.encoder_weight.T

    def _compute_weights(self, dtype: torch.dtype | None = None) -> _ComputeWeights:
        """The GEMM and decode weights in ``dtype`` (default: the parameters themselves, no copy)."""
        dtype = dtype or self.W_dec.dtype
        return _ComputeWeights(*(t.to(dtype) for t in (self.core_encoder, self.encoder, self.b_enc, self.W_dec)))

    def _block_of_latent(self) -> torch.Tensor:
        """Index of the loss prefix each latent first enters: the core and group 0 -> 0, group i -> i."""
        sizes = torch.tensor([self.config.core_size + self.config.group_sizes[0], *self.config.group_sizes[1:]])
        return torch.repeat_interleave(torch.arange(len(sizes)), sizes).to(self.W_dec.device)

    # ---- Encode --------------------------------------------------------------------------

    def normalize_activations(self, activations: torch.Tensor) -> torch.Tensor:
        """[..., d] raw activations -> [N, d] in the units the SAE works in (divided by the factor)."""
        return activations.reshape(-1, self.config.d_in).to(self.W_dec.dtype) / self.config.normalization_factor

    def _select(
        self, relu_pre: torch.Tensor, use_threshold: bool, group: dist.ProcessGroup | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The masks of Eq. 3: which (token, latent) entries of f(x) survive; BatchTopK over the
        batches of every process of ``group``.

        Returns rows, cols (sorted by row, then col) and the smallest value BatchTopK kept.
        """
        config = self.config
        unmasked_columns = self._unmasked_columns()
        if not use_threshold:
            return batch_topk_entries(relu_pre, config.k_noncore, unmasked_columns, group)
        if config.threshold < 0:
            raise ValueError(
                "this DMSAE has no inference threshold yet (config.threshold < 0): calibrate it "
                "(trainer.sae.training.SAETrainer.calibrate_threshold), or encode with use_threshold=False "
                "(BatchTopK over the batch)"
            )
        rows, cols = _entries_above(relu_pre, config.threshold, unmasked_columns)
        return rows, cols, relu_pre.new_tensor(config.threshold)

    def _unmasked_columns(self) -> int:
        """Latents 0..n-1 that BatchTopK leaves alone (ReLU only): the dense core; none for a sparse core."""
        return self.config.core_size if self.config.variant == "dense_core" else 0

    @torch.no_grad()
    def threshold_candidates(self, activations: torch.Tensor, budget: int) -> torch.Tensor:
        """The ``budget`` largest entries BatchTopK competes over in raw activations [N, d] (the
        non-core latents of a dense core, every latent of a sparse core; Eq. 3), fewer when fewer are
        positive: what :func:`calibrated_threshold` reads the inference threshold off."""
        relu_pre = self._relu_preactivations(self._centered(self.normalize_activations(activations)))
        return largest_positive(relu_pre, self._unmasked_columns(), budget)

    def encode_sparse(
        self,
        normalized: torch.Tensor,
        use_threshold: bool,
        group: dist.ProcessGroup | None = None,
        weights: _ComputeWeights | None = None,
    ) -> tuple[SparseLatents, torch.Tensor, torch.Tensor]:
        """f~(x) for normalised inputs [N, d] as sparse entries (BatchTopK over ``group``'s batches),
        the GEMM multiplying ``weights`` (default: the parameters).

        Returns (latents, dense no-grad ReLU pre-activations [N, K] in the weights' dtype, smallest
        BatchTopK value). Gradients reach ``encoder``, ``b_enc`` and ``b_dec`` through the kept
        entries only.
        """
        weights = self._compute_weights() if weights is None else weights
        centered = self._centered(normalized, weights)
        relu_pre = self._relu_preactivations(centered, weights)
        # BatchTopK selects on the pre-activations in the GEMM's dtype, bf16 included, without an
        # upcast: widening adds no information (the cut is found on the exactly widened values'
        # float32 bits, see kth_largest) and an fp32 copy of [N, K] would cost what bf16 saves. Ties
        # at the cut are more frequent in bf16; they are kept in (row, column) order, deterministic.
        rows, cols, smallest_kept = self._select(relu_pre, use_threshold, group)
        values = self._sparse_values(normalized, centered, relu_pre, rows, cols, weights)
        return SparseLatents(rows, cols, values), relu_pre, smallest_kept

    def _centered(self, normalized: torch.Tensor, weights: _ComputeWeights | None = None) -> torch.Tensor:
        """x - b_dec, detached, in the dtype of ``weights`` (default: the parameters): the encoder's
        input (its gradient flows through _SparseEncoderValues). Subtracted at the masters'
        precision, then rounded once."""
        centered = normalized.detach() - self.b_dec.detach()
        return centered if weights is None else centered.to(weights.encoder.dtype)

    def _relu_preactivations(self, centered: torch.Tensor, weights: _ComputeWeights | None = None) -> torch.Tensor:
        """f(x) (Eq. 1) from ``weights`` (default: the parameters)."""
        weights = self._compute_weights() if weights is None else weights
        return relu_preactivations(centered, weights.core_encoder, weights.encoder, weights.b_enc)

    def _sparse_values(self, normalized, centered, relu_pre, rows, cols, weights: _ComputeWeights | None = None) -> torch.Tensor:
        """The kept entries' values, differentiable through the kept entries only. They are widened
        (exactly) to the masters' dtype, so their gradients, summed per latent into b_enc's, add up
        in fp32; b_dec and b_enc are passed as the masters, which only receive gradients here."""
        weights = self._compute_weights() if weights is None else weights
        return _SparseEncoderValues.apply(
            normalized, self.b_dec, centered,
            weights.encoder, self.b_enc, weights.core_encoder, rows, cols, relu_pre[rows, cols].to(self.b_enc.dtype),
        )

    def encode(self, activations: torch.Tensor, use_threshold: bool | None = None) -> torch.Tensor:
        """Dense latent activations f~(x), shaped [..., K]. Inference mode (``model.eval()``) uses
        the estimated threshold and encodes single tokens; training mode uses BatchTopK."""
        use_threshold = (not self.training) if use_threshold is None else use_threshold
        normalized = self.normalize_activations(activations)
        latents = self.encode_sparse(normalized, use_threshold)[0]
        dense = latents.to_dense(normalized.shape[0], self.config.num_latents)
        return dense.reshape(*activations.shape[:-1], self.config.num_latents)

    # ---- Decode --------------------------------------------------------------------------

    def decode_prefixes(
        self, latents: SparseLatents, num_tokens: int, weights: _ComputeWeights | None = None
    ) -> torch.Tensor:
        """[L+1, N, d] normalised reconstructions x^_{m_0}, ..., x^_{m_L} (core always included), in
        the dtype of ``weights``' decoder (default: the parameters).

        One gather of the active decoder rows, binned by (prefix block, token), then a cumulative
        sum over blocks: each group's contribution is added once, never re-decoded per prefix
        (``_SparseDecodePrefixes``, which also decodes the core columns as one dense product).
        """
        blocks = self._block_of_latent()[latents.cols]
        W_dec = self.W_dec if weights is None else weights.W_dec
        return _SparseDecodePrefixes.apply(
            latents.values, W_dec, self.b_dec, latents.rows, latents.cols, blocks,
            self.config.core_size, len(self.config.group_sizes), num_tokens,
        )

    def decode(self, latents: torch.Tensor, num_groups: int | None = None) -> torch.Tensor:
        """x^ from dense latents [..., K], using the core and the first ``num_groups`` non-core
        groups (default: all). Returns activations in the input's units."""
        width = self.config.prefix_sizes[-1 if num_groups is None else num_groups - 1]
        if num_groups is not None and not 1 <= num_groups <= len(self.config.group_sizes):
            raise ValueError(f"num_groups must be in [1, {len(self.config.group_sizes)}], got {num_groups}")
        normalized = latents[..., :width].to(self.W_dec.dtype) @ self.W_dec[:width] + self.b_dec
        return normalized * self.config.normalization_factor

    # ---- Losses --------------------------------------------------------------------------

    def auxk_loss(
        self,
        normalized: torch.Tensor,
        relu_pre: torch.Tensor,
        residual: torch.Tensor,
        dead_latents: torch.Tensor | None,
        group: dist.ProcessGroup | None = None,
        weights: _ComputeWeights | None = None,
    ) -> torch.Tensor:
        """AuxK: the top-``aux_k`` dead latents of each token reconstruct the (detached) residual,
        normalised by the residual's variance (dictionary_learning / OpenAI), taken over the
        batches of every process of ``group`` (so the processes' averaged losses are the loss of
        their concatenated batch); ``relu_pre`` comes from the GEMM with ``weights`` (default: the
        parameters)."""
        zero = residual.new_zeros(())
        if dead_latents is None or not bool(dead_latents.any()):
            return zero
        num_tokens = relu_pre.shape[0]
        dead = dead_latents.nonzero().squeeze(1)
        k_aux = min(self.config.aux_k, dead.numel())
        top = relu_pre.index_select(1, dead).topk(k_aux, dim=-1, sorted=False)  # only dead latents compete
        rows = torch.arange(num_tokens, device=relu_pre.device).repeat_interleave(k_aux)
        cols, values = dead[top.indices.flatten()], top.values.flatten()
        alive = values > 0
        rows, cols = rows[alive], cols[alive]
        weights = self._compute_weights() if weights is None else weights
        values = self._sparse_values(normalized, self._centered(normalized, weights), relu_pre, rows, cols, weights)
        aux_reconstruction = _SparseDecodePrefixes.apply(
            values, weights.W_dec, None, rows, cols, torch.zeros_like(cols), self.config.core_size, 1, num_tokens
        )[0]
        return normalized_aux_error(residual, aux_reconstruction, group)

    def forward(
        self,
        activations: torch.Tensor,
        dead_latents: torch.Tensor | None = None,
        use_threshold: bool | None = None,
        output_dense_latents: bool = True,
        return_dict: bool = True,
        global_batch: bool = False,
    ) -> DMSAEOutput | tuple:
        """Encode, decode every prefix and compute the loss of Eq. 5.

        Args:
            activations: [..., d] raw activations.
            dead_latents: [K] bool mask of latents AuxK should revive (tracked by the trainer).
            use_threshold: default: threshold in eval mode, BatchTopK in training mode.
            output_dense_latents: also return the dense [..., K] latents (skip when training).
            global_batch: under torch.distributed, BatchTopK and AuxK's variance take every
                process's batch as one (the trainer's setting: the result does not depend on the
                number of processes). Each process's loss stays a mean over its own tokens, so
                DDP's average of the gradients is the gradient of the global batch's loss.
        """
        use_threshold = (not self.training) if use_threshold is None else use_threshold
        group = batch_process_group(global_batch)
        x = self.normalize_activations(activations)
        num_tokens, c = x.shape[0], self.config.core_size
        weights = self._compute_weights(self.compute_dtype if self.training else None)
        latents, relu_pre, smallest_kept = self.encode_sparse(x, use_threshold, group, weights)
        prefixes = self.decode_prefixes(latents, num_tokens, weights).to(x.dtype)  # the loss in the masters' fp32
        prefix_losses = matryoshka_prefix_losses(prefixes, x)
        reconstruction_loss = prefix_losses.sum()
        aux_loss = self.auxk_loss(x, relu_pre, (x - prefixes[-1]).detach(), dead_latents, group, weights)
        core_entries = (latents.cols < c).sum()
        output = DMSAEOutput(
            loss=reconstruction_loss + self.config.aux_alpha * aux_loss,
            reconstruction_loss=reconstruction_loss,
            prefix_losses=prefix_losses,
            aux_loss=aux_loss,
            reconstruction=(prefixes[-1] * self.config.normalization_factor).reshape(activations.shape),
            latents=(
                latents.to_dense(num_tokens, self.config.num_latents).reshape(*activations.shape[:-1], -1)
                if output_dense_latents
                else None
            ),
            sparse_latents=latents,
            l0_core=core_entries / num_tokens,
            l0_noncore=(latents.cols.numel() - core_entries) / num_tokens,
            l0=torch.tensor(latents.cols.numel() / num_tokens),
            fired=torch.zeros(self.config.num_latents, dtype=torch.bool, device=x.device).index_fill_(0, latents.cols, True),
            batchtopk_threshold=smallest_kept,
        )
        return output if return_dict else output.to_tuple()

    # ---- Inside the base model ------------------------------------------------------------

    def latents_from_text(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        use_threshold: bool = True,
        sparse: bool = False,
    ) -> TextLatents:
        """The SAE latents of tokenised text: one forward of the causal LM ``model`` up to
        ``config.hook_module`` (the layers after it are not run), its output encoded at the
        positions the SAE was trained on, zeros at padding, BOS and massive-norm positions.

            inputs = tokenizer(["The cat sat."], return_tensors="pt")
            out = sae.latents_from_text(model, inputs.input_ids, inputs.attention_mask)
            values, latents = out.top(5)  # [B, T, 5] each

        ``use_threshold``: encode every position alone with the calibrated threshold (False: BatchTopK
        over the batch's kept positions). ``sparse``: return the latents as a sparse COO tensor,
        only the active entries (a dense [B, T, K] is 256 KiB a token at K = 65,536).
        :func:`~.interventions.latents_from_text` says which median the massive-norm rule uses.
        """
        from .interventions import latents_from_text  # interventions import this file: the arrow points one way

        return latents_from_text(self, model, input_ids, attention_mask, use_threshold=use_threshold, sparse=sparse)

    def splice(self, model: nn.Module, **options) -> ContextManager:
        """Context manager yielding an :class:`~.interventions.SAESplice`: this SAE spliced into the
        causal LM ``model`` at ``config.hook_module``, optionally with the error term and edits on
        the latents (ablate, clamp, scale, steer); :func:`~.interventions.splice_sae` documents the
        options and the positions left untouched.

            with sae.splice(model, error_term=True, steer={42: 8.0}):
                model.generate(**inputs)
        """
        from .interventions import splice_sae

        return splice_sae(self, model, **options)

    def logit_effect(self, base_model: nn.Module, latents: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """[n, vocab] direct effect of ``latents``' decoder directions on ``base_model``'s logits
        (:func:`~.interventions.logit_effect`)."""
        from .interventions import logit_effect

        return logit_effect(self, base_model, latents)

    # ---- Training hygiene ----------------------------------------------------------------

    @torch.no_grad()
    def initialize_decoder_bias_(self, activations: torch.Tensor, global_batch: bool = False) -> None:
        """b_dec <- geometric median of a batch (normalised units); with ``global_batch``, of every
        process's batch together (the same b_dec on every process)."""
        median = geometric_median(self.normalize_activations(activations), group=batch_process_group(global_batch))
        self.b_dec.copy_(median.to(self.b_dec.dtype))

    @torch.no_grad()
    def remove_decoder_parallel_gradient_(self, rows_per_block: int = 2048) -> None:
        """Project out of W_dec's gradient the component along each decoder row, so the step
        moves directions, not norms:  g_j <- g_j - (g_j . w_j / |w_j|^2) w_j.

        Row blocks keep the temporaries cache-sized; the whole-matrix expression allocates two
        [K, d] temporaries, which cost more than the projection itself."""
        if self.W_dec.grad is None:
            return
        for grad, rows in zip(self.W_dec.grad.split(rows_per_block), self.W_dec.detach().split(rows_per_block)):
            parallel = torch.linalg.vecdot(grad, rows) / torch.linalg.vecdot(rows, rows).clamp_min(1e-24)
            grad.addcmul_(rows, parallel.unsqueeze(-1), value=-1)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale every decoder row to unit norm."""
        self.W_dec.div_(torch.linalg.vector_norm(self.W_dec, dim=-1, keepdim=True).clamp_min(1e-12))

    # ---- Cycles and lineage --------------------------------------------------------------

    def lineage(self) -> torch.Tensor:
        """[K, 2] (origin cycle, origin index) of every latent; non-core latents originate here."""
        fresh = torch.stack(
            [
                torch.full((self.config.num_latents,), self.config.cycle),
                torch.arange(self.config.num_latents),
            ],
            dim=1,
        )
        core = torch.tensor(self.config.core_lineage, dtype=torch.long).reshape(-1, 2)
        return torch.cat([core, fresh[self.config.core_size :]])

    @classmethod
    def from_core(cls, config: DMSAEConfig, core_directions: torch.Tensor) -> "DMSAEModel":
        """A freshly initialised model whose frozen core rows are ``core_directions`` [c, d]
        (Algorithm 1 line 5, Algorithm 3 line 2); everything else is reinitialised."""
        if tuple(core_directions.shape) != (config.core_size, config.d_in):
            raise ValueError(
                f"core directions have shape {tuple(core_directions.shape)}, the config needs "
                f"[core_size, d_in] = [{config.core_size}, {config.d_in}]"
            )
        model = cls(config)
        with torch.no_grad():
            model.core_encoder.copy_(core_directions)
        return model.to(core_directions.device)

    def next_cycle(self, selected: Sequence[int], **overrides) -> "DMSAEModel":
        """Cycle t+1 from this cycle-t model and its ordered selected latents: their encoder rows
        become the frozen core (rows 0..c-1); all b_enc, the whole decoder, b_dec and the
        non-core encoder rows are reinitialised."""
        selected = torch.as_tensor(list(selected), dtype=torch.long)
        if selected.numel() and (selected.min() < 0 or selected.max() >= self.config.num_latents):
            raise ValueError(f"selected latents must lie in [0, {self.config.num_latents}), got {selected.tolist()}")
        if selected.unique().numel() != selected.numel():
            raise ValueError("selected latents contain duplicates")
        lineage = self.lineage()[selected].tolist()
        config = self.config.with_core(lineage, cycle=self.config.cycle + 1, **overrides)
        return DMSAEModel.from_core(config, self.encoder_weight.detach()[selected.to(self.W_dec.device)].clone())

