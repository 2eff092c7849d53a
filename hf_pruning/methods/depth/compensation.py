"""GradMAP's stage 2, usable after any depth method: a d x d projection that pulls the pruned model's hidden
states back toward the dense ones at the kept layer whose output drifted most, fused into that layer's MLP.

With the removals decided (not yet applied), two layer runners give the dense and the pruned residual stream
on the calibration rows (one dense pass, at most one pruned pass). A kept layer's pruned output feeds the next
kept layer (or the final norm); in the dense model that consumer receives the dense stream after any removed
blocks in between, ``D_j``. The ``SHORTLIST`` kept layers with the largest first-moment shift
``|| mean_tokens(H_pruned_j) - mean_tokens(D_j) ||_2`` (relative to the dense states' mean norm) are fitted, and
the layer ``j`` whose fit beats the identity by the widest margin on held-out rows is chosen (with a given
``ridge``: the largest shift, the paper's rule). The fit's data may be its own set (``compensation_calibration``
of ``prune_``). Its
output is ``H = r + a`` with ``a`` the MLP's residual contribution (the attention's where FinerCut dropped the
MLP of that layer); the fit finds

    P = argmin  sum_tokens || P a - b ||^2 + lam || P - I ||_F^2,   b = D_j - r

i.e. ``P = (B A^T + lam I)(A A^T + lam I)^-1`` in float64 (``A``, ``B``: ``[d, tokens]``), with
``lam = ridge * trace(A A^T) / d`` so the ridge strength is scale free. Without a given ``ridge`` it is chosen
from ``RIDGE_GRID`` by leave-one-sample-out error. ``solver="adam"`` minimises the same
objective iteratively from ``P = I`` instead. The result is an ``add_linear`` op: folded into ``down_proj``
(``W <- P W``, ``b <- P b``) wherever the contribution is a plain linear output, so inference costs nothing
and the model stays stock; on Gemma2 (post-norm) it becomes a module after the norm (remote code).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch

from ...calibration import calibration_mode, hooks
from ...engine import run_layer
from ...plan import AddLinear, RemoveLayers
from ...remote.hf_pruning_surgery import adapter_for
from .candidates import Candidate, plan_for
from .runner import DepthRunner

logger = logging.getLogger(__name__)

SOLVERS = ("closed_form", "adam")
#: ridge strengths tried when none is given: the one with the lowest held-out error (leave one sample out) wins
RIDGE_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
#: kept layers (largest shift first) whose fits are validated when the ridge is chosen from the data
SHORTLIST = 8
#: folds of the shortlist's screening (rows grouped); the chosen layer's ridge is then picked leaving one row out
SCREEN_FOLDS = 4


def _contribution_module(adapter, layer, sublayer: str):
    """The module whose output is ``sublayer``'s contribution to the residual stream."""
    if adapter.uses_norm_target(sublayer):
        return getattr(layer, adapter.attn_out_norm if sublayer == "attention" else adapter.mlp_out_norm)
    return adapter.output_linear(layer, sublayer)


def _capture_contribution(handles: list, adapter, layer, sublayer: str, sink: list[torch.Tensor]) -> None:
    """Append ``sublayer``'s contribution ``[b, T, d]`` to ``sink`` on every forward of ``layer`` (hook in ``handles``)."""
    module = _contribution_module(adapter, layer, sublayer)
    handles.append(module.register_forward_hook(lambda m, args, out: sink.append(out.detach())))


def _mean_hidden(states: list[torch.Tensor]) -> torch.Tensor:
    """Mean over every token of every sample: ``n x [1, T, d] -> [d]`` (float64)."""
    return torch.cat([h.reshape(-1, h.shape[-1]) for h in states]).double().mean(0)


