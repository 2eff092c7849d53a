"""LLM-Barber: rebuild the sparsity mask block by block, scoring weights by |W| x gradient of the block error."""

from .config import LLMBarberConfig
from .pruner import run_llm_barber

__all__ = ["LLMBarberConfig", "run_llm_barber"]
