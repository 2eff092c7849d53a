"""Pure tensor math shared by the mask methods (magnitude, Wanda, SparseGPT, LLM-Barber).

A mask here is a boolean tensor that is True where a weight is PRUNED (zero). Counts are exact: weights are
chosen by sorting (ties broken by position), never by comparing with a threshold value, so the requested
number is always hit even when scores tie (SmolLM2's 4-bit weights tie a lot).
"""

from __future__ import annotations

import math
import re

import torch

from ...config import ConfigError

GRANULARITIES = ("output1", "input1", "layer", "block")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None; ``"N:M"`` -> (N pruned, M group size), with N < M checked."""
    if pattern == "unstructured":
        return None
    match = re.fullmatch(r"(\d+):(\d+)", str(pattern))
    if not match:
        raise ConfigError(f"pattern must be 'unstructured' or 'N:M' (e.g. '2:4'), got {pattern!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ConfigError(f"pattern {pattern!r}: need 0 < N < M (N pruned out of every M weights)")
    return n, m


def _keys(score: torch.Tensor, descending: bool = False) -> torch.Tensor:
    """Unique int64 keys ordering ``score`` along its last dim, equal values in position order: the float32
    value's order-preserving bit pattern in the high 32 bits, the position in the low ones."""
    s = score.float() + 0.0  # -0.0 becomes +0.0: values that compare equal get equal keys
    bits = s.view(torch.int32)
    key = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()  # monotone in the float value
    if descending:
        key = ~key
    position = torch.arange(s.shape[-1], device=s.device)
    return (key << 32) | position


def stable_order(score: torch.Tensor, descending: bool = False) -> torch.Tensor:
    """The indices that sort ``score`` along its last dim, equal values in position order: the same as
    ``torch.sort(score.float(), stable=True, descending=...).indices``, but one sort of unique int64 keys,
    several times faster on CPU."""
    return torch.sort(_keys(score, descending), dim=-1).indices


def _rank(order: torch.Tensor) -> torch.Tensor:
    """Inverse permutation along the last dim: rank[i, order[i, j]] = j."""
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return rank


def lowest_per_row(score: torch.Tensor, k: torch.Tensor | int, forced: torch.Tensor | None = None) -> torch.Tensor:
    """Mask of the ``k`` lowest-scoring entries of each row ``[R, C]`` (``forced`` entries count first)."""
    s = score.float()
    if forced is not None:
        s = torch.where(forced, torch.full_like(s, float("-inf")), s)
    if isinstance(k, int):  # one k for every row: select the k-th smallest key, no sort (O(C) per row)
        if k <= 0:
            return torch.zeros_like(s, dtype=torch.bool)
        keys = _keys(s)  # [R, C], unique per row
        if k >= s.shape[-1]:
            return torch.ones_like(s, dtype=torch.bool)
        return keys <= torch.kthvalue(keys, k, dim=-1, keepdim=True).values
    k = torch.as_tensor(k, device=score.device).reshape(-1, 1)
    return _rank(stable_order(s)) < k


def unstructured_mask(score: torch.Tensor, sparsity: float, per_row: bool,
                      already_zero: torch.Tensor | None = None) -> torch.Tensor:
    """Prune ``sparsity`` of a matrix ``[R, C]``: per output row (Wanda) or over the whole matrix (magnitude).

    Weights that are already zero are pruned first, so the final zero fraction is exactly as requested
    (unless more than that was already zero).
    """
    if per_row:
        return lowest_per_row(score, int(score.shape[1] * sparsity), already_zero)
    flat_zero = None if already_zero is None else already_zero.reshape(1, -1)
    return lowest_per_row(score.reshape(1, -1), int(score.numel() * sparsity), flat_zero).reshape(score.shape)


