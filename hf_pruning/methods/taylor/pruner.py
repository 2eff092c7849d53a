"""The Taylor baseline's search: GradMAP's gradient ranking with score "taylor", ranked once."""

from __future__ import annotations

import torch

from ..depth import Candidate, register_depth_method
from ..gradmap.pruner import rank_blocks
from .config import TaylorConfig


def taylor_search(model, config: TaylorConfig, calibration: torch.Tensor) -> tuple[list[Candidate], dict]:
    """Blocks ranked once by sum |θ · dL/dθ| (one backward pass), the lowest first, cut to the budget."""
    return rank_blocks(model, calibration, config, "taylor", "one_shot")


run_taylor = register_depth_method("taylor", TaylorConfig, taylor_search)
