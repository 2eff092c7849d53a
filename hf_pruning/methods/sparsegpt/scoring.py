"""SparseGPT's per-matrix solver (pure tensor math, float32/float64)."""

from __future__ import annotations

import torch

from ..sparsity import lowest_per_row


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp*I)^-1, ``[C, C]``; dead inputs (zero diagonal) get a unit diagonal."""
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += percdamp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inv, upper=True)


@torch.no_grad()
def sparsegpt_solve_(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, nm: tuple[int, int] | None,
                     blocksize: int = 128, percdamp: float = 0.01) -> torch.Tensor:
    """Prune ``weight`` ``[R, C]`` in place, updating the kept weights to compensate; returns the pruned mask.

    Columns are visited left to right in blocks. Inside a block, the mask is chosen once (unstructured: the
    ``sparsity`` fraction of lowest w^2 / [H^-1]_jj^2 in the block) or every M columns (N:M). Each pruned
    column's error is spread over the columns not yet visited through the inverse-Hessian factor.
    Weights that are already zero are pruned first.
    """
    rows, cols = weight.shape
    w = weight.double()
    already_zero = weight == 0
    u = inverse_hessian_factor(hessian, percdamp)  # [C, C] upper
    dead = torch.diag(hessian) == 0
    w[:, dead] = 0
    mask = torch.zeros_like(already_zero)
    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        block = w[:, b0:b1].clone()  # [R, B]
        ub = u[b0:b1, b0:b1]  # [B, B]
        d = torch.diag(ub)  # [B]
        errors = torch.zeros_like(block)
        if nm is None:
            score = block.pow(2) / d.pow(2)[None, :]
            k = int(block.numel() * sparsity)
            bmask = lowest_per_row(score.reshape(1, -1), k, already_zero[:, b0:b1].reshape(1, -1)).reshape(block.shape)
        else:
            bmask = torch.zeros_like(block, dtype=torch.bool)
        for j in range(b1 - b0):
            if nm is not None and j % nm[1] == 0:
                group = slice(j, j + nm[1])
                score = block[:, group].pow(2) / d[group].pow(2)[None, :]
                bmask[:, group] = lowest_per_row(score, nm[0], already_zero[:, b0:b1][:, group])
            col = block[:, j]
            q = torch.where(bmask[:, j], torch.zeros_like(col), col)
            err = (col - q) / d[j]  # [R]
            block[:, j:] -= err[:, None] * ub[j, j:][None, :]
            block[:, j] = q
            errors[:, j] = err
        w[:, b0:b1] = block
        w[:, b1:] -= errors @ u[b0:b1, b1:]
        mask[:, b0:b1] = bmask
    w[mask] = 0
    weight.copy_(w.to(weight.dtype))
    return mask
