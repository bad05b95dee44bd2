"""BatchTopK's exact cut: the radix select against a sort, the deterministic tie rule, and the
selection against ``flat.topk`` (the multi-process case is tests/test_ddp.py's)."""

from __future__ import annotations

import pytest
import torch

from modeling_dmsae.modeling_dmsae import batch_topk_entries, kth_largest


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kth_largest_is_the_sorted_value(dtype):
    values = torch.rand(5000, generator=torch.Generator().manual_seed(0)).to(dtype) * 10
    ordered = values.float().sort(descending=True).values
    for rank in (1, 2, 17, 2500, 4999, 5000):
        assert kth_largest(values, rank).item() == ordered[rank - 1].item()


def test_batch_topk_matches_flat_topk_and_breaks_ties_in_row_order():
    acts = torch.rand(64, 200, generator=torch.Generator().manual_seed(1)).relu()
    k = 5
    rows, cols, smallest = batch_topk_entries(acts, k)
    expected = acts.flatten().topk(k * 64).indices.sort().values
    assert torch.equal(rows * 200 + cols, expected)
    assert smallest.item() == acts.flatten().topk(k * 64).values.min().item()
    # Ties at the cut: the first ones in (row, column) order are kept.
    tied = torch.zeros(8, 10)
    tied[:, 3] = 1.0
    tied[2, 5] = 2.0
    rows, cols, smallest = batch_topk_entries(tied, 1)  # 8 kept: the 2.0 and the first seven 1.0s
    assert smallest.item() == 1.0
    assert list(zip(rows.tolist(), cols.tolist())) == sorted([(r, 3) for r in range(7)] + [(2, 5)])
