"""LLM-Barber's block error gradients (tensor math on one block; no hooks, no model knowledge)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def block_gradient_sq(dense_forward: Callable[[torch.Tensor], torch.Tensor], weights: dict[str, nn.Parameter],
                      inputs: list[torch.Tensor], targets: list[torch.Tensor],
                      dense_outputs: list | None = None) -> dict[str, torch.Tensor]:
    """Mean over samples of G_n^2, with G_n = d MSE(target_n, dense_forward(input_n)) / dW at the dense W.

    ``inputs`` are the block's sparse-path inputs ``[1, T, d]``, ``targets`` the sparse block's outputs.
    Only ``weights`` get gradients. ``dense_outputs``: a list that receives each ``dense_forward(input_n)``
    (detached, ``[1, T, d]``) for a later error comparison.
    """
    acc = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()}
    with torch.enable_grad():
        for p in weights.values():
            p.requires_grad_(True)
        try:
            for x, y in zip(inputs, targets):
                out = dense_forward(x.float())  # [1, T, d]
                if dense_outputs is not None:
                    dense_outputs.append(out.detach())
                loss = nn.functional.mse_loss(out, y.float())
                grads = torch.autograd.grad(loss, list(weights.values()))
                for (name, _), g in zip(weights.items(), grads):
                    acc[name] += g.float().pow(2)
        finally:
            for p in weights.values():
                p.requires_grad_(False)
    return {name: a / max(len(inputs), 1) for name, a in acc.items()}


@torch.no_grad()
def block_error(forward: Callable[[torch.Tensor], torch.Tensor], inputs: list[torch.Tensor],
                targets: list[torch.Tensor]) -> float:
    """Mean squared error between ``forward(input_n)`` and ``target_n`` over all samples (``[1, T, d]`` each,
    equal lengths, so the mean of the per-sample means is the overall mean)."""
    total = sum(float(nn.functional.mse_loss(forward(x).float(), y.float())) for x, y in zip(inputs, targets))
    return total / max(len(inputs), 1)


def barber_scores(dense_weight: torch.Tensor, grad_sq: torch.Tensor, metric: str) -> torch.Tensor:
    """WD: |W| * sqrt(mean G^2); W: |W|; D: sqrt(mean G^2)."""
    if metric == "W":
        return dense_weight.abs().float()
    if metric == "D":
        return grad_sq.sqrt()
    return dense_weight.abs().float() * grad_sq.sqrt()
