"""The depth-method family (FinerCut, ShortGPT, SLEB, Taylor, GradMAP): what they share.

- :mod:`.candidates`: removable pieces of a decoder layer, the parameters they free, the plan that removes them;
- :mod:`.runner`: the layer runner that scores removals with the plan's own drop ops;
- :mod:`.config`: :class:`DepthConfig`, the budget, order and compensation fields every depth method has;
- :mod:`.budget`: budgets resolved to a number of removals, a given order cut to the budget;
- :mod:`.compensation`: GradMAP's stage 2, a fused projection after any depth method;
- :mod:`.method`: the search-or-order -> result body, once; :func:`register_depth_method`;
- :mod:`.ranks`: data parallel (``engine.distributed``): this rank's row and token counts made every rank's.

A method folder holds its config (a :class:`DepthConfig`) and its search, registered with
``register_depth_method(name, config_class, search)``.
"""

from ...accounting import params_of, removal_params
from .budget import Budget, config_budget, removal_from_order, resolve_budget
from .candidates import KINDS, Candidate, candidates_for, named_candidates, plan_for
from .compensation import fit_compensation
from .config import DEFAULT_FRACTION, DepthConfig
from .method import MIN_TOKENS, check_search_rows, depth_result, register_depth_method
from .runner import DepthRunner, head_logits, layers_return_tuple, skipping

__all__ = ["DEFAULT_FRACTION", "KINDS", "MIN_TOKENS", "Budget", "Candidate", "DepthConfig", "DepthRunner",
           "candidates_for", "check_search_rows", "config_budget", "depth_result", "fit_compensation", "head_logits",
           "layers_return_tuple", "named_candidates", "params_of", "plan_for", "register_depth_method",
           "removal_from_order", "removal_params", "resolve_budget", "skipping"]
