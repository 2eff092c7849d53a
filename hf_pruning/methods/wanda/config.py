"""Configuration of Wanda."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..layerwise import SparsityConfig


@dataclass
class WandaConfig(SparsityConfig):
    """Wanda (pruning by weights and activations), layer by layer on sparse-path inputs."""

    method: ClassVar[str] = "wanda"
