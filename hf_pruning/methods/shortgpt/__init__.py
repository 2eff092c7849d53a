"""ShortGPT: remove the decoder blocks whose output is most similar to their input (lowest Block Influence)."""

from .config import ShortGPTConfig
from .pruner import block_influence, run_shortgpt

__all__ = ["ShortGPTConfig", "block_influence", "run_shortgpt"]
