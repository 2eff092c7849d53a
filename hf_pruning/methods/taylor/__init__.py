"""Taylor block importance (Shortened-LLaMA style): rank blocks once by sum |θ · dL/dθ|, remove the lowest."""

from .config import TaylorConfig
from .pruner import run_taylor

__all__ = ["TaylorConfig", "run_taylor"]
