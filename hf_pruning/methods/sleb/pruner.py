"""SLEB's search: FinerCut's greedy engine on block candidates, perplexity as the score."""

from __future__ import annotations

import torch

from ..depth import Candidate, register_depth_method
from ..finercut.pruner import greedy_search
from .config import SLEBConfig


def sleb_search(model, config: SLEBConfig, calibration: torch.Tensor) -> tuple[list[Candidate], dict]:
    """The greedy search of :meth:`SLEBConfig.as_finercut`: the removal set and FinerCut's report."""
    return greedy_search(model, config.as_finercut(), calibration)


run_sleb = register_depth_method("sleb", SLEBConfig, sleb_search)
