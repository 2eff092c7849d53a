"""SparseGPT's inverse-Hessian factor computed by every rank of a process group together.

Under data parallelism every rank solves rows of every linear (``engine.distributed.split_rows_``), so every rank
needs each group's factor U = P L^-1 P (P H P = L L^T, :func:`~.scoring.inverse_hessian_factor`). Computed alone
on each rank it is the part of SparseGPT that does not get faster with more ranks (on a CPU, the 9k-wide down_proj
factor is about 40% of the time). Here the same factor is computed by blocks of :data:`BLOCK` rows and columns,
each block task on one rank and its result broadcast:

- Cholesky, right-looking: the diagonal block k on rank k mod W; the panel blocks below it and the trailing
  update of block row i on rank i mod W (each rank holds the whole matrix; a block row is updated by one rank,
  with panel blocks every rank received).
- L^-1 by column blocks, W at a time (column block j on rank j mod W): forward substitution down the column,
  then the column blocks of the round are broadcast and written over L's (the later rounds read only L's columns
  to the right of theirs).

Every block task is the same computation whichever rank runs it, so the factor is the same bit for bit for any
number of ranks (one rank included); it differs from :func:`~.scoring.inverse_hessian_factor` (one LAPACK call
and a recursive inverse) by float64 rounding only. Traffic: about the matrix twice per factor (C^2 float64).
"""

from __future__ import annotations

import torch

from ...engine import distributed
from .scoring import _reverse_, damped_reversed

#: rows and columns of a block task (a [1024, 1024] float64 block is 8 MB)
BLOCK = 1024


def _send(h: torch.Tensor, rows: slice, cols: slice, src: int) -> None:
    """Block ``h[rows, cols]`` from rank ``src`` to every rank (written in place on the others)."""
    block = h[rows, cols].contiguous()
    distributed.broadcast_(block, src, "a block of the SparseGPT factor")
    if distributed.world()[0] != src:
        h[rows, cols] = block


def _cholesky_(h: torch.Tensor, blocks: list[slice], rank: int, size: int) -> None:
    """Lower Cholesky factor of ``h`` in its lower triangle (the upper one left as garbage), block tasks split."""
    for k, kk in enumerate(blocks):
        if k % size == rank:
            h[kk, kk] = torch.linalg.cholesky(h[kk, kk])
        _send(h, kk, kk, k % size)
        below = range(k + 1, len(blocks))
        for i in below:  # panel: L_ik = A_ik L_kk^-T
            if i % size == rank:
                h[blocks[i], kk] = torch.linalg.solve_triangular(h[kk, kk].mT, h[blocks[i], kk], upper=True, left=False)
        for i in below:
            _send(h, blocks[i], kk, i % size)
        for i in below:  # trailing update of block row i, up to its diagonal block: A_ij -= L_ik L_jk^T
            if i % size == rank:
                rows, cols = blocks[i], slice(blocks[k + 1].start, blocks[i].stop)
                h[rows, cols] -= h[rows, kk] @ h[cols, kk].mT


def _inverse_column(h: torch.Tensor, blocks: list[slice], j: int) -> torch.Tensor:
    """Column block ``j`` of L^-1 from row block ``j`` down, ``[C - start_j, width_j]`` (L in ``h``'s lower
    triangle): X_jj = L_jj^-1, X_ij = -L_ii^-1 sum_{j <= m < i} L_im X_mj."""
    jj, start = blocks[j], blocks[j].start
    col = torch.empty(h.shape[0] - start, jj.stop - start, dtype=h.dtype, device=h.device)
    eye = torch.eye(jj.stop - start, dtype=h.dtype, device=h.device)
    col[: jj.stop - start] = torch.linalg.solve_triangular(h[jj, jj], eye, upper=False)
    for ii in blocks[j + 1 :]:
        acc = h[ii, start : ii.start] @ col[: ii.start - start]  # [rows_i, width_j]
        col[ii.start - start : ii.stop - start] = torch.linalg.solve_triangular(h[ii, ii], acc, upper=False).neg_()
    return col


def shared_inverse_hessian_factor(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """The upper factor U of (H + damp*I)^-1 ``[C, C]`` float64 (as :func:`~.scoring.inverse_hessian_factor`),
    its block tasks split over the ranks of the process group; every rank returns the same matrix."""
    rank, size = distributed.world()
    h = damped_reversed(hessian, percdamp)  # [C, C]
    cols = h.shape[0]
    blocks = [slice(s, min(s + BLOCK, cols)) for s in range(0, cols, BLOCK)]
    _cholesky_(h, blocks, rank, size)
    for first in range(0, len(blocks), size):  # L^-1, a round of `size` column blocks at a time
        ours = first + rank
        col = _inverse_column(h, blocks, ours) if ours < len(blocks) else None
        for j in range(first, min(first + size, len(blocks))):
            start = blocks[j].start
            block = col if j == ours else torch.empty(cols - start, blocks[j].stop - start, dtype=h.dtype,
                                                      device=h.device)
            distributed.broadcast_(block, j % size, "a column block of the SparseGPT factor")
            h[start:, blocks[j]] = block
    h.tril_()  # L^-1, lower
    return _reverse_(h)  # P L^-1 P
