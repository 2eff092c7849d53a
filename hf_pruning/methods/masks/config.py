"""``SparsityConfig``: the fields every mask method shares (how much, and in which pattern)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ...config import ConfigError, PruningConfig, check_fraction
from .selection import parse_pattern

ONE_PASS_HELP = ("prune each linear on the statistics of its own input in the layer as pruned so far, group by "
                 "group as the forward reaches them (q/k/v, o, gate/up, down; o/down projections see the pruned "
                 "q/k/v and gate/up), batch by batch; False: the official two passes (statistics from the "
                 "unpruned layer, then a pass through the pruned one)")


@dataclass
class SparsityConfig(PruningConfig):
    """Fields shared by the mask methods. With an N:M pattern, ``sparsity`` becomes N/M."""

    method: ClassVar[str] = ""
    sparsity: float = field(default=0.5, metadata={"help": "fraction of each matrix's weights set to zero (0, 1)"})
    pattern: str = field(default="unstructured", metadata={"help": "'unstructured' or 'N:M' (N zeros in every M)"})

    def __post_init__(self):
        super().__post_init__()  # field types first
        nm = parse_pattern(self.pattern)
        if nm is None:
            check_fraction("sparsity", self.sparsity)
        else:
            # 0.5 is the field's default, so it cannot tell "not given" from "given": only other values conflict
            if self.sparsity not in (0.5, nm[0] / nm[1]):
                raise ConfigError(
                    f"sparsity={self.sparsity} contradicts pattern={self.pattern!r}, which zeroes {nm[0]}/{nm[1]} of "
                    "the weights; leave sparsity out (or give N/M) with an N:M pattern"
                )
            self.sparsity = nm[0] / nm[1]

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)