def _shift(pruned: list[torch.Tensor], dense: list[torch.Tensor], relative: bool) -> float:
    """First-moment drift ``|| mean(pruned) - mean(dense) ||_2``; ``relative`` divides by the dense states' mean
    token norm, so layers deep in the stream (whose hidden states are larger) do not win by scale alone."""
    drift = float(torch.linalg.vector_norm(_mean_hidden(pruned) - _mean_hidden(dense)))
    if not relative:
        return drift
    norms = torch.cat([torch.linalg.vector_norm(h.double().reshape(-1, h.shape[-1]), dim=-1) for h in dense])
    return drift / max(float(norms.mean()), 1e-12)


def _ridge_lambda(ridge: float, trace: float, d: int) -> float:
    """The scale-free ridge ``lam = ridge * tr(G) / d``; the raw strength when all contributions are zero."""
    lam = ridge * trace / d
    return lam if lam > 0 else ridge


def _ridge_solve(gram: torch.Tensor, cross: torch.Tensor, ridge: float) -> tuple[torch.Tensor, float]:
    """``P = (C + lam I)(G + lam I)^-1`` with ``lam = ridge * tr(G) / d``; ``gram`` G, ``cross`` C: ``[d, d]`` float64."""
    d = gram.shape[0]
    lam = _ridge_lambda(ridge, float(torch.trace(gram)), d)
    eye = torch.eye(d, dtype=torch.float64, device=gram.device)
    system = gram + lam * eye  # symmetric positive definite for lam > 0
    # P (G + lam I) = C + lam I  <=>  (G + lam I) P^T = (C + lam I)^T, solved by Cholesky
    return torch.cholesky_solve((cross + lam * eye).T, torch.linalg.cholesky(system)).T, lam


def solve_projection(a: torch.Tensor, b: torch.Tensor, ridge: float) -> tuple[torch.Tensor, dict]:
    """Closed-form ridge fit of ``P`` with ``P a ≈ b`` around the identity; ``a``, ``b``: ``[tokens, d]``.
    The report has the system's condition number and the Gram matrix's rank."""
    a, b = a.double(), b.double()
    gram = a.T @ a  # [d, d] = A A^T with A = a^T
    p, lam = _ridge_solve(gram, b.T @ a, ridge)  # cross: [d, d] = B A^T
    eig = torch.linalg.eigvalsh(gram).clamp_min(0)  # [d] ascending
    rank = int((eig > eig[-1] * gram.shape[0] * torch.finfo(torch.float64).eps).sum())
    cond = float((eig[-1] + lam) / (eig[0] + lam))
    return p, {"lambda": lam, "condition": cond, "gram_rank": rank}


