"""Configuration of ShortGPT."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..depth import DepthConfig


@dataclass
class ShortGPTConfig(DepthConfig):
    """ShortGPT (Block Influence, one shot). Budget: ``param_ratio``, ``num_removals`` (blocks), default
    ``DEFAULT_FRACTION`` of the blocks."""

    method: ClassVar[str] = "shortgpt"
