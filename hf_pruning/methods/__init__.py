"""Pruning methods: one folder each. Importing a folder registers its method (one line per method here)."""

from .finercut import FinerCutConfig
from .gradmap import GradMAPConfig
from .llm_barber import BarberConfig
from .magnitude import MagnitudeConfig
from .manual import PlanConfig
from .shortgpt import ShortGPTConfig
from .sleb import SLEBConfig
from .sparsegpt import SparseGPTConfig
from .taylor import TaylorConfig
from .wanda import WandaConfig

__all__ = ["BarberConfig", "FinerCutConfig", "GradMAPConfig", "MagnitudeConfig", "PlanConfig", "SLEBConfig", "ShortGPTConfig", "SparseGPTConfig", "TaylorConfig", "WandaConfig"]
