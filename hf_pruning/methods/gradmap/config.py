"""Configuration of GradMAP."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ...config import ConfigError
from ..depth import DepthConfig
from .scoring import SCORES

MODES = ("iterative", "one_shot")


@dataclass
class GradMAPConfig(DepthConfig):
    """GradMAP: remove the blocks with the smallest gradient score (one backward pass per decision), then fuse
    a projection compensating the largest mean shift. Budget: ``param_ratio`` or ``num_removals`` (blocks),
    default 25% of the blocks. ``compensate=False`` gives stage 1 alone."""

    method: ClassVar[str] = "gradmap"
    compensate: bool = field(default=True, metadata={
        "help": "stage 2: fit a d x d projection at the kept layer that drifted most, fused into its MLP"})
    score: str = field(default="grad", metadata={"help": "grad (mean |dL/dθ|), taylor (sum |θ dL/dθ|) or output "
                                                         "(norm of dL/d block output)"})
    mode: str = field(default="iterative", metadata={
        "help": "iterative (re-score after every removal: one backward per decision) or one_shot (rank once)"})

    def __post_init__(self):
        super().__post_init__()
        if self.score not in SCORES:
            raise ConfigError(f"score must be one of {SCORES}, got {self.score!r}")
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