def choose_ridge(a: torch.Tensor, b: torch.Tensor, sample_of: torch.Tensor, max_folds: int | None = None,
                 dtype: torch.dtype = torch.float64) -> tuple[float, dict]:
    """The ridge of ``RIDGE_GRID`` with the lowest leave-one-sample-out error of ``P a ≈ b``; ``math.inf``
    (``P = I``, no compensation) when the identity's error on the held-out rows is lower still.

    ``sample_of`` ``[tokens]`` names each token's calibration row; with a single row, its two halves are the
    folds. Small calibration sets need strong shrinkage toward the identity (a d x d fit from few tokens
    overfits), large ones little: this picks it from the data instead of a fixed default. ``max_folds`` groups
    the rows into at most that many folds (row ``s`` in fold ``s % max_folds``): a cheaper estimate, as is a
    ``dtype`` of float32 (screening only: the fit itself is float64).
    """
    folds = sample_of.clone() if max_folds is None else sample_of % max_folds
    if int(folds.max()) == 0:
        folds[folds.numel() // 2:] = 1
    a, b = a.to(dtype), b.to(dtype)
    errors = dict.fromkeys(RIDGE_GRID, 0.0)
    identity = float(((a - b) ** 2).sum()) / a.shape[0]  # P = I (ridge -> infinity) on every fold
    gram_all, cross_all = a.T @ a, b.T @ a  # [d, d] each; a fold's statistics are these minus its own rows'
    for f in folds.unique():
        held = folds == f
        a_h, b_h = a[held], b[held]  # [held, d]
        gram_h, cross_h = a_h.T @ a_h, b_h.T @ a_h  # [d, d] each: the held-out rows' statistics
        gram, cross = gram_all - gram_h, cross_all - cross_h  # [d, d] each: the fit's, shared by every ridge
        # one eigendecomposition G = Q diag(e) Q^T serves every ridge: P^T = Q diag(1/(e+lam)) M with
        # M = Q^T C^T + lam Q^T, so the held-out error ||a_h P^T - b_h||^2 needs d x d products only:
        # tr(M^T D K D M) - 2 tr(M^T D L) + ||b_h||^2 with D = diag(1/(e+lam)), K = Q^T G_h Q, L = Q^T C_h^T
        e, q = torch.linalg.eigh(gram)  # [d], [d, d]
        e = e.clamp_min(0)
        k, l_ = q.T @ gram_h @ q, q.T @ cross_h.T  # [d, d] each
        q_c = q.T @ cross.T  # [d, d]
        b_sq = float((b_h * b_h).sum())
        trace = float(e.sum())
        for ridge in RIDGE_GRID:
            lam = _ridge_lambda(ridge, trace, gram.shape[0])
            dinv = 1.0 / (e + lam)  # [d]
            m = q_c + lam * q.T  # [d, d]
            fit = float((((k * dinv[:, None] * dinv[None, :]) @ m) * m).sum())  # ||a_h P^T||^2
            cross_term = float(((dinv[:, None] * l_) * m).sum())  # <a_h P^T, b_h>
            errors[ridge] += max(fit - 2 * cross_term + b_sq, 0.0) / a.shape[0]
    best = min(errors, key=errors.get)
    if identity <= errors[best]:  # no fit generalises better than leaving the layer alone
        best = math.inf
    return best, {"ridge_validation_mse": errors, "identity_validation_mse": identity}


def adam_projection(a: torch.Tensor, b: torch.Tensor, ridge: float, steps: int = 300, lr: float = 1e-3) -> torch.Tensor:
    """The same objective minimised with Adam from the identity (float32, full batch)."""
    a, b = a.float(), b.float()
    d = a.shape[1]
    lam = ridge * float((a * a).sum()) / d
    eye = torch.eye(d, device=a.device)
    p = eye.clone().requires_grad_(True)
    opt = torch.optim.Adam([p], lr=lr)
    n = a.shape[0]
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = ((a @ p.T - b) ** 2).sum() / n + lam / n * ((p - eye) ** 2).sum()
            loss.backward()
            opt.step()
    return p.detach().double()


def _contributions(adapter, layer, sublayer: str, pruned: DepthRunner, j: int) -> list[torch.Tensor]:
    """``sublayer``'s contribution at layer ``j`` on the pruned stream, one ``[1, T, d]`` chunk per row."""
    captured: list[torch.Tensor] = []
    with hooks() as handles:
        _capture_contribution(handles, adapter, layer, sublayer, captured)
        with pruned.dropped(j, set(pruned.removed.get(j, ()))) as run:
            for s in range(pruned.n):
                run_layer(run, pruned.cache[j][s], pruned.kwargs[j])
    return captured


def _layer_fit(captured: list[torch.Tensor], pruned: DepthRunner, j: int, target: list[torch.Tensor]) -> dict:
    """The fit data at kept layer ``j``: its carrier's contribution ``a`` (``captured`` during the pruned pass, in
    row order) and the contribution ``b`` that would land on the dense stream ``target``, all ``[tokens, d]``."""
    d = target[0].shape[-1]
    a = torch.cat([c.reshape(-1, d) for c in captured])  # [tokens, d] the carrier's contribution
    h_pruned = torch.cat([h.reshape(-1, d) for h in pruned.cache[j + 1]])  # [tokens, d] the layer's output
    h_dense = torch.cat([h.reshape(-1, d) for h in target])  # [tokens, d] the target
    sample_of = torch.cat([torch.full((h.reshape(-1, d).shape[0],), s) for s, h in enumerate(target)])  # [tokens]
    return {"layer": j, "a": a, "b": h_dense - (h_pruned - a), "h_pruned": h_pruned, "h_dense": h_dense,
            "sample_of": sample_of}


@dataclass
class _Streams:
    """The dense and the pruned residual stream on the calibration rows, and what each kept layer's fit needs."""

    dense: DepthRunner
    pruned: DepthRunner
    whole: list[int]  # layers the plan removes whole
    carrier: dict[int, str]  # kept layer -> the sublayer that carries its projection
    feeds: dict[int, int]  # kept layer -> the layer (or L: the final norm) its output feeds
    captured: dict[int, list[torch.Tensor]]  # kept layer -> its carrier's contribution on the pruned pass
    shifts: dict[int, float]  # kept layer -> the drift of its output from the dense stream it stands in for

    @property
    def layer_forwards(self) -> float:
        return self.dense.layer_forwards + self.pruned.layer_forwards


def _streams(model, removed: list[Candidate], calibration: torch.Tensor, relative: bool) -> _Streams:
    """One dense pass and one pruned pass (from the first removal on), keeping every carrier's contribution."""
    adapter = adapter_for(model)
    layers = adapter.decoder_layers(model)
    if any(adapter.residual_norms(layer) for layer in layers):
        raise ValueError("compensation needs residual sublayers added after their norms; this model keeps a "
                         "norm after the residual add (OPT with do_layer_norm_before=False): use compensate=False")
    whole = next((op.layers for op in plan_for(model, removed).ops if isinstance(op, RemoveLayers)), [])
    kept = [i for i in range(len(layers)) if i not in whole]
    # the sublayer that carries the projection: the MLP, or the attention where the MLP was dropped
    dense = DepthRunner(model, calibration)  # one dense pass
    gone = {(c.layer, part) for c in removed for part in c.parts}
    # sublayers an earlier pruning step already dropped carry nothing either (the runner's layer states)
    gone |= {(i, part) for i, state in enumerate(dense.states)
             for part, present in (("attention", state.attention != "none"), ("mlp", state.mlp != "none")) if not present}
    carrier = {i: "mlp" if (i, "mlp") not in gone else "attention" for i in kept if (i, "attention") not in gone
               or (i, "mlp") not in gone}
    # the pruned pass runs from the first removal on (the layers below it are the dense pass's) and keeps
    # each carrier's contribution on the way ([b, T, d] chunks in row order), so no layer runs twice
    captured: dict[int, list[torch.Tensor]] = {i: [] for i in carrier}
    with hooks() as handles:
        for i in carrier:
            _capture_contribution(handles, adapter, layers[i], carrier[i], captured[i])
        pruned = DepthRunner(model, calibration, removed=removed, prefix_from=dense)
    # what the pruned output of kept layer i feeds: the next kept layer (or the final norm), which in the
    # dense model receives the dense stream at that point (after the removed blocks in between)
    feeds = {i: next((k for k in kept if k > i), len(layers)) for i in kept}
    shifts = {i: _shift(pruned.cache[i + 1], dense.cache[feeds[i]], relative) for i in kept}
    return _Streams(dense, pruned, whole, carrier, feeds, captured, shifts)


def _best_fit(model, streams: _Streams, usable: list[int], ridge: float | None) -> tuple[dict, dict]:
    """The fit data of the kept layer to compensate, and the shortlist's validated error ratios.

    The paper's criterion (largest shift) shortlists; the fit that generalises best decides (a fixed ridge or a
    one-layer shortlist keeps the largest shift)."""
    adapter = adapter_for(model)
    layers = adapter.decoder_layers(model)
    shifts, captured, pruned = streams.shifts, streams.captured, streams.pruned
    shortlist = sorted(usable, key=lambda i: (-shifts[i], i))[:SHORTLIST if ridge is None else 1]
    for i in set(captured) - set(shortlist):
        del captured[i]  # free what no fit will use
    best = None
    validation = {}
    for i in shortlist:
        # the last kept layer below the first removal feeds a removed span but was not re-run: run it once
        chunks = captured.pop(i, None) or _contributions(adapter, layers[i], streams.carrier[i], pruned, i)
        fit = _layer_fit(chunks, pruned, i, streams.dense.cache[streams.feeds[i]])
        if ridge is None:  # screened on at most SCREEN_FOLDS folds; the winner's ridge by leave-one-row-out
            _, screen = choose_ridge(fit["a"], fit["b"], fit["sample_of"], SCREEN_FOLDS, torch.float32)
            fit["gain"] = min(screen["ridge_validation_mse"].values()) / max(screen["identity_validation_mse"], 1e-300)
            validation[i] = fit["gain"]
        else:
            fit["gain"] = 0.0
        if best is None or fit["gain"] < best["gain"]:
            best = fit
    return best, validation


def _projection(best: dict, ridge: float, solver: str, steps: int) -> tuple[torch.Tensor, dict, float, float]:
    """The fitted ``P`` ``[d, d]`` (float64) on ``best``'s data, the solver's report and the hidden-state MSE
    before and after."""
    a, b = best["a"], best["b"]
    if solver == "adam":
        p, info = adam_projection(a, b, ridge, steps), {}
    else:
        p, info = solve_projection(a, b, ridge)
    before = float(((best["h_pruned"] - best["h_dense"]) ** 2).mean())
    after = float(((a.double() @ p.T - b.double()) ** 2).mean())
    if info.get("condition", 0) > 1e12:
        logger.warning("the compensation system at layer %d is ill-conditioned (cond %.2e); the ridge term keeps "
                       "it solvable: raise ridge for a more conservative fit", best["layer"], info["condition"])
    return p, info, before, after


def fit_compensation(model, removed: list[Candidate], calibration: torch.Tensor, ridge: float | None = None,
                     solver: str = "closed_form", steps: int = 300, relative: bool = True) -> tuple[list, dict]:
    """The ``add_linear`` op (in a list; empty when nothing can be compensated) and a report.

    ``removed`` are the candidates the depth method chose; the op's layer index is that of the pruned model
    (after the plan's ``remove_layers``), so the op goes after the removal ops.
    """
    start = time.perf_counter()
    if not removed:
        return [], {"skipped": "nothing was removed"}
    with calibration_mode(model):
        streams = _streams(model, removed, calibration, relative)
        shifts = streams.shifts
        usable = [i for i in streams.carrier if shifts[i] > 0]
        if not usable:
            return [], {"skipped": "no kept layer with a sublayer left drifted from the dense model", "shifts": shifts}
        best, validation = _best_fit(model, streams, usable, ridge)
        j = best["layer"]
        if ridge is None:
            ridge, chosen = choose_ridge(best["a"], best["b"], best["sample_of"])
            chosen["validated_error_ratio"] = validation
        else:
            chosen = {}
        if math.isinf(ridge):
            logger.warning("compensation skipped: at layer %d no ridge fit beats the identity on held-out "
                           "calibration rows (more calibration tokens may help)", j)
            return [], {"skipped": "no ridge fit beats the identity on held-out calibration rows",
                        "layer": j, "shifts": shifts, **chosen, "compensation_s": time.perf_counter() - start,
                        "layer_forwards": streams.layer_forwards}
        p, info, before, after = _projection(best, ridge, solver, steps)
    new_index = j - sum(1 for i in streams.whole if i < j)
    op = AddLinear(layer=new_index, sublayer=streams.carrier[j], bias=False, tensors={"weight": p.float()})
    report = {"layer": j, "pruned_layer_index": new_index, "sublayer": streams.carrier[j], "shift": shifts[j],
              "shifts": shifts, "solver": solver, "ridge": ridge, **chosen, "mse_before": before, "mse_after": after,
              "compensation_s": time.perf_counter() - start, "layer_forwards": streams.layer_forwards, **info}
    logger.info("compensation at layer %d (shift %.3g): hidden-state MSE %.4g -> %.4g", j, shifts[j], before, after)
    return [op], report
