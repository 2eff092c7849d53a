"""Perplexity on fixed token windows, deterministic, in float32 accumulation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = False) -> float:
    """exp(mean next-token NLL) over every window ``[n, seq_len]`` (each window scored independently)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for start in tqdm(range(0, windows.shape[0], batch_size), disable=not progress, desc="perplexity"):
            batch = windows[start : start + batch_size].to(device)  # [b, L]
            logits = model(batch, use_cache=False).logits[:, :-1].float()  # [b, L-1, V]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
            total += nll.item()
            count += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(total / count)
