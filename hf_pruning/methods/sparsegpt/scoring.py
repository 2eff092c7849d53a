"""SparseGPT's per-matrix solver (pure tensor math, float32/float64)."""

from __future__ import annotations

import torch

from ..masks.selection import lowest_per_row


def _invert_lower_(low: torch.Tensor, leaf: int = 256, chunk: int = 1024) -> torch.Tensor:
    """Invert the lower-triangular ``low`` ``[n, n]`` (upper triangle zero) in place, by halves:
    [[A, 0], [B, D]]^-1 = [[A^-1, 0], [-D^-1 B A^-1, D^-1]], n^3 / 3 multiply-adds. Besides ``low`` it holds one
    [n/2, ``chunk``] product at a time: B A^-1 is formed column block by column block from the left (a block
    reads B's columns from its own on, not yet overwritten), D^-1 (B A^-1) row block by row block from the bottom
    (a block reads the rows up to its own)."""
    n = low.shape[0]
    if n <= leaf:
        eye = torch.eye(n, dtype=low.dtype, device=low.device)
        return low.copy_(torch.linalg.solve_triangular(low, eye, upper=False))
    m = n // 2
    a_inv = _invert_lower_(low[:m, :m], leaf, chunk)  # [m, m]
    d_inv = _invert_lower_(low[m:, m:], leaf, chunk)  # [n-m, n-m]
    b = low[m:, :m]  # [n-m, m]
    for c0 in range(0, m, chunk):  # B <- B A^-1
        c1 = min(c0 + chunk, m)
        b[:, c0:c1] = b[:, c0:] @ a_inv[c0:, c0:c1]  # [n-m, c]
    for r1 in range(n - m, 0, -chunk):  # B <- D^-1 B
        r0 = max(r1 - chunk, 0)
        b[r0:r1] = d_inv[r0:r1, :r1] @ b[:r1]  # [r, m]
    b.neg_()
    return low


