"""Configuration of the ``plan`` method."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ...config import PruningConfig
from ...plan import PruningPlan


@dataclass
class PlanConfig(PruningConfig):
    """Apply ``plan`` as given: a dict, a list of ops, or a :class:`PruningPlan`."""

    method: ClassVar[str] = "plan"
    #: one line for the model card's "Method" section
    card_text: ClassVar[str] = "A hand-written pruning plan."
    plan: dict = field(default_factory=dict, metadata={"help": "the pruning plan (JSON ops) to apply"})

    def __post_init__(self):
        super().__post_init__()  # field types first
        # parse now so that a bad plan fails at construction, with the plan parser's message
        parsed = PruningPlan.from_dict(self.plan)
        self.plan = parsed.to_dict()
        self._parsed = parsed
