"""Mask selection and LLM-Barber's swap on hand-made tensors with known answers."""

from __future__ import annotations

import pytest
import torch

from hf_pruning.config import ConfigError
from hf_pruning.methods.masks.selection import (
    lowest_per_row,
    nm_mask,
    parse_pattern,
    rebuild_masks,
    rebuild_nm,
    rebuild_nm_pairs,
    rebuild_rows,
    unstructured_mask,
)
from hf_pruning.methods.sparsegpt.scoring import inverse_hessian_factor, sparsegpt_solve_

T, F = True, False


def test_lowest_per_row_counts_are_exact_with_ties():
    score = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 1.0, 2.0, 1.0]])
    mask = lowest_per_row(score, 2)
    assert mask.sum(1).tolist() == [2, 2]
    assert mask.tolist() == [[T, T, F, F], [F, T, F, T]]  # ties broken by position


def test_already_zero_weights_count_first():
    score = torch.tensor([[0.1, 5.0, 0.2, 9.0]])
    zero = torch.tensor([[F, T, F, F]])
    assert unstructured_mask(score, 0.5, per_row=True, already_zero=zero).tolist() == [[T, T, F, F]]
    assert unstructured_mask(score, 0.25, per_row=True, already_zero=zero).tolist() == [[F, T, F, F]]


def test_matrix_vs_row_selection():
    score = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert unstructured_mask(score, 0.5, per_row=False).tolist() == [[T, T], [F, F]]
    assert unstructured_mask(score, 0.5, per_row=True).tolist() == [[T, F], [T, F]]


def test_nm_groups():
    score = torch.tensor([[4.0, 3.0, 2.0, 1.0, 1.0, 2.0, 3.0, 4.0]])
    assert nm_mask(score, 2, 4).tolist() == [[F, F, T, T, T, T, F, F]]
    with pytest.raises(ConfigError, match="multiple of 4"):
        nm_mask(torch.ones(2, 6), 2, 4)
    assert parse_pattern("2:4") == (2, 4) and parse_pattern("unstructured") is None
    for bad in ("4:4", "5:4", "0:4", "2-4", "half"):
        with pytest.raises(ConfigError):
            parse_pattern(bad)


def test_swap_known_answer():
    score = torch.tensor([[5.0, 1.0, 4.0, 2.0]])
    pruned = torch.tensor([[T, F, F, T]])
    # grow candidates (desc): 5 (idx0), 2 (idx3); keep candidates (asc): 1 (idx1), 4 (idx2)
    # pairs: 5 > 1 yes, 2 > 4 no -> r = 1
    assert rebuild_rows(score, pruned, 1.0).tolist() == [[F, T, F, T]]  # k = 1: swap idx0 <-> idx1
    assert rebuild_rows(score, pruned, 0.5).tolist() == pruned.tolist()  # k = int(0.5) = 0


def test_swap_count_is_a_fraction_of_beneficial_swaps():
    score = torch.arange(10.0).flip(0)[None]  # [9, 8, ..., 0]: the first five are the best
    pruned = torch.tensor([[T] * 5 + [F] * 5])  # the best five are pruned: r = 5
    assert (rebuild_rows(score, pruned, 1.0) == ~pruned).all()
    out = rebuild_rows(score, pruned, 0.4)  # k = 2: regrow 9, 8; prune 0, 1 (scores)
    assert out.tolist() == [[F, F, T, T, T, F, F, F, T, T]]


@pytest.mark.parametrize("descending", [False, True])
def test_stable_order_is_a_stable_sort(descending):
    """The int64-key sort orders exactly as a stable float sort: ties (many), negatives, -0.0 == +0.0, +-inf."""
    from hf_pruning.methods.masks.selection import stable_order

    g = torch.Generator().manual_seed(3)
    values = torch.tensor([0.0, -0.0, 1.5, -1.5, float("inf"), float("-inf"), 2.0**-140, -(2.0**-140), 3e38, -3e38])
    score = values[torch.randint(0, len(values), (5, 7, 300), generator=g)]
    score[0] = torch.randn(7, 300, generator=g)  # and distinct values
    expected = torch.sort(score, dim=-1, stable=True, descending=descending).indices
    assert torch.equal(stable_order(score, descending=descending), expected)


@pytest.mark.parametrize("threshold", [0.0, 0.1, 0.5, 1.0])
def test_one_row_swap_equals_the_row_wise_swap(threshold):
    """Granularities layer and block run one long row through a shortcut (sorted apart, written by index):
    it gives what the row-wise swap gives for the same row inside a batch, ties included."""
    g = torch.Generator().manual_seed(1)
    score = torch.randint(0, 7, (1, 4000), generator=g).float()  # many ties
    pruned = torch.rand(1, 4000, generator=g) < 0.6
    batched = rebuild_rows(score.expand(3, -1), pruned.expand(3, -1), threshold)  # 3 rows: the row-wise path
    one = rebuild_rows(score, pruned, threshold)
    assert all(torch.equal(one[0], row) for row in batched)
    assert int(one.sum()) == int(pruned.sum())
    assert threshold == 0.0 or not torch.equal(one, pruned)


