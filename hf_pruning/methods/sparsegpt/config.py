"""Configuration of SparseGPT."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ...config import ConfigError
from ..masks.config import ONE_PASS_HELP, SparsityConfig


@dataclass
class SparseGPTConfig(SparsityConfig):
    """SparseGPT, layer by layer on sparse-path inputs."""

    method: ClassVar[str] = "sparsegpt"
    #: one line for the model card's "Method" section
    card_text: ClassVar[str] = (
        "SparseGPT: weights removed column block by column block with an inverse-Hessian update of the "
        "remaining weights, layer by layer on already-pruned inputs."
    )
    blocksize: int = field(default=128, metadata={"help": "columns processed together (mask chosen per block)"})
    percdamp: float = field(default=0.01, metadata={"help": "Hessian dampening, a fraction of its mean diagonal"})
    one_pass: bool = field(default=True, metadata={"help": ONE_PASS_HELP})

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise ConfigError(f"blocksize must be a positive integer, got {self.blocksize!r}")
        if not 0 <= self.percdamp < 1:
            raise ConfigError(f"percdamp must be in [0, 1), got {self.percdamp!r}")
        nm = self.nm
        if nm is not None and self.blocksize % nm[1]:
            raise ConfigError(f"blocksize {self.blocksize} must be a multiple of M={nm[1]}")
