"""Configuration of LLM-Barber."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ...config import ConfigError
from ..masks.config import ONE_PASS_HELP, SparsityConfig
from ..masks.selection import GRANULARITIES, NM_RULES

INITS = ("magnitude", "wanda", "sparsegpt", "existing")
METRICS = ("WD", "W", "D")


@dataclass
class LLMBarberConfig(SparsityConfig):
    """Rebuild the mask of a magnitude/Wanda/SparseGPT initial mask (or of an already sparse model)."""

    method: ClassVar[str] = "llm_barber"
    #: one line for the model card's "Method" section
    card_text: ClassVar[str] = (
        "LLM-Barber: the sparsity mask of an initial pruning rebuilt block by block, scoring weights by "
        "|weight| x the gradient of the block's output error and swapping pruned and kept weights."
    )
    init: str = field(default="wanda", metadata={"help": "initial mask: magnitude, wanda, sparsegpt, or existing "
                                                          "(the model's zeros; needs dense_reference)"})
    granularity: str = field(default="output1", metadata={"help": "swap groups: output1, input1, layer, block"})
    threshold: float = field(default=0.01, metadata={"help": "fraction of the beneficial swaps to make, in [0, 1]"})
    metric: str = field(default="WD", metadata={"help": "WD = |W| x RMS grad, W = |W|, D = RMS grad"})
    retain_reconstruction: bool = field(default=False, metadata={
        "help": "keep SparseGPT's updated values for weights that stay kept (default: dense values)"})
    nm_rule: str = field(default="pairs", metadata={
        "help": "N:M swaps: pairs (default: swap only where the regrown weight beats the one it replaces in its "
                "group) or row (the official rule: regrow by row rank, prune the group's lowest kept weight)"})
    reconstruct: bool = field(default=False, metadata={
        "help": "after the rebuild, update the kept weights for the new mask with SparseGPT's solver on the "
                "block's sparse-path inputs (an extension: the paper restores dense values)"})
    verify: bool = field(default=False, metadata={
        "help": "keep a block's rebuilt mask only when its output error on the calibration inputs is lower than "
                "the initial mask's, else restore the initializer's weights (an extension; costs one block "
                "forward, two with reconstruct)"})
    dense_reference: str | None = field(default=None, metadata={
        "help": "with init=existing: folder of the dense checkpoint, read one layer at a time"})
    one_pass: bool = field(default=True, metadata={"help": "Wanda / SparseGPT initializer: " + ONE_PASS_HELP})
    blocksize: int = field(default=128, metadata={"help": "SparseGPT initializer: columns per block"})
    percdamp: float = field(default=0.01, metadata={"help": "SparseGPT initializer: Hessian dampening"})

    def __post_init__(self):
        super().__post_init__()
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {INITS}, got {self.init!r}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.nm is not None and self.granularity != "output1":
            raise ConfigError(f"an N:M pattern keeps its groups along rows: use granularity='output1', "
                              f"not {self.granularity!r}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not 0 <= self.threshold <= 1:
            raise ConfigError(f"threshold must be a fraction in [0, 1], got {self.threshold!r}")
        if self.metric not in METRICS:
            raise ConfigError(f"metric must be one of {METRICS}, got {self.metric!r}")
        if self.nm_rule not in NM_RULES:
            raise ConfigError(f"nm_rule must be one of {NM_RULES}, got {self.nm_rule!r}")
        if self.reconstruct and self.retain_reconstruction:
            raise ConfigError("reconstruct=True recomputes the kept values; it cannot also retain_reconstruction: "
                              "pick one")
        if self.init == "existing" and not self.dense_reference:
            raise ConfigError("init='existing' rebuilds the model's own zeros against the dense weights: pass "
                              "dense_reference=<folder of the dense checkpoint>")
