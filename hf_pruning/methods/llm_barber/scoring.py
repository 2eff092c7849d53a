"""LLM-Barber's block error gradients (tensor math on one block; no hooks, no model knowledge)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def block_gradient_sq(dense_forward: Callable[[torch.Tensor], torch.Tensor], weights: dict[str, nn.Parameter],
                      inputs: list[torch.Tensor], targets: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean over samples of G_n^2, with G_n = d MSE(target_n, dense_forward(input_n)) / dW at the dense W.

    ``inputs`` are the block's sparse-path inputs ``[1, T, d]``, ``targets`` the sparse block's outputs.
    Only ``weights`` get gradients.
    """
    acc = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()}
    with torch.enable_grad():
        for p in weights.values():
            p.requires_grad_(True)
        try:
            for x, y in zip(inputs, targets):
                loss = nn.functional.mse_loss(dense_forward(x.float()), y.float())
                grads = torch.autograd.grad(loss, list(weights.values()))
                for (name, _), g in zip(weights.items(), grads):
                    acc[name] += g.float().pow(2)
        finally:
            for p in weights.values():
                p.requires_grad_(False)
    return {name: a / max(len(inputs), 1) for name, a in acc.items()}


def barber_scores(dense_weight: torch.Tensor, grad_sq: torch.Tensor, metric: str) -> torch.Tensor:
    """WD: |W| * sqrt(mean G^2); W: |W|; D: sqrt(mean G^2)."""
    if metric == "W":
        return dense_weight.abs().float()
    if metric == "D":
        return grad_sq.sqrt()
    return dense_weight.abs().float() * grad_sq.sqrt()
