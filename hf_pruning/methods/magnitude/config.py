"""Configuration of magnitude pruning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..masks.config import SparsityConfig


@dataclass
class MagnitudeConfig(SparsityConfig):
    """Zero the smallest-magnitude weights of every decoder-layer linear (per matrix, or per N:M group)."""

    method: ClassVar[str] = "magnitude"
    #: one line for the model card's "Method" section
    card_text: ClassVar[str] = "Magnitude pruning: the smallest weights of every decoder linear set to zero."
