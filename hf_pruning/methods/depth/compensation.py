"""GradMAP's stage 2, usable after any depth method: a d x d projection that pulls the pruned model's hidden
states back toward the dense ones at the kept layer whose output drifted most, fused into that layer's MLP.

With the removals decided (not yet applied), the dense and the pruned residual stream run in lockstep on the
calibration rows, layer at a time and batch at a time (:class:`.compensation_streams.Lockstep`: each layer
onloaded once per pass, activations in the engine's store). A kept layer's pruned output feeds the next kept layer
(or the final norm); in the dense model that consumer receives the dense stream after any removed blocks in
between, ``D_j``. One pass (each layer run once per stream) keeps running float64 moments, which give every kept
layer's first-moment shift ``|| mean_tokens(H_pruned_j) - mean_tokens(D_j) ||_2`` (relative to the dense states'
mean norm) as soon as the pass reaches ``D_j``; a layer whose shift ranks among the ``SHORTLIST`` largest so far
gets its float64 ``d x d`` sufficient statistics per fold of rows (:class:`.compensation_fit.FitStats`)
accumulated from the stored streams there and then (no layer runs twice); the layer ``j`` whose fit beats the
identity by the widest margin on held-out folds is chosen (with a given ``ridge``: the largest shift, the paper's rule). The
fit's data may be its own set (``compensation_calibration`` of ``prune_``). Its output is ``H = r + a`` with ``a``
the MLP's residual contribution (the attention's where FinerCut dropped the MLP of that layer); the fit finds

    P = argmin  sum_tokens || P a - b ||^2 + lam || P - I ||_F^2,   b = D_j - r

i.e. ``P = (B A^T + lam I)(A A^T + lam I)^-1`` in float64 (``A``, ``B``: ``[d, tokens]``), with
``lam = ridge * trace(A A^T) / d`` so the ridge strength is scale free. Without a given ``ridge`` it is chosen
from ``RIDGE_GRID`` by K-fold held-out error (``K = min(rows, 8)`` folds of rows: leave one row out up to 8
rows). ``solver="adam"`` minimises the same objective iteratively from ``P = I`` on the same statistics. No
``[tokens, d]`` matrix over all rows is ever formed. The result is an ``add_linear`` op: folded into ``down_proj``
(``W <- P W``, ``b <- P b``) wherever the contribution is a plain linear output, so inference costs nothing
and the model stays stock; on Gemma2 (post-norm) it becomes a module after the norm (remote code).
"""

from __future__ import annotations

import logging
import math
import time

import torch

from ...engine import ActivationStore, calibration_mode, distributed
from ...plan import AddLinear, RemoveLayers
from ...remote.hf_pruning_surgery import adapter_for, inspect_model
from .candidates import Candidate, plan_for
from .compensation_fit import (
    FitStats,
    adam_from_stats,
    choose_ridge_from_stats,
    fit_error,
    solve_from_stats,
)
from .compensation_streams import MAX_FOLDS, Lockstep, fold_count

logger = logging.getLogger(__name__)

SOLVERS = ("closed_form", "adam")
#: ridge strengths tried when none is given: the one with the lowest held-out error (K folds of rows) wins
RIDGE_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
#: kept layers (largest shift first) whose fits are validated when the ridge is chosen from the data
SHORTLIST = 8
#: groups of the folds for the shortlist's screening (fold f in group f % SCREEN_FOLDS, i.e. row s in s % 4)
SCREEN_FOLDS = 4

__all__ = ["MAX_FOLDS", "RIDGE_GRID", "SCREEN_FOLDS", "SHORTLIST", "SOLVERS", "adam_projection", "choose_ridge",
           "fit_compensation", "solve_projection"]


# ----- the fit on explicit matrices (small inputs and tests; the method itself streams statistics) -----------
def _stats_of(a: torch.Tensor, b: torch.Tensor, folds: torch.Tensor, dtype: torch.dtype) -> FitStats:
    """:class:`FitStats` of ``a``, ``b`` ``[tokens, d]`` with token ``t`` in fold ``folds[t]``."""
    ids = folds.unique()
    stats = FitStats.zeros(len(ids), a.shape[1], a.device, dtype)
    for f, fold in enumerate(ids.tolist()):
        held = folds == fold
        stats.add(f, a[held], b[held])
    return stats