def nm_mask(score: torch.Tensor, n: int, m: int, already_zero: torch.Tensor | None = None) -> torch.Tensor:
    """Prune the ``n`` lowest of every ``m`` consecutive input weights of each row ``[R, C]``."""
    rows, cols = score.shape
    if cols % m:
        raise ConfigError(f"an N:M pattern with M={m} needs the input width to be a multiple of {m}; got {cols}")
    grouped = score.reshape(rows * cols // m, m)
    zero = None if already_zero is None else already_zero.reshape(rows * cols // m, m)
    return lowest_per_row(grouped, n, zero).reshape(rows, cols)


def select_mask(score: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, per_row: bool,
                already_zero: torch.Tensor | None = None) -> torch.Tensor:
    if nm is not None:
        return nm_mask(score, nm[0], nm[1], already_zero)
    return unstructured_mask(score, sparsity, per_row, already_zero)


def _swap_counts(score: torch.Tensor, pruned: torch.Tensor, threshold: float):
    """Per row: k = int(threshold * r), r = beneficial swaps (best pruned beats worst kept, pairwise)."""
    s = score.float()
    grow_order = stable_order(torch.where(pruned, s, torch.full_like(s, float("-inf"))), descending=True)
    keep_order = stable_order(torch.where(pruned, torch.full_like(s, float("inf")), s))
    grow_sorted, keep_sorted = s.gather(-1, grow_order), s.gather(-1, keep_order)
    n_pruned = pruned.sum(-1, keepdim=True)
    pairs = torch.minimum(n_pruned, pruned.shape[-1] - n_pruned)  # [R, 1]
    position = torch.arange(s.shape[-1], device=s.device)
    r = ((grow_sorted > keep_sorted) & (position < pairs)).sum(-1, keepdim=True)
    k = (r.double() * threshold).floor().long()  # [R, 1]
    return k, _rank(grow_order), _rank(keep_order)


def rebuild_rows(score: torch.Tensor, pruned: torch.Tensor, threshold: float) -> torch.Tensor:
    """LLM-Barber's swap on rows ``[R, C]``: regrow the k best pruned, prune the k worst kept, per row.

    Exactly as many weights are regrown as pruned in every row, so each row's sparsity is unchanged.
    """
    if score.shape[0] == 1:
        return _rebuild_one_row(score, pruned, threshold)
    k, grow_rank, keep_rank = _swap_counts(score, pruned, threshold)
    regrow = pruned & (grow_rank < k)
    newly_pruned = ~pruned & (keep_rank < k)
    return (pruned & ~regrow) | newly_pruned


def _rebuild_one_row(score: torch.Tensor, pruned: torch.Tensor, threshold: float) -> torch.Tensor:
    """``rebuild_rows`` for one (long) row ``[1, C]`` (granularities layer and block): the pruned and the kept
    scores are sorted apart (half the length each, same stable tie order by position) and the swap is written
    by index, instead of two full-length sorts and rank scatters."""
    s, p = score.float().reshape(-1), pruned.reshape(-1)
    pruned_at, kept_at = p.nonzero().squeeze(1), (~p).nonzero().squeeze(1)  # positions, ascending
    grow, keep = s[pruned_at], s[kept_at]
    grow_order, keep_order = stable_order(grow, descending=True), stable_order(keep)
    grow_vals, keep_vals = grow[grow_order], keep[keep_order]
    pairs = min(pruned_at.numel(), kept_at.numel())
    r = int((grow_vals[:pairs] > keep_vals[:pairs]).sum())  # beneficial swaps
    k = math.floor(r * threshold)
    new = p.clone()
    new[pruned_at[grow_order[:k]]] = False
    new[kept_at[keep_order[:k]]] = True
    return new.reshape(pruned.shape)


def rebuild_nm(score: torch.Tensor, pruned: torch.Tensor, threshold: float, n: int, m: int) -> torch.Tensor:
    """The swap under an N:M pattern: per row regrow as in ``rebuild_rows``, then in every group of ``m`` prune
    as many of the lowest kept weights as were regrown there (capped at the group's kept count)."""
    rows, cols = score.shape
    k, grow_rank, _ = _swap_counts(score, pruned, threshold)
    regrow = (pruned & (grow_rank < k)).reshape(-1, m)  # [R * C/m, m]
    s = score.float().reshape(-1, m)
    was = pruned.reshape(-1, m)
    cap = m - n
    # keep at most `cap` regrown weights per group: the best-scoring ones
    regrow_order = stable_order(torch.where(regrow, s, torch.full_like(s, float("-inf"))), descending=True)
    regrow = regrow & (_rank(regrow_order) < cap)
    count = regrow.sum(-1, keepdim=True)  # [groups, 1]
    keep_order = stable_order(torch.where(was, torch.full_like(s, float("inf")), s))
    newly_pruned = ~was & (_rank(keep_order) < count)
    return ((was & ~regrow) | newly_pruned).reshape(rows, cols)


def rebuild_nm_pairs(score: torch.Tensor, pruned: torch.Tensor, threshold: float, n: int, m: int) -> torch.Tensor:
    """The swap under an N:M pattern, made only where it helps inside its own group.

    In every group of ``m`` of a row ``[R, C]``, the best pruned weight is paired with the worst kept one, the
    second best with the second worst, and so on (``min(n, m - n)`` pairs); a pair is beneficial when the
    pruned weight scores strictly higher. Per row, ``r`` = beneficial pairs and the ``k = floor(threshold * r)``
    pairs with the largest score gain are swapped. Every group keeps its count, so the pattern holds and no
    swap lowers the group's kept score (``rebuild_nm``, the official rule, may: a weight regrown on its
    row-wide rank replaces the group's lowest kept weight even when that one scores higher).
    """
    rows, cols = score.shape
    pairs = min(n, m - n)
    s = score.float().reshape(rows, cols // m, m)  # [R, G, m]
    was = pruned.reshape(rows, cols // m, m)
    inf = torch.full_like(s, float("inf"))
    grow_order = stable_order(torch.where(was, s, -inf), descending=True)[..., :pairs]
    keep_order = stable_order(torch.where(was, inf, s))[..., :pairs]  # [R, G, P]
    grow_vals = torch.where(was, s, -inf).gather(-1, grow_order)
    keep_vals = torch.where(was, inf, s).gather(-1, keep_order)
    gain = grow_vals - keep_vals  # [R, G, P]; -inf / nan where a side is empty
    good = torch.isfinite(grow_vals) & torch.isfinite(keep_vals) & (gain > 0)
    flat = torch.where(good, gain, torch.full_like(gain, float("-inf"))).reshape(rows, -1)  # [R, G*P]
    k = (good.reshape(rows, -1).sum(-1, keepdim=True).double() * threshold).floor().long()  # [R, 1]
    chosen = (_rank(stable_order(flat, descending=True)) < k).reshape(gain.shape)
    regrow = torch.zeros_like(was).scatter_(-1, grow_order, chosen)
    newly_pruned = torch.zeros_like(was).scatter_(-1, keep_order, chosen)
    return ((was & ~regrow) | newly_pruned).reshape(rows, cols)


NM_RULES = ("row", "pairs")


def rebuild_masks(scores: list[torch.Tensor], pruned: list[torch.Tensor], threshold: float, granularity: str,
                  nm: tuple[int, int] | None = None, nm_rule: str = "row") -> list[torch.Tensor]:
    """Rebuild the masks of one block's matrices ``[R_i, C_i]`` with the chosen grouping.

    ``output1``: each output row; ``input1``: each input column; ``layer``: each whole matrix; ``block``: all
    matrices of the block together. N:M patterns allow ``output1`` only (groups run along rows); ``nm_rule``
    picks ``rebuild_nm`` ("row", the official rule) or ``rebuild_nm_pairs`` ("pairs").
    """
    if granularity not in GRANULARITIES:
        raise ConfigError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if nm is not None:
        if granularity != "output1":
            raise ConfigError(f"an N:M pattern keeps groups along rows: use granularity='output1', not {granularity!r}")
        if nm_rule not in NM_RULES:
            raise ConfigError(f"nm_rule must be one of {NM_RULES}, got {nm_rule!r}")
        rule = rebuild_nm if nm_rule == "row" else rebuild_nm_pairs
        return [rule(s, p, threshold, *nm) for s, p in zip(scores, pruned)]
    if granularity == "output1":
        return [rebuild_rows(s, p, threshold) for s, p in zip(scores, pruned)]
    if granularity == "input1":
        return [rebuild_rows(s.T, p.T, threshold).T for s, p in zip(scores, pruned)]
    if granularity == "layer":
        return [rebuild_rows(s.reshape(1, -1), p.reshape(1, -1), threshold).reshape(s.shape) for s, p in zip(scores, pruned)]
    flat = rebuild_rows(torch.cat([s.reshape(-1) for s in scores])[None], torch.cat([p.reshape(-1) for p in pruned])[None],
                        threshold)[0]
    out, start = [], 0
    for s in scores:
        out.append(flat[start : start + s.numel()].reshape(s.shape))
        start += s.numel()
    return out
