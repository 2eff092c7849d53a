"""Input moments of chosen linears over calibration data, from ordinary full-model forwards with hooks."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..engine import calibration_mode, hooks


@dataclass
class Moments:
    """Per input channel: token count, sum and sum of squares (float64), accumulated over calibration tokens."""

    count: int
    total: torch.Tensor  # [in]
    squares: torch.Tensor  # [in]

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count

    @property
    def variance(self) -> torch.Tensor:
        """Unbiased variance of each channel over all tokens."""
        return ((self.squares - self.count * self.mean.pow(2)) / max(self.count - 1, 1)).clamp_min(0)

    @property
    def norm(self) -> torch.Tensor:
        """L2 norm of each channel over all tokens (Wanda's ``||X_j||``)."""
        return self.squares.sqrt()


@contextlib.contextmanager
def swapped_layers(layers: nn.ModuleList, replacements: dict[int, nn.Module]):
    """Decoder layers ``replacements`` (index -> module) stand in for the originals for the duration."""
    saved = {i: layers[i] for i in replacements}
    try:
        for i, module in replacements.items():
            layers[i] = module
        yield layers
    finally:
        for i, module in saved.items():
            layers[i] = module


@torch.no_grad()
def input_moments(model, calibration: torch.Tensor, linears: dict, batch_size: int = 4,
                  progress: bool = False) -> dict:
    """One forward over ``calibration`` ``[n, T]`` collecting the input moments of every module in ``linears``
    (any key -> module); returns key -> :class:`Moments`."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    stats: dict = {}

    def record(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()  # [tokens, in]
            m = stats.get(name)
            if m is None:
                stats[name] = Moments(x.shape[0], x.sum(0), x.pow(2).sum(0))
            else:
                m.count += x.shape[0]
                m.total += x.sum(0)
                m.squares += x.pow(2).sum(0)

        return hook

    with calibration_mode(model), hooks() as handles:
        for name, lin in linears.items():
            handles.append(lin.register_forward_pre_hook(record(name)))
        batches = range(0, calibration.shape[0], batch_size)
        for i in tqdm(batches, desc="activation statistics", unit="batch", disable=not progress):
            model(calibration[i : i + batch_size].to(device), use_cache=False)
    return stats
