"""Configuration of the SLEB-style baseline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ...config import ConfigError
from ..depth import DepthConfig
from ..finercut.search import MODES


@dataclass
class SLEBConfig(DepthConfig):
    """Greedy whole-block removal by calibration perplexity, re-scored after every removal.

    Budget: ``param_ratio`` or ``num_removals`` (blocks); default 25% of the blocks.
    """

    method: ClassVar[str] = "sleb"
    search: str = field(default="exact", metadata={
        "help": "exact (cached residual stream, same choices as naive) or naive (a full forward per candidate)"})

    def __post_init__(self):
        super().__post_init__()
        if self.search not in MODES or self.search == "fast":
            raise ConfigError(f"search must be 'exact' or 'naive', got {self.search!r}")
