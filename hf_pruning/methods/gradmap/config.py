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
    """GradMAP: remove the blocks with the smallest gradient score, then fuse a projection compensating the
    largest mean shift. The default score is the diagonal-Fisher (second-order) estimate of what removing each
    block's residual update costs, from one backward pass that ranks every block (``mode="one_shot"``);
    ``mode="iterative"`` re-scores after every removal. Budget: ``param_ratio`` or ``num_removals`` (blocks),
    default ``DEFAULT_FRACTION`` of the blocks. ``compensate=False`` gives stage 1 alone. Choices and measurements:
    docs/DEPTH-METHODS.md."""

    method: ClassVar[str] = "gradmap"
    #: one line for the model card's "Method" section
    card_text: ClassVar[str] = (
        "GradMAP: decoder layers ranked by a gradient-based importance (the first-order loss cost of removing "
        "each layer's residual update, from a backward pass of the language-model loss), then a d x d "
        "correction fitted on calibration data and fused into a kept layer's MLP output projection."
    )
    compensate: bool = field(default=True, metadata={
        "help": "stage 2: fit a d x d projection at a kept layer that drifted most (the validated best of the largest "
                "shifts), fused into its MLP"})
    score: str = field(default="fisher", metadata={"help": "grad (mean |dL/dθ|), taylor (sum |θ dL/dθ|), output (norm of dL/d block output), "
                "contribution (sum |dL/dh ⊙ (h_out - h_in)|: Taylor importance of the block's residual update) or "
                "fisher (sum (dL/dh ⊙ (h_out - h_in))^2: its diagonal-Fisher, second-order counterpart)"})
    mode: str = field(default="one_shot", metadata={
        "help": "one_shot (one backward pass ranks every block) or iterative (re-score the pruned model after "
                "every removal: one backward per decision)"})

    def __post_init__(self):
        super().__post_init__()
        if self.score not in SCORES:
            raise ConfigError(f"score must be one of {SCORES}, got {self.score!r}")
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
