"""LLM-Barber: rebuild the sparsity mask block by block, scoring weights by |W| x gradient of the block error."""

from .config import BarberConfig
from .pruner import run_llm_barber

__all__ = ["BarberConfig", "run_llm_barber"]
