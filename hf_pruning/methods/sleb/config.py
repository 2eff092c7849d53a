"""Configuration of the SLEB-style baseline."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

from ...config import ConfigError
from ..depth import DepthConfig
from ..finercut.config import FinerCutConfig
from ..finercut.search import MODES


@dataclass
class SLEBConfig(DepthConfig):
    """Greedy whole-block removal by calibration perplexity, re-scored after every removal.

    Budget: ``param_ratio`` or ``num_removals`` (blocks); default ``DEFAULT_FRACTION`` of the blocks.
    """

    method: ClassVar[str] = "sleb"
    #: one line for the model card's "Method" section
    card_text: ClassVar[str] = (
        "SLEB: decoder layers removed greedily, each time the one whose removal raises calibration perplexity "
        "least."
    )
    search: str = field(default="exact", metadata={
        "help": "exact (cached residual stream, same choices as naive) or naive (a full forward per candidate)"})

    def __post_init__(self):
        super().__post_init__()
        if self.search not in MODES or self.search == "fast":
            raise ConfigError(f"search must be 'exact' or 'naive', got {self.search!r}")

    def as_finercut(self) -> FinerCutConfig:
        """SLEB is FinerCut's greedy search on whole blocks scored by perplexity: that FinerCut config, with every
        field of this one (each is a FinerCut field too) and FinerCut's defaults for the rest."""
        return FinerCutConfig(granularity="block", metric="ppl", **{f.name: getattr(self, f.name) for f in fields(self)})
