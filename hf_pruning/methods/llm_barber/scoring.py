"""LLM-Barber's block error gradients (tensor math on one block; no hooks, no model knowledge).

Under a process group each rank sums over its own rows (per batch, kept in float64) and the sums and row
counts are added over the ranks before they are returned, so every rank scores with the all-rows numbers.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from ...engine import distributed


def block_gradient_sq(dense_forward: Callable[[torch.Tensor], torch.Tensor], weights: dict[str, nn.Parameter],
                      batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                      dense_outputs=None) -> dict[str, torch.Tensor]:
    """Mean over samples (calibration rows) of G_n^2, with G_n = d MSE(target_n, dense_forward(input_n)) / dW
    at the dense W, accumulated in float32.

    ``batches`` yields the block's sparse-path inputs and the sparse block's outputs, ``([b, T, d], [b, T, d])``
    one batch at a time; the gradient is taken row by row. Only ``weights`` get gradients. ``dense_outputs``:
    anything with ``append`` (an ActivationStore) that receives ``dense_forward`` of each batch (detached,
    ``[b, T, d]``) for a later error comparison. Under a process group each batch's sum joins a
    :class:`~hf_pruning.engine.distributed.RankSum` per weight, summed over the ranks at the end.
    """
    ranked = distributed.active()
    acc = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()}
    sums = {name: distributed.RankSum(w.shape, w.device) for name, w in weights.items()} if ranked else {}
    rows = 0
    with torch.enable_grad():
        for p in weights.values():
            p.requires_grad_(True)
        try:
            for xb, yb in batches:
                outs = []
                if ranked:  # this batch's sum alone, in float32
                    acc = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()}
                for x, y in zip(xb.split(1), yb.split(1)):  # [1, T, d] each
                    out = dense_forward(x.float())  # [1, T, d]
                    outs.append(out.detach())
                    loss = nn.functional.mse_loss(out, y.float())
                    grads = torch.autograd.grad(loss, list(weights.values()))
                    for (name, _), g in zip(weights.items(), grads):
                        acc[name] += g.float().pow(2)
                    rows += 1
                if dense_outputs is not None:
                    dense_outputs.append(torch.cat(outs))
                for name, s in sums.items():
                    s.add(acc[name], xb.shape[0])
        finally:
            for p in weights.values():
                p.requires_grad_(False)
    if ranked:  # every rank's rows: one collective per weight ([out, in] float64 and the row count)
        reduced = {name: s.reduced(f"LLM-Barber's squared gradients of {name}") for name, s in sums.items()}
        return {name: (total / max(n, 1)).float() for name, (total, n) in reduced.items()}
    return {name: a / max(rows, 1) for name, a in acc.items()}


@torch.no_grad()
def block_error(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean squared error between outputs and targets over all samples: ``batches`` yields ``([b, T, d],
    [b, T, d])`` pairs; rows have equal lengths, so the mean of the per-row means is the overall mean (every
    rank's rows under a process group)."""
    total, rows = 0.0, 0
    for yb, tb in batches:
        for y, t in zip(yb.split(1), tb.split(1)):
            total += float(nn.functional.mse_loss(y.float(), t.float()))
            rows += 1
    if distributed.active():  # every rank's rows (one collective of 2 numbers)
        both = distributed.all_sum(torch.tensor([total, float(rows)], dtype=torch.float64), "LLM-Barber's block error")
        total, rows = float(both[0]), int(round(float(both[1])))
    return total / max(rows, 1)


def barber_scores(dense_weight: torch.Tensor, grad_sq: torch.Tensor, metric: str) -> torch.Tensor:
    """WD: |W| * sqrt(mean G^2); W: |W|; D: sqrt(mean G^2)."""
    if metric == "W":
        return dense_weight.abs().float()
    if metric == "D":
        return grad_sq.sqrt()
    return dense_weight.abs().float() * grad_sq.sqrt()
