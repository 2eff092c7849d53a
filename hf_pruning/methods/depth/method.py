"""What every depth method does around its search, written once: a given ``order`` replaces the search, and the
removal set becomes the result (removal ops, the optional compensation, the order in the record).

A depth method is its config class plus a *search* ``search(model, config, calibration) -> (removed, report)``;
:func:`register_depth_method` turns it into a registered method.
"""

from __future__ import annotations

from typing import Callable

import torch

from ...accounting import params_of, removal_params
from ...registry import PruningResult, register_method
from .budget import removal_from_order
from .candidates import Candidate, plan_for
from .compensation import fit_compensation
from .config import DepthConfig
from .ranks import total_count

#: shortest calibration row a search accepts (FinerCut's fast search screens on a prefix of it)
MIN_TOKENS = 16

#: ``search(model, config, calibration) -> (removed, report)``: the candidates to remove in removal order and
#: the search's report (its cost under ``"search"``)
DepthSearch = Callable[[torch.nn.Module, DepthConfig, torch.Tensor], tuple[list[Candidate], dict]]


def check_search_rows(calibration: torch.Tensor) -> None:
    """Depth searches score whole rows: refuse rows too short to say anything about the output."""
    if calibration is None or calibration.ndim != 2 or calibration.shape[0] < 1:
        raise ValueError("calibration must be token ids [n_samples, seq_len]; build them with "
                         "hf_pruning.calibration.build_calibration(tokenizer, n_samples=8, seq_len=256)")
    if calibration.shape[1] < MIN_TOKENS:
        raise ValueError(f"calibration rows of {calibration.shape[1]} tokens are too short to score a removal "
                         f"(need at least {MIN_TOKENS}); build longer rows, e.g. build_calibration(..., seq_len=256)")


def depth_result(model, config: DepthConfig, removed: list[Candidate], calibration, report: dict,
                 compensation_calibration=None) -> PruningResult:
    """The PruningResult of a depth method: removal ops, the optional compensation (fitted on
    ``compensation_calibration`` when given, else on ``calibration``), the order in the record."""
    plan = plan_for(model, removed)
    if config.compensate:
        fit_on = compensation_calibration if compensation_calibration is not None else calibration
        if fit_on is None:
            raise ValueError("compensate=True fits on calibration data: pass calibration token ids")
        ops, report["compensation"] = fit_compensation(model, removed, fit_on, config.ridge, config.solver)
        report["compensation"]["calibration_tokens"] = total_count(fit_on.numel(), "calibration tokens")
        plan.ops.extend(ops)
    freed, total = removal_params(model)
    order = [str(c) for c in removed]
    report.update({"order": order, "removed_params": params_of(removed, freed),
                   "removed_param_fraction": params_of(removed, freed) / total})
    return PruningResult(plan=plan, report=report, record={**config.to_dict(), "order": order})


def register_depth_method(name: str, config_class: type[DepthConfig], search: DepthSearch) -> Callable:
    """Register the depth method ``name``: ``config_class`` plus its ``search``. Returns the method's run function
    ``run(model, config, calibration, compensation_calibration=None) -> PruningResult``; the last argument is the
    method input that ``DepthConfig.inputs`` declares."""

    def run(model, config: DepthConfig, calibration, compensation_calibration=None) -> PruningResult:
        if config.order is not None:
            removed, report = removal_from_order(model, config), {"search": None}
        else:
            removed, report = search(model, config, calibration)
        return depth_result(model, config, removed, calibration, report, compensation_calibration)

    run.__name__ = run.__qualname__ = f"run_{name}"
    run.__doc__ = f"Prune ``model`` with {config_class.__name__}: its search (or a given order), then the result."
    return register_method(name, config_class)(run)
