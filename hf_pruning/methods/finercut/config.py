"""Configuration of FinerCut."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ...config import ConfigError, check_fraction
from ..depth import DEFAULT_FRACTION, DepthConfig
from .metrics import METRICS
from .search import MODES

GRANULARITIES = ("sublayer", "attention", "mlp", "block")


@dataclass
class FinerCutConfig(DepthConfig):
    """FinerCut: greedily remove the attention/MLP sublayers whose removal changes the output distribution least.

    Budget: ``sublayer_ratio`` (fraction of the candidates, the paper's ratio; default ``DEFAULT_FRACTION`` when
    no budget is given), ``param_ratio`` (fraction of decoder-layer parameters, at least) or ``num_removals``.
    """

    method: ClassVar[str] = "finercut"
    #: one line for the model card's "Method" section
    card_text: ClassVar[str] = (
        "FinerCut: every attention and MLP sublayer is a candidate; greedily remove the one whose removal "
        "changes the output distribution least, re-scoring after each removal."
    )
    sublayer_ratio: float | None = field(default=None, metadata={
        "help": f"fraction of the candidates to remove (the paper's ratio); default {DEFAULT_FRACTION} without "
                "another budget"})
    granularity: str = field(default="sublayer", metadata={
        "help": "candidates: sublayer (attention and MLP), attention, mlp, or block (whole layers)"})
    metric: str = field(default="js_code", metadata={
        "help": "js_code (the official code's JS variant), js, kl, angular, norm or ppl"})
    search: str = field(default="exact", metadata={
        "help": "exact (same order as naive, less work), fast (screen on a token prefix, re-score the best) "
                "or naive (the official full forward per candidate)"})
    exclude_front: float = field(default=0.0, metadata={
        "help": "keep layers 0..int(L*x) out of the search until int(C*x)+1 removals were made, in [0, 1)"})
    one_shot: bool = field(default=False, metadata={"help": "score every candidate once and remove in ascending order"})
    screen_fraction: float = field(default=0.125, metadata={"help": "fast search: fraction of each row's tokens "
                                                                    "used to screen candidates"})
    rescore: int = field(default=3, metadata={"help": "fast search: candidates re-scored exactly per step"})
    cost_aware: bool = field(default=False, metadata={
        "help": "remove the candidate with the smallest score increase per freed parameter (an extension for "
                "parameter budgets; the paper removes the smallest score)"})

    def _budgets(self) -> dict:
        return {**super()._budgets(), "sublayer_ratio": self.sublayer_ratio}

    def candidate_granularity(self) -> str:
        return self.granularity

    def candidate_fraction(self) -> float | None:
        """``sublayer_ratio`` when given, else the depth methods' default."""
        return self.sublayer_ratio if self.sublayer_ratio is not None else super().candidate_fraction()

    def __post_init__(self):
        super().__post_init__()
        if self.sublayer_ratio is not None:
            check_fraction("sublayer_ratio", self.sublayer_ratio)
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.metric not in METRICS:
            raise ConfigError(f"unknown metric {self.metric!r}; choose one of {', '.join(METRICS)}")
        if self.search not in MODES:
            raise ConfigError(f"search must be one of {MODES}, got {self.search!r}")
        check_fraction("exclude_front", self.exclude_front, low_open=False)
        check_fraction("screen_fraction", self.screen_fraction, high_open=False)
        if isinstance(self.rescore, bool) or not isinstance(self.rescore, int) or self.rescore < 1:
            raise ConfigError(f"rescore must be a positive integer, got {self.rescore!r}")
