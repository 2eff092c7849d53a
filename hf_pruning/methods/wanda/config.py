"""Configuration of Wanda."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..masks.config import ONE_PASS_HELP, SparsityConfig


@dataclass
class WandaConfig(SparsityConfig):
    """Wanda (pruning by weights and activations), layer by layer on sparse-path inputs."""

    method: ClassVar[str] = "wanda"
    #: one line for the model card's "Method" section
    card_text: ClassVar[str] = (
        "Wanda: weights scored by |weight| x the norm of their input activation, the lowest per output row "
        "set to zero, layer by layer on already-pruned inputs."
    )
    one_pass: bool = field(default=True, metadata={"help": ONE_PASS_HELP})