def solve_projection(a: torch.Tensor, b: torch.Tensor, ridge: float) -> tuple[torch.Tensor, dict]:
    """Closed-form ridge fit of ``P`` with ``P a ≈ b`` around the identity; ``a``, ``b``: ``[tokens, d]``.
    The report has the system's condition number and the Gram matrix's rank."""
    a, b = a.double(), b.double()
    return solve_from_stats(a.T @ a, b.T @ a, ridge)


def choose_ridge(a: torch.Tensor, b: torch.Tensor, sample_of: torch.Tensor, max_folds: int | None = None,
                 dtype: torch.dtype = torch.float64) -> tuple[float, dict]:
    """The ridge of ``RIDGE_GRID`` with the lowest held-out error of ``P a ≈ b`` leaving out one sample at a
    time; ``math.inf`` (``P = I``, no compensation) when the identity's error on the held-out rows is lower still.

    ``sample_of`` ``[tokens]`` names each token's calibration row; with a single row, its two halves are the
    folds. ``max_folds`` groups the rows into at most that many folds (row ``s`` in fold ``s % max_folds``);
    ``dtype`` is the statistics' precision."""
    folds = sample_of.clone() if max_folds is None else sample_of % max_folds
    if int(folds.max()) == 0:
        folds[folds.numel() // 2:] = 1
    return choose_ridge_from_stats(_stats_of(a, b, folds, dtype), RIDGE_GRID)


def adam_projection(a: torch.Tensor, b: torch.Tensor, ridge: float, steps: int = 300, lr: float = 1e-3) -> torch.Tensor:
    """The same objective minimised with Adam from the identity (float32, full batch, on ``a^T a``, ``b^T a``)."""
    a, b = a.double(), b.double()
    return adam_from_stats(a.T @ a, b.T @ a, float(a.shape[0]), ridge, steps, lr)


# ----- the method ---------------------------------------------------------------------------------------------
def _layout(model, removed: list[Candidate]) -> tuple[list[int], dict[int, set[str]], dict[int, str], dict[int, int]]:
    """Layers removed whole, the dropped sublayers per layer, the carrier sublayer of each kept layer that has
    one (the MLP, or the attention where the MLP is gone) and what each kept layer's output feeds."""
    adapter = adapter_for(model)
    layers = adapter.decoder_layers(model)
    if any(adapter.residual_norms(layer) for layer in layers):
        raise ValueError("compensation needs residual sublayers added after their norms; this model keeps a "
                         "norm after the residual add (OPT with do_layer_norm_before=False): use compensate=False")
    whole = next((op.layers for op in plan_for(model, removed).ops if isinstance(op, RemoveLayers)), [])
    kept = [i for i in range(len(layers)) if i not in whole]
    parts: dict[int, set[str]] = {}
    for c in removed:
        parts.setdefault(c.layer, set()).update(c.parts)
    gone = {(i, part) for i, p in parts.items() for part in p}
    # sublayers an earlier pruning step already dropped carry nothing either
    gone |= {(i, part) for i, state in enumerate(inspect_model(model))
             for part, present in (("attention", state.attention != "none"), ("mlp", state.mlp != "none")) if not present}
    carrier = {i: "mlp" if (i, "mlp") not in gone else "attention" for i in kept if (i, "attention") not in gone
               or (i, "mlp") not in gone}
    # what the pruned output of kept layer i feeds: the next kept layer (or the final norm), which in the
    # dense model receives the dense stream at that point (after the removed blocks in between)
    feeds = {i: next((k for k in kept if k > i), len(layers)) for i in kept}
    return whole, parts, carrier, feeds


def _shift(moments: tuple[dict, dict, dict], i: int, at: int, relative: bool) -> float:
    """First-moment drift ``|| mean(pruned output of i) - mean(dense stream at at) ||_2`` of kept layer ``i``
    whose output feeds ``at``; ``relative`` divides by the dense states' mean token norm, so layers deep in the
    stream (whose hidden states are larger) do not win by scale alone."""
    dense_mean, pruned_mean, dense_norm = moments
    drift = float(torch.linalg.vector_norm(pruned_mean[i + 1] - dense_mean[at]))
    return drift / max(dense_norm[at], 1e-12) if relative else drift


class _Shortlist:
    """The ``size`` usable kept layers with the largest shifts, built as the pass reaches each layer's fit data
    (in layer order), with their fit statistics.

    A layer enters when its shift ranks among the ``size`` largest so far (ties: the lower layer), pushing out
    the lowest; only then are its statistics accumulated. They wait in an :class:`ActivationStore` (CPU, or disk
    in ``folder``) until the pass ends, when the members are known: exactly those of ranking every shift first.
    Then (``validate``) each member, in layer order, is screened (its best held-out error over the identity's on
    ``SCREEN_FOLDS`` groups of folds) and the lowest ratio wins (ties: the lower layer); without ``validate`` (a
    fixed ridge: ``size`` 1) the one member is chosen. On the device: the statistics screened and the best so far.

    Under a process group the shifts come from moments summed over the ranks (every rank keeps the same
    members); the statistics stay per rank until :meth:`chosen` sums them (a member's screening groups, then the
    chosen member's folds)."""

    def __init__(self, size: int, feeds: dict[int, int], relative: bool, validate: bool, folder=None):
        self.size, self.feeds, self.relative, self.validate, self.folder = size, feeds, relative, validate, folder
        self.shifts: dict[int, float] = {}
        self.stats: dict[int, tuple[ActivationStore, torch.device]] = {}  # member -> its statistics
        self.fitted = 0  # layers whose statistics were accumulated (members at some point)

    def arrive(self, j: int, moments: tuple[dict, dict, dict], accumulate) -> None:
        """``j``'s fit data is complete: rank its shift, and accumulate its statistics when it enters."""
        self.shifts[j] = _shift(moments, j, self.feeds[j], self.relative)
        if self.shifts[j] <= 0:
            return
        ranked = sorted([*self.stats, j], key=lambda i: (-self.shifts[i], i))
        if j not in ranked[: self.size]:
            return
        for out in ranked[self.size :]:
            self.stats.pop(out)[0].close()
        stats = accumulate()
        self.fitted += 1
        store = ActivationStore(self.folder)
        for name in _STAT_FIELDS:
            store.append(getattr(stats, name))
        self.stats[j] = (store, stats.gram.device)

    def _load(self, j: int) -> FitStats:
        store, device = self.stats[j]
        return FitStats(*(store.get(k, device) for k in range(len(_STAT_FIELDS))))

    def chosen(self) -> tuple[int, FitStats, dict] | None:
        """The layer to compensate, its statistics (on its execution device) and the members' validated error
        ratios (None: no member)."""
        best: tuple[int, FitStats, float] | None = None
        validation = {}
        for j in sorted(self.stats):
            stats, gain = self._load(j), 0.0
            if self.validate:
                _, screen = choose_ridge_from_stats(stats.grouped(SCREEN_FOLDS).reduced(), RIDGE_GRID)
                gain = min(screen["ridge_validation_mse"].values()) / max(screen["identity_validation_mse"], 1e-300)
                validation[j] = gain
            if best is None or gain < best[2]:
                best = (j, stats, gain)
        return None if best is None else (best[0], best[1].reduced(), validation)

    def close(self) -> None:
        """Drop every member's stored statistics."""
        for store, _ in self.stats.values():
            store.close()
        self.stats = {}


#: the tensors of a :class:`FitStats`, in its constructor's order
_STAT_FIELDS = ("gram", "cross", "b_sq", "identity_sq", "drift_sq", "tokens")


def _projection(stats: FitStats, j: int, ridge: float, solver: str, steps: int) -> tuple[torch.Tensor, dict, float, float]:
    """The fitted ``P`` ``[d, d]`` (float64) from ``stats``, the solver's report and the hidden-state MSE
    before and after."""
    gram, cross, b_sq, tokens = stats.total()
    if solver == "adam":
        p, info = adam_from_stats(gram, cross, tokens, ridge, steps), {}
    else:
        p, info = solve_from_stats(gram, cross, ridge)
    elements = max(tokens * gram.shape[0], 1.0)
    before = float(stats.drift_sq.sum()) / elements
    after = fit_error(p, gram, cross, b_sq) / elements
    if info.get("condition", 0) > 1e12:
        logger.warning("the compensation system at layer %d is ill-conditioned (cond %.2e); the ridge term keeps "
                       "it solvable: raise ridge for a more conservative fit", j, info["condition"])
    return p.cpu(), info, before, after


def fit_compensation(model, removed: list[Candidate], calibration: torch.Tensor, ridge: float | None = None,
                     solver: str = "closed_form", steps: int = 300, relative: bool = True,
                     store_folder: str | bool | None = None) -> tuple[list, dict]:
    """The ``add_linear`` op (in a list; empty when nothing can be compensated) and a report.

    ``removed`` are the candidates the depth method chose; the op's layer index is that of the pruned model
    (after the plan's ``remove_layers``), so the op goes after the removal ops. ``store_folder``: keep the
    streams' activations on disk there (``True``: a temporary folder). Under a process group ``calibration`` is
    this rank's share of the rows: the moments and statistics are summed over the ranks before each decision
    (:class:`Lockstep`, :meth:`_Shortlist.chosen`) and rank 0's ``P`` is sent to the others.
    """
    start = time.perf_counter()
    if not removed:
        return [], {"skipped": "nothing was removed"}
    whole, parts, carrier, feeds = _layout(model, removed)
    with calibration_mode(model):
        walk = Lockstep(model, calibration, parts, whole, store_folder)
        shortlist = _Shortlist(SHORTLIST if ridge is None else 1, feeds, relative, ridge is None, store_folder)
        try:
            moments = walk.walk(carrier, feeds, shortlist.arrive)
            best = shortlist.chosen()
        finally:
            shortlist.close()
        shifts = {i: _shift(moments, i, at, relative) for i, at in feeds.items()}
        if best is None:
            return [], {"skipped": "no kept layer with a sublayer left drifted from the dense model",
                        "shifts": shifts}
        j, stats, validation = best
        report = {"folds": fold_count(walk.rows), "fitted_layers": shortlist.fitted}
        if ridge is None:
            ridge, chosen = choose_ridge_from_stats(stats, RIDGE_GRID)
            report.update(chosen, validated_error_ratio=validation)
        if math.isinf(ridge):
            logger.warning("compensation skipped: at layer %d no ridge fit beats the identity on held-out "
                           "calibration rows (more calibration tokens may help)", j)
            return [], {"skipped": "no ridge fit beats the identity on held-out calibration rows",
                        "layer": j, "shifts": shifts, **report, "compensation_s": time.perf_counter() - start,
                        "layer_forwards": walk.layer_forwards}
        p, info, before, after = _projection(stats, j, ridge, solver, steps)
        distributed.broadcast_(p, 0, "the compensation projection")  # bit for bit the same weights on every rank
    new_index = j - sum(1 for i in whole if i < j)
    op = AddLinear(layer=new_index, sublayer=carrier[j], bias=False, tensors={"weight": p.float()})
    report.update({"layer": j, "pruned_layer_index": new_index, "sublayer": carrier[j], "shift": shifts[j],
                   "shifts": shifts, "solver": solver, "ridge": ridge, "mse_before": before, "mse_after": after,
                   "compensation_s": time.perf_counter() - start, "layer_forwards": walk.layer_forwards, **info})
    logger.info("compensation at layer %d (shift %.3g): hidden-state MSE %.4g -> %.4g", j, shifts[j], before, after)
    return [op], report
