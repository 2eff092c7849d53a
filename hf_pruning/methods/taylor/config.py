"""Configuration of the Taylor baseline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..depth import DepthConfig


@dataclass
class TaylorConfig(DepthConfig):
    """Taylor block importance, one shot (one backward pass). Budget: ``param_ratio`` or ``num_removals``
    (blocks), default ``DEFAULT_FRACTION`` of the blocks. ``compensate=True`` adds GradMAP's stage 2."""

    method: ClassVar[str] = "taylor"
    #: one line for the model card's "Method" section
    card_text: ClassVar[str] = (
        "Taylor block importance: each decoder layer scored by |weight x gradient| of the language-model "
        "loss, the lowest removed."
    )