def test_empty_groups_and_ties_change_nothing():
    score = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0], [3.0, 2.0, 1.0]])
    pruned = torch.tensor([[T, T, T], [T, F, F], [F, F, F]])
    assert torch.equal(rebuild_rows(score, pruned, 1.0), pruned)


def test_sparsity_is_preserved_per_group_for_every_granularity():
    g = torch.Generator().manual_seed(0)
    scores = [torch.rand(6, 8, generator=g), torch.rand(8, 6, generator=g)]
    pruned = [torch.rand(6, 8, generator=g) < 0.5, torch.rand(8, 6, generator=g) < 0.5]
    for gran, count in (("output1", lambda m: m.sum(1)), ("input1", lambda m: m.sum(0)),
                        ("layer", lambda m: m.sum()), ("block", None)):
        new = rebuild_masks(scores, pruned, 1.0, gran)
        assert any(not torch.equal(a, b) for a, b in zip(new, pruned)), gran  # something was swapped
        if count is None:
            assert sum(int(m.sum()) for m in new) == sum(int(m.sum()) for m in pruned)
        else:
            for a, b in zip(new, pruned):
                assert torch.equal(count(a), count(b)), gran
    with pytest.raises(ConfigError, match="output1"):
        rebuild_masks(scores, pruned, 0.1, "block", nm=(2, 4))


def test_nm_rebuild_keeps_the_pattern():
    g = torch.Generator().manual_seed(1)
    score = torch.rand(16, 32, generator=g)
    start = nm_mask(torch.rand(16, 32, generator=g), 2, 4)
    new = rebuild_nm(score, start, 1.0, 2, 4)
    assert not torch.equal(new, start)
    assert (new.reshape(16, 8, 4).sum(-1) == 2).all()


def test_sparsegpt_compensates_better_than_masking_alone():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 32, generator=g) @ torch.randn(32, 32, generator=g)  # correlated inputs [N, C]
    w = torch.randn(16, 32, generator=g)
    h = 2 * x.T @ x / x.shape[0]
    solved = w.clone()
    mask = sparsegpt_solve_(solved, h, 0.5, None, blocksize=8)
    assert int(mask.sum()) == w.numel() // 2 and torch.equal(solved == 0, mask)
    masked = w.masked_fill(mask, 0)
    err_solved = (x @ (w - solved).T).pow(2).mean()
    err_masked = (x @ (w - masked).T).pow(2).mean()
    assert err_solved < 0.7 * err_masked
    nm_solved = w.clone()
    nm = sparsegpt_solve_(nm_solved, h, 0.5, (2, 4), blocksize=8)
    assert (nm.reshape(16, 8, 4).sum(-1) == 2).all()


def test_fixed_mask_reconstruction_keeps_the_mask_and_lowers_the_error():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(256, 32, generator=g) @ torch.randn(32, 32, generator=g)  # [N, C]
    w = torch.randn(16, 32, generator=g)
    h = 2 * x.T @ x / x.shape[0]
    mask = torch.rand(16, 32, generator=g) < 0.5  # any mask, not one SparseGPT would choose
    solved = w.clone()
    returned = sparsegpt_solve_(solved, h, 0.5, None, blocksize=8, fixed_mask=mask)
    assert torch.equal(returned, mask) and torch.equal(solved == 0, mask)
    err_solved = (x @ (w - solved).T).pow(2).mean()
    err_masked = (x @ (w - w.masked_fill(mask, 0)).T).pow(2).mean()
    assert err_solved < 0.9 * err_masked  # 0.82 here: the update helps even for a random mask


def test_nm_pair_rule_only_swaps_where_the_group_gains():
    # one row, two groups of 4 (2:4). Group 0: kept 10, 9; pruned 8, 1. Group 1: kept 2, 7; pruned 6, 0.
    score = torch.tensor([[10.0, 9.0, 8.0, 1.0, 2.0, 7.0, 6.0, 0.0]])
    pruned = torch.tensor([[False, False, True, True, False, False, True, True]])
    # the official row rule regrows the best pruned weight (8) and drops its group's lowest kept one (9)
    row = rebuild_nm(score, pruned, 1.0, 2, 4)
    assert bool(row[0, 1]) and not bool(row[0, 2])
    # the pair rule: group 0 has no beneficial pair (8 < 9); group 1 swaps 6 in for 2 (gain 4)
    pairs = rebuild_nm_pairs(score, pruned, 1.0, 2, 4)
    assert pairs.tolist() == [[False, False, True, True, True, False, False, True]]
    assert torch.equal(rebuild_nm_pairs(score, pruned, 0.0, 2, 4), pruned)


