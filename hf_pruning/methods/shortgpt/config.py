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
    #: one line for the model card's "Method" section
    card_text: ClassVar[str] = (
        "ShortGPT: decoder layers ranked by block influence (1 - cosine similarity between a layer's input "
        "and output), the lowest removed in one shot."
    )
