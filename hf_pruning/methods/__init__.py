"""Pruning methods: one folder each. Importing a folder registers its method (one line per method here)."""

from .finercut import FinerCutConfig
from .flap import FLAPConfig
from .gradmap import GradMAPConfig
from .harp import HARPConfig
from .heads import HeadsConfig
from .llm_barber import LLMBarberConfig
from .magnitude import MagnitudeConfig
from .plan import PlanConfig
from .shortgpt import ShortGPTConfig
from .sleb import SLEBConfig
from .sparsegpt import SparseGPTConfig
from .taylor import TaylorConfig
from .wanda import WandaConfig

__all__ = ["FLAPConfig", "FinerCutConfig", "GradMAPConfig", "HARPConfig", "HeadsConfig", "LLMBarberConfig", "MagnitudeConfig", "PlanConfig", "SLEBConfig", "ShortGPTConfig", "SparseGPTConfig", "TaylorConfig", "WandaConfig"]
