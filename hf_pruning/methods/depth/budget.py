"""Budgets of the depth methods: how many candidates go, and the prefix of a given removal order that is taken."""

from __future__ import annotations

from dataclasses import dataclass

from ...accounting import params_of, removal_params
from .candidates import Candidate, candidates_for, named_candidates
from .config import DepthConfig


@dataclass
class Budget:
    """A resolved budget: stop after ``steps`` removals, or once ``param_ratio`` of the parameters is gone."""

    steps: int
    param_ratio: float | None
    freed: dict
    total: int

    def stop(self, removed: list[Candidate]) -> bool:
        if self.param_ratio is None:
            return len(removed) >= self.steps
        return params_of(removed, self.freed) >= self.param_ratio * self.total

    def prefix(self, order: list[Candidate]) -> int:
        """How many of ``order``'s first candidates this budget removes."""
        for k in range(1, min(len(order), self.steps) + 1):
            if self.stop(order[:k]):
                return k
        raise ValueError(f"{len(order)} removals in order do not reach the budget "
                         f"(param_ratio={self.param_ratio}); choose a smaller ratio")


def resolve_budget(model, candidates: list[Candidate], num_removals: int | None, param_ratio: float | None,
                   fraction: float | None = None, what: str = "sublayer") -> Budget:
    """Turn a budget into a step count (and a parameter target), refusing budgets that empty the model."""
    freed, total = removal_params(model)
    available = len(candidates)
    if not available:
        raise ValueError(f"the model has no {what} left to remove")
    if param_ratio is not None:
        # at most every candidate but one can go: the smallest one stays at best
        smallest = min(params_of([c], freed) for c in candidates)
        reachable = (params_of(candidates, freed) - smallest) / total
        if param_ratio > reachable:
            raise ValueError(f"param_ratio={param_ratio} would need every {what} removed (all but one free at most "
                             f"{reachable:.1%} of decoder parameters); choose a smaller ratio")
        return Budget(available - 1, param_ratio, freed, total)
    steps = num_removals if num_removals is not None else int(available * fraction)
    if steps >= available:
        raise ValueError(f"removing {steps} of {available} {what}s would remove every {what} (more removals than "
                         f"candidates); ask for fewer than {available}")
    if steps < 1:
        raise ValueError(f"a ratio of {fraction} removes no {what} out of {available}; raise it to at least "
                         f"{1 / available:.3f}")
    return Budget(steps, None, freed, total)


def config_budget(model, config: DepthConfig, candidates: list[Candidate]) -> Budget:
    """``config``'s budget over ``candidates``: ``param_ratio``, ``num_removals`` or a fraction of the candidates
    (:meth:`DepthConfig.candidate_fraction`)."""
    what = "block" if config.candidate_granularity() == "block" else "sublayer"
    return resolve_budget(model, candidates, config.num_removals, config.param_ratio, config.candidate_fraction(),
                          what=what)


def removal_from_order(model, config: DepthConfig) -> list[Candidate]:
    """The candidates ``config.order`` names, cut to the budget (all of them when no budget is given)."""
    order = named_candidates(model, config.order, "order", "pass an order found on this model")
    if all(v is None for v in config._budgets().values()):
        return order
    budget = config_budget(model, config, candidates_for(model, config.candidate_granularity()))
    return order[:budget.prefix(order)]
