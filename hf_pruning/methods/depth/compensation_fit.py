"""The compensation's fit from streamed sufficient statistics: ``P a ≈ b`` around the identity, never on
``[tokens, d]`` matrices.

The ridge objective ``sum_tokens ||P a - b||^2 + lam ||P - I||_F^2`` and its held-out error need only, per fold of
calibration rows, the float64 statistics ``G_f = A_f^T A_f`` and ``C_f = B_f^T A_f`` (``[d, d]``), ``||B_f||^2``,
``||A_f - B_f||^2`` and the token count (``A_f``, ``B_f``: the fold's tokens as rows). :class:`FitStats` adds them
batch by batch; :func:`choose_ridge_from_stats` validates a ridge grid fold by fold, :func:`solve_from_stats` is
the closed form and :func:`adam_from_stats` the iterative solver, whose gradient ``2 (P G - C) + 2 lam (P - I)``
needs the same statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...engine import distributed


@dataclass
class FitStats:
    """Per fold ``f`` of ``K``: ``gram[f] = A_f^T A_f``, ``cross[f] = B_f^T A_f`` (``[K, d, d]``), ``b_sq[f] =
    ||B_f||^2``, ``identity_sq[f] = ||A_f - B_f||^2``, ``drift_sq[f]`` (the pruned-vs-dense hidden-state error
    before the fit) and ``tokens[f]`` (``[K]`` each); float64 unless made otherwise."""

    gram: torch.Tensor
    cross: torch.Tensor
    b_sq: torch.Tensor
    identity_sq: torch.Tensor
    drift_sq: torch.Tensor
    tokens: torch.Tensor

    @classmethod
    def zeros(cls, folds: int, d: int, device=None, dtype: torch.dtype = torch.float64) -> FitStats:
        def z(*shape):
            return torch.zeros(*shape, dtype=dtype, device=device)

        return cls(z(folds, d, d), z(folds, d, d), z(folds), z(folds), z(folds), z(folds))

    @property
    def folds(self) -> int:
        return self.gram.shape[0]

    def add(self, fold: int, a: torch.Tensor, b: torch.Tensor, drift: torch.Tensor | None = None) -> None:
        """Add tokens ``a``, ``b`` ``[t, d]`` (any dtype; cast to the statistics' dtype) to fold ``fold``;
        ``drift`` ``[t, d]``: the hidden-state difference the fit corrects (for the error before it)."""
        a, b = a.to(self.gram.dtype), b.to(self.gram.dtype)
        self.gram[fold] += a.T @ a
        self.cross[fold] += b.T @ a
        self.b_sq[fold] += (b * b).sum()
        self.identity_sq[fold] += ((a - b) ** 2).sum()
        if drift is not None:
            self.drift_sq[fold] += drift.to(self.gram.dtype).pow(2).sum()
        self.tokens[fold] += a.shape[0]

    def grouped(self, groups: int) -> FitStats:
        """The statistics with fold ``f`` merged into group ``f % groups`` (no change when ``groups`` >= folds)."""
        if groups >= self.folds:
            return self
        index = torch.arange(self.folds, device=self.gram.device) % groups
        merged = FitStats.zeros(groups, self.gram.shape[1], self.gram.device, self.gram.dtype)
        for field in ("gram", "cross", "b_sq", "identity_sq", "drift_sq", "tokens"):
            getattr(merged, field).index_add_(0, index, getattr(self, field))
        return merged

    def reduced(self) -> FitStats:
        """The statistics summed over the ranks (each rank's from its own rows; ``K (2 d^2 + 4)`` float64, a
        reduction per field); ``self`` without a process group."""
        if not distributed.active():
            return self
        return FitStats(*(distributed.all_sum(getattr(self, name), f"the compensation's {name} statistics")
                          for name in ("gram", "cross", "b_sq", "identity_sq", "drift_sq", "tokens")))

    def total(self) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """``G``, ``C`` (``[d, d]``), ``||B||^2`` and the token count over every fold."""
        return self.gram.sum(0), self.cross.sum(0), float(self.b_sq.sum()), float(self.tokens.sum())


def ridge_lambda(ridge: float, trace: float, d: int) -> float:
    """The scale-free ridge ``lam = ridge * tr(G) / d``; the raw strength when all contributions are zero."""
    lam = ridge * trace / d
    return lam if lam > 0 else ridge


def solve_from_stats(gram: torch.Tensor, cross: torch.Tensor, ridge: float) -> tuple[torch.Tensor, dict]:
    """``P = (C + lam I)(G + lam I)^-1`` (float64, Cholesky) with ``lam = ridge * tr(G) / d``; ``gram`` G and
    ``cross`` C ``[d, d]``. The report has ``lambda``, the system's condition number and G's rank."""
    gram, cross = gram.double(), cross.double()
    d = gram.shape[0]
    lam = ridge_lambda(ridge, float(torch.trace(gram)), d)
    eye = torch.eye(d, dtype=torch.float64, device=gram.device)
    # P (G + lam I) = C + lam I  <=>  (G + lam I) P^T = (C + lam I)^T; G + lam I is positive definite for lam > 0
    p = torch.cholesky_solve((cross + lam * eye).T, torch.linalg.cholesky(gram + lam * eye)).T
    eig = torch.linalg.eigvalsh(gram).clamp_min(0)  # [d] ascending
    rank = int((eig > eig[-1] * d * torch.finfo(torch.float64).eps).sum())
    cond = float((eig[-1] + lam) / (eig[0] + lam))
    return p, {"lambda": lam, "condition": cond, "gram_rank": rank}


def fit_error(p: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, b_sq: float) -> float:
    """``sum_tokens ||P a - b||^2 = tr(P G P^T) - 2 tr(P C^T) + ||B||^2`` from the statistics (float64)."""
    p, gram, cross = p.double(), gram.double(), cross.double()
    return max(float(((p @ gram) * p).sum()) - 2 * float((p * cross).sum()) + b_sq, 0.0)


def choose_ridge_from_stats(stats: FitStats, grid: tuple[float, ...]) -> tuple[float, dict]:
    """The ridge of ``grid`` with the lowest held-out error over ``stats``' folds (each fold fitted on the
    others, tested on itself), or ``math.inf`` (``P = I``) when the identity's error is lower still. Errors are
    per token: ``ridge_validation_mse`` per ridge and ``identity_validation_mse``."""
    n = max(float(stats.tokens.sum()), 1.0)
    errors = dict.fromkeys(grid, 0.0)
    identity = float(stats.identity_sq.sum()) / n
    gram_all, cross_all = stats.gram.sum(0), stats.cross.sum(0)  # [d, d] each
    d = gram_all.shape[0]
    for f in range(stats.folds):
        if float(stats.tokens[f]) == 0:
            continue
        gram_h, cross_h = stats.gram[f], stats.cross[f]  # [d, d] each: the held-out fold's statistics
        gram, cross = gram_all - gram_h, cross_all - cross_h  # [d, d] each: the fit's, shared by every ridge
        # one eigendecomposition G = Q diag(e) Q^T serves every ridge: P^T = Q diag(1/(e+lam)) M with
        # M = Q^T C^T + lam Q^T, so the held-out error ||a_h P^T - b_h||^2 needs d x d products only:
        # tr(M^T D K D M) - 2 tr(M^T D L) + ||b_h||^2 with D = diag(1/(e+lam)), K = Q^T G_h Q, L = Q^T C_h^T
        e, q = torch.linalg.eigh(gram)  # [d], [d, d]
        e = e.clamp_min(0)
        k, l_ = q.T @ gram_h @ q, q.T @ cross_h.T  # [d, d] each
        q_c = q.T @ cross.T  # [d, d]
        b_sq = float(stats.b_sq[f])
        trace = float(e.sum())
        for ridge in grid:
            lam = ridge_lambda(ridge, trace, d)
            dinv = 1.0 / (e + lam)  # [d]
            m = q_c + lam * q.T  # [d, d]
            fit = float((((k * dinv[:, None] * dinv[None, :]) @ m) * m).sum())  # ||a_h P^T||^2
            cross_term = float(((dinv[:, None] * l_) * m).sum())  # <a_h P^T, b_h>
            errors[ridge] += max(fit - 2 * cross_term + b_sq, 0.0) / n
    best = min(errors, key=errors.get)
    if identity <= errors[best]:  # no fit generalises better than leaving the layer alone
        best = math.inf
    return best, {"ridge_validation_mse": errors, "identity_validation_mse": identity}


def adam_from_stats(gram: torch.Tensor, cross: torch.Tensor, tokens: float, ridge: float, steps: int = 300,
                    lr: float = 1e-3) -> torch.Tensor:
    """The ridge objective ``(||A P^T - B||^2 + lam ||P - I||^2) / tokens`` minimised with Adam from ``P = I``
    (float32, full batch), ``lam = ridge * tr(G) / d``: its gradient ``2 (P G - C + lam (P - I)) / tokens``
    needs only ``G``, ``C`` ``[d, d]``. Returns ``P`` (float64)."""
    gram, cross = gram.float(), cross.float()
    d = gram.shape[0]
    n = max(tokens, 1.0)
    lam = ridge * float(torch.trace(gram)) / d
    eye = torch.eye(d, device=gram.device)
    p = eye.clone().requires_grad_(True)
    opt = torch.optim.Adam([p], lr=lr)
    for _ in range(steps):
        with torch.no_grad():
            p.grad = 2.0 / n * (p @ gram - cross + lam * (p - eye))  # [d, d]
        opt.step()
    return p.detach().double()
