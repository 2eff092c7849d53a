"""A column sum over rows that arrive batch by batch, bit-identical to one ``x.sum(0)`` over all of them.

PyTorch's CPU float32 sum over rows (``aten/src/ATen/native/cpu/SumKernel.cpp``, ``multi_row_sum``) is a
cascade of four levels: rows are added one by one into blocks of 2^p rows, those blocks one by one into blocks
of 2^p blocks, those into blocks of 2^p of those, and the last level runs on, with p = max(4, ceil(log2 N) // 4)
for N rows; the partial levels are added at the end. Summing each batch and adding the batch sums gives other
roundings (Wanda's masks then differ from a one-pass, all-rows run in near ties: 0.4% of SmolLM2's at 4
batches). :class:`StreamedColumnSum` follows the same cascade across batches, so a staged schedule gets the
all-rows statistic exactly (the same on any device: only element-wise additions, in a fixed order).
"""

from __future__ import annotations

import math

import torch

#: the cascade's levels (``num_levels`` in PyTorch's kernel)
LEVELS = 4


def _in_order(blocks: torch.Tensor) -> torch.Tensor:
    """``blocks`` ``[M, k, w]`` summed over k one row at a time from the first: ``[M, w]``."""
    total = blocks[:, 0].clone()
    for r in range(1, blocks.shape[1]):
        total += blocks[:, r]
    return total


class StreamedColumnSum:
    """``add(x)`` rows ``[n, w]`` in order, then :meth:`total` is ``torch.cat(all x).sum(0)`` bit for bit (on
    the CPU, float32). ``rows``: how many rows will come in all (the cascade's block size depends on it)."""

    def __init__(self, rows: int, width: int, device=None, dtype: torch.dtype = torch.float32):
        power = max(4, math.ceil(math.log2(rows)) // LEVELS) if rows > 1 else 4
        self.step = 1 << power
        empty = torch.zeros(0, width, dtype=dtype, device=device)
        self.pending = [empty] * (LEVELS - 1)  # per level: rows / block sums not yet a whole block
        self.last = torch.zeros(width, dtype=dtype, device=device)  # the top level: block sums added one by one

    def add(self, x: torch.Tensor) -> None:
        """Add the rows of ``x`` ``[n, w]`` (after every row added before)."""
        for level in range(LEVELS - 1):
            rows = torch.cat([self.pending[level], x.to(self.last.dtype)])
            whole = rows.shape[0] // self.step * self.step
            self.pending[level] = rows[whole:]
            x = _in_order(rows[:whole].view(-1, self.step, rows.shape[1]))  # [whole / step, w]
        for block in x:
            self.last += block

    def total(self) -> torch.Tensor:
        """The column sums ``[w]`` of every row added so far."""
        out = torch.zeros_like(self.last)
        for pending in self.pending:  # what each level holds, added in level order as PyTorch does at the end
            level = torch.zeros_like(self.last)
            for row in pending:
                level += row
            out += level
        return out + self.last
