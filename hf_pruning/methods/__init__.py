"""Pruning methods: one folder each. Importing a folder registers its method (one line per method here)."""

from .llm_barber import BarberConfig
from .magnitude import MagnitudeConfig
from .manual import PlanConfig
from .sparsegpt import SparseGPTConfig
from .wanda import WandaConfig

__all__ = ["BarberConfig", "MagnitudeConfig", "PlanConfig", "SparseGPTConfig", "WandaConfig"]