def test_nm_pair_rule_takes_the_largest_gains_and_keeps_the_pattern():
    # three groups with gains 5, 3, 1 (one beneficial pair each); threshold 2/3 -> the two largest
    score = torch.tensor([[6.0, 1.0, 0.0, 9.0, 4.0, 1.0, 0.0, 9.0, 2.0, 1.0, 0.0, 9.0]])
    pruned = torch.tensor([[True, False, True, False] * 3])
    new = rebuild_nm_pairs(score, pruned, 2 / 3, 2, 4)
    assert new.tolist() == [[False, True, True, False, False, True, True, False, True, False, True, False]]
    g = torch.Generator().manual_seed(1)
    score = torch.rand(16, 32, generator=g)
    start = nm_mask(torch.rand(16, 32, generator=g), 2, 4)
    new = rebuild_nm_pairs(score, start, 1.0, 2, 4)
    assert not torch.equal(new, start)
    assert (new.reshape(16, 8, 4).sum(-1) == 2).all()
    # every changed group ends with a higher kept score than it started with
    kept_before = (score * ~start).reshape(16, 8, 4).sum(-1)
    kept_after = (score * ~new).reshape(16, 8, 4).sum(-1)
    changed = (new != start).reshape(16, 8, 4).any(-1)
    assert (kept_after[changed] > kept_before[changed]).all()
    assert torch.equal(kept_after[~changed], kept_before[~changed])


def test_fixed_mask_solve_does_not_depend_on_the_block_size():
    """With a fixed mask (LLM-Barber's reconstruct) SparseGPT's column blocks only split the work."""
    from hf_pruning.methods.sparsegpt.scoring import sparsegpt_solve_

    g = torch.Generator().manual_seed(4)
    x = torch.randn(256, 48, generator=g)
    hessian = x.T @ x / 256
    weight = torch.randn(20, 48, generator=g)
    mask = torch.rand(20, 48, generator=g) < 0.5
    results = []
    for blocksize in (4, 16, 48):
        w = weight.clone()
        sparsegpt_solve_(w, hessian, 0.5, None, blocksize, 0.01, fixed_mask=mask)
        results.append(w)
    assert (results[0][mask] == 0).all() and not torch.equal(results[0][~mask], weight[~mask])
    for w in results[1:]:
        torch.testing.assert_close(w, results[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fixed", [False, True])
def test_batched_block_solve_equals_the_column_loop(fixed, monkeypatch):
    """The GPU path (a block's columns in one batched triangular solve, when its mask is known up front) gives
    the column loop's result: same mask, same weights to float64 rounding. Forced onto the CPU here."""
    from hf_pruning.methods.sparsegpt import scoring

    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, 40, generator=g)
    hessian = x.T @ x / 300
    weight = torch.randn(24, 40, generator=g)
    fixed_mask = (torch.rand(24, 40, generator=g) < 0.5) if fixed else None
    loop = weight.clone()
    loop_mask = scoring.sparsegpt_solve_(loop, hessian, 0.5, None, 16, 0.01, fixed_mask=fixed_mask)
    monkeypatch.setattr(scoring, "BATCHED_BLOCK_DEVICES", {"cpu"})
    batched = weight.clone()
    batched_mask = scoring.sparsegpt_solve_(batched, hessian, 0.5, None, 16, 0.01, fixed_mask=fixed_mask)
    assert torch.equal(batched_mask, loop_mask)
    torch.testing.assert_close(batched, loop, rtol=1e-6, atol=1e-6)
    assert not torch.equal(batched[~batched_mask], weight[~batched_mask])  # the kept weights were updated


@pytest.mark.parametrize("width", [7, 256, 601])
def test_inverse_hessian_factor_is_the_upper_cholesky_factor_of_the_damped_inverse(width):
    torch.manual_seed(width)
    x = torch.randn(2 * width, width, dtype=torch.float64)
    x[:, 3] = 0  # a dead input: unit diagonal
    hessian = (x.T @ x / x.shape[0]).float()  # [C, C]
    u = inverse_hessian_factor(hessian, 0.01)
    h = hessian.double()
    h[3, 3] = 1.0
    h += 0.01 * torch.diag(h).mean() * torch.eye(width, dtype=torch.float64)
    reference = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    assert torch.equal(u, torch.triu(u)) and bool((torch.diag(u) > 0).all())
    torch.testing.assert_close(u, reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(u.T @ u @ h, torch.eye(width, dtype=torch.float64), rtol=0, atol=1e-8)


def test_sparsegpt_warns_when_the_hessians_are_singular(caplog):
    """Fewer calibration tokens than the widest linear's inputs: the warning names the numbers and the way out."""
    import logging

    from tiny_models import tiny_model, tokens

    import hf_pruning

    model = tiny_model("llama")
    widest = max(m.in_features for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    with caplog.at_level(logging.WARNING, logger="hf_pruning.methods.sparsegpt.pruner"):
        hf_pruning.prune_(model, {"method": "sparsegpt", "sparsity": 0.5}, calibration=tokens(2, 8))
    assert f"16 calibration tokens for inputs up to {widest} wide" in caplog.text and "percdamp" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_pruning.methods.sparsegpt.pruner"):
        hf_pruning.prune_(tiny_model("llama"), {"method": "sparsegpt", "sparsity": 0.5},
                          calibration=tokens(4, widest // 4 + 1))
    assert "calibration tokens" not in caplog.text