def _reverse_(x: torch.Tensor, chunk: int = 2**20) -> torch.Tensor:
    """Reverse the order of ``x``'s elements in place (contiguous; for a matrix: both axes flipped), swapping
    ``chunk`` elements at a time."""
    flat = x.view(-1)
    n = flat.numel()
    for s in range(0, n // 2, chunk):
        e = min(s + chunk, n // 2)
        front = flat[s:e].clone()
        flat[s:e] = flat[n - e : n - s].flip(0)
        flat[n - e : n - s] = front.flip(0)
    return x


def damped_reversed(hessian: torch.Tensor, percdamp: float, chunk: int = 1024) -> torch.Tensor:
    """P (H + damp*I) P ``[C, C]`` float64 (P: the reversal of the column order), dead inputs (zero diagonal)
    given a unit diagonal first; filled by row blocks of ``chunk``."""
    cols = hessian.shape[0]
    h = torch.empty(cols, cols, dtype=torch.float64, device=hessian.device)  # P H P, filled by row blocks
    for r0 in range(0, cols, chunk):
        r1 = min(r0 + chunk, cols)
        h[r0:r1] = hessian[cols - r1 : cols - r0].flip(0, 1)
    diag = h.diagonal()
    diag.masked_fill_(diag == 0, 1.0)
    diag.add_(percdamp * diag.mean())
    return h


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float, chunk: int = 1024) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp*I)^-1 (U^T U = (H + damp*I)^-1), ``[C, C]`` float64; dead inputs
    (zero diagonal) get a unit diagonal.

    Without forming the inverse: with P the reversal of the column order, P H P = L L^T (L lower), so
    H^-1 = (P L^-1 P)^T (P L^-1 P) and U = P L^-1 P. One Cholesky and one triangular inverse, 2/3 C^3
    multiply-adds (4/3 C^3 for Cholesky, ``cholesky_inverse`` and a second Cholesky), all in one float64 [C, C]
    buffer: the Cholesky runs in place on its column-major view (LAPACK's layout, so no copy), the inverse and
    the final flip in place with [C/2, ``chunk``] temporaries. At a 9k-wide down_proj that is 0.6 GiB, where
    the textbook sequence holds three such matrices.
    """
    h = damped_reversed(hessian, percdamp, chunk)
    # h is symmetric, so h.mT is the same matrix in column-major order; its upper factor R (P H P = R^T R) is L^T,
    # which leaves L (lower, upper triangle zeroed) in h's own row-major order
    torch.linalg.cholesky(h.mT, upper=True, out=h.mT)
    _invert_lower_(h, chunk=chunk)  # [C, C] lower: L^-1
    return _reverse_(h)  # P L^-1 P


#: devices where the columns of a block are solved at once, one batched triangular solve per block, when the
#: block's mask is fixed before its sweep (unstructured, or a fixed mask): on a GPU the column-by-column loop is
#: bound by kernel launches; on the CPU the loop is as fast (SmolLM2's 576 x 1536 matrix: 0.17 s either way)
BATCHED_BLOCK_DEVICES = {"cuda"}


def _block_errors(block: torch.Tensor, ub: torch.Tensor, bmask: torch.Tensor, chunk_bytes: int = 2**28) -> torch.Tensor:
    """The errors the column sweep of one block produces when its mask is known up front, ``[R, B]``.

    Column j's error e_j (pruned rows only) satisfies e_j * U_jj = w_j - sum_{i<j} e_i * U_ij, i.e. per row
    ``e @ A = w * m`` with A = the block's factor ``ub`` ``[B, B]`` whose kept columns are replaced by unit
    columns (their error is 0): one upper-triangular solve per row, batched (rows in chunks of at most
    ``chunk_bytes`` of systems).
    """
    rows, width = block.shape
    m = bmask.to(block.dtype)  # [R, B]
    errors = torch.empty_like(block)
    step = max(1, chunk_bytes // (width * width * block.element_size()))
    for r0 in range(0, rows, step):
        mr = m[r0 : r0 + step]  # [r, B]
        system = ub[None] * mr[:, None, :]  # [r, B, B]: kept columns zeroed ...
        system.diagonal(dim1=1, dim2=2).add_(1 - mr)  # ... then given a unit diagonal
        rhs = (block[r0 : r0 + step] * mr)[:, None, :]  # [r, 1, B]
        errors[r0 : r0 + step] = torch.linalg.solve_triangular(system, rhs, upper=True, left=False)[:, 0]
    return errors


#: rows of a block swept together by the column loop: [2048, 128] float64 (2 MiB) stays in cache through the
#: loop's 128 rank-1 updates, where a whole 14k-row block (14 MiB) streams from memory in each (1.4x on the CPU)
SWEEP_ROWS = 2048
#: columns of a block whose rank-1 updates are applied one by one; the rest of the block gets each such run's
#: errors in one matrix product (the lazy update of the blocks, one level down). On the CPU the column loop's
#: rank-1 updates over the whole block were 55% of SparseGPT's time on Qwen2.5-1.5B, 20x Wanda's whole run
SWEEP_COLUMNS = 16


def _sweep_columns_(block: torch.Tensor, ub: torch.Tensor, bmask: torch.Tensor, errors: torch.Tensor,
                    already_zero: torch.Tensor, nm: tuple[int, int] | None) -> None:
    """SparseGPT's column loop over one block ``[R, B]``, in place: each column's pruned part (``bmask``, or
    chosen every M columns with ``nm``) is removed and its scaled error spread over the columns to its right
    through the block's factor ``ub`` ``[B, B]``; the errors go to ``errors`` ``[R, B]``. Rows never mix, so
    the loop runs :data:`SWEEP_ROWS` rows at a time. Columns go in runs of :data:`SWEEP_COLUMNS` (a multiple of
    M): inside a run every error is spread at once over the run's later columns, and over the block's columns
    after the run once per run, as one product (the same updates, summed in another order)."""
    d = torch.diag(ub)  # [B]
    width = block.shape[1]
    run = SWEEP_COLUMNS if nm is None else nm[1] * max(1, SWEEP_COLUMNS // nm[1])
    for r0 in range(0, block.shape[0], SWEEP_ROWS):
        rows = slice(r0, r0 + SWEEP_ROWS)
        part, mask, err_out, zero = block[rows], bmask[rows], errors[rows], already_zero[rows]  # [r, B] views
        for s0 in range(0, width, run):
            s1 = min(s0 + run, width)
            for j in range(s0, s1):
                if nm is not None and j % nm[1] == 0:
                    group = slice(j, j + nm[1])
                    score = part[:, group].pow(2) / d[group].pow(2)[None, :]
                    mask[:, group] = lowest_per_row(score, nm[0], zero[:, group])
                err = part[:, j].masked_fill(~mask[:, j], 0) / d[j]  # [r]: the pruned part of the column, scaled
                part[:, j:s1].addr_(err, ub[j, j:s1], alpha=-1)  # spread over the rest of the run
                part[:, j].masked_fill_(mask[:, j], 0)
                err_out[:, j] = err
            if s1 < width:  # the run's errors [r, s] spread over the block's later columns at once
                part[:, s1:].addmm_(err_out[:, s0:s1], ub[s0:s1, s1:], alpha=-1)


def block_mask(score: torch.Tensor, already_zero: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The ``sparsity`` fraction of lowest scores over a whole block ``[R, B]`` (zeros first, ties by position)."""
    k = int(score.numel() * sparsity)
    return lowest_per_row(score.reshape(1, -1), k, already_zero.reshape(1, -1)).reshape(score.shape)


@torch.no_grad()
def sparsegpt_solve_(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, nm: tuple[int, int] | None,
                     blocksize: int = 128, percdamp: float = 0.01,
                     fixed_mask: torch.Tensor | None = None, factor: torch.Tensor | None = None,
                     dead: torch.Tensor | None = None, select_block=None) -> torch.Tensor:
    """Prune ``weight`` ``[R, C]`` in place, updating the kept weights to compensate; returns the pruned mask.

    Columns are visited left to right in blocks. Inside a block, the mask is chosen once (unstructured: the
    ``sparsity`` fraction of lowest w^2 / [H^-1]_jj^2 in the block) or every M columns (N:M). Each pruned
    column's error is spread over the columns not yet visited through the inverse-Hessian factor.
    Weights that are already zero are pruned first. With ``fixed_mask`` (``[R, C]``, True = pruned) no mask is
    chosen: that one is applied and only the compensating update is made (LLM-Barber's ``reconstruct``).
    ``factor``: ``inverse_hessian_factor(hessian, percdamp)`` when the caller already has it (linears that
    read one input share it); with ``factor`` and ``dead`` (``[C]`` bool: inputs whose Hessian diagonal is zero)
    ``hessian`` may be None, so that the caller can free it before the sweep. Factorisation and sweep run in
    float64: on SmolLM2 a float32 sweep (the reference code's) raised the pruned model's perplexity by 1.7%
    (52.60 vs 51.69 on held-out text). ``select_block(score, already_zero, sparsity) -> mask`` (``[R, B]`` each)
    replaces the unstructured choice inside a block (:func:`block_mask`): a caller that solves some of a
    weight's rows here chooses over every row of the block with it (rows never mix otherwise).
    """
    rows, cols = weight.shape
    w = weight.to(torch.float64, copy=True)
    already_zero = weight == 0
    u = factor if factor is not None else inverse_hessian_factor(hessian, percdamp)  # [C, C] upper, float64
    dead = torch.diag(hessian) == 0 if dead is None else dead  # [C]
    if fixed_mask is None:  # inputs that never fire: their weights are free to prune (a fixed mask keeps them)
        w[:, dead] = 0
    mask = torch.zeros_like(already_zero)
    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        block = w[:, b0:b1].clone()  # [R, B]
        ub = u[b0:b1, b0:b1]  # [B, B]
        d = torch.diag(ub)  # [B]
        errors = torch.zeros_like(block)
        if fixed_mask is not None:
            bmask = fixed_mask[:, b0:b1].clone()
        elif nm is None:
            score = block.pow(2) / d.pow(2)[None, :]  # [R, B]
            bmask = (select_block or block_mask)(score, already_zero[:, b0:b1], sparsity)
        else:
            bmask = torch.zeros_like(block, dtype=torch.bool)
        if w.device.type in BATCHED_BLOCK_DEVICES and (fixed_mask is not None or nm is None):
            errors = _block_errors(block, ub, bmask)  # the column loop below, in one batched solve
            block = (block - errors @ ub).masked_fill_(bmask, 0)
        else:
            _sweep_columns_(block, ub, bmask, errors, already_zero[:, b0:b1], nm if fixed_mask is None else None)
        w[:, b0:b1] = block
        w[:, b1:].addmm_(errors, u[b0:b1, b1:], alpha=-1)
        mask[:, b0:b1] = bmask
    w[mask] = 0
    weight.copy_(w.to(weight.dtype))
    return mask
