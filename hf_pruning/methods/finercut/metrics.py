"""Distances between the dense model's output distribution and a pruned model's, one sample at a time.

Every metric is a mean over calibration samples of a per-sample value that is never negative, so a partial
sum over the first samples is a lower bound of the final sum: the exact search uses this to stop scoring a
candidate that can no longer win. All values are computed in float32 from ``[T, V]`` logits.

- ``js_code``: the FinerCut code's "JS divergence", 0.5 * (KL(M||P) + KL(M||Q)) averaged over every element
  (tokens x vocabulary), with M = (P + Q) / 2. Symmetric and >= 0, but not the textbook JS.
- ``js``: textbook Jensen-Shannon, 0.5 * (KL(P||M) + KL(Q||M)), averaged over tokens.
- ``kl``: KL(P||Q) (dense P, pruned Q), averaged over tokens.
- ``angular``: arccos of the cosine between dense and pruned logit vectors, averaged over tokens.
- ``norm``: Frobenius norm of the logit difference of the sample.
- ``ppl``: exp of the pruned model's mean next-token loss on the sample (no dense reference; SLEB's metric).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

METRICS = ("js_code", "js", "kl", "angular", "norm", "ppl")


def _kl_terms(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """sum over the vocabulary of a * (log a - log b) per token: ``[T, V] x [T, V] -> [T]``."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _log_mixture(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """log((P + Q) / 2) computed stably from log-probabilities ``[T, V]``."""
    return torch.logaddexp(log_p, log_q) - math.log(2.0)


#: tokens scored together: the metrics' temporaries are ``[TOKEN_SLICE, V]``, never ``[T, V]``
TOKEN_SLICE = 64


def _per_token(fn, ref: torch.Tensor, other: torch.Tensor, logits: bool) -> torch.Tensor:
    """``fn(ref[s], q[s])`` over slices ``s`` of ``TOKEN_SLICE`` tokens, concatenated along the last dim (per-token
    values ``[..., T]``). ``other``: log-probabilities ``[T, V]``, or logits when ``logits`` (log-softmaxed one
    slice at a time). Every per-token value is the same as from whole ``[T, V]`` tensors."""
    parts = []
    for t in range(0, ref.shape[0], TOKEN_SLICE):
        q = other[t : t + TOKEN_SLICE]  # [t, V]
        parts.append(fn(ref[t : t + TOKEN_SLICE], torch.log_softmax(q, dim=-1) if logits else q))
    return torch.cat(parts, dim=-1)


def _js_code_terms(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(M||P) and KL(M||Q) per token: ``[t, V] x [t, V] -> [2, t]``."""
    log_m = _log_mixture(log_p, log_q)
    return torch.stack([_kl_terms(log_m, log_p), _kl_terms(log_m, log_q)])


def _js_terms(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(P||M) + KL(Q||M) per token: ``[t, V] x [t, V] -> [t]``."""
    log_m = _log_mixture(log_p, log_q)
    return _kl_terms(log_p, log_m) + _kl_terms(log_q, log_m)


def _angle(z_p: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
    """arccos of the cosine per token: ``[t, V] x [t, V] -> [t]``."""
    return torch.arccos(F.cosine_similarity(z_p, z_q, dim=-1).clamp(-1.0, 1.0))


def js_code(log_p: torch.Tensor, log_q: torch.Tensor, logits: bool = False) -> float:
    """The FinerCut code's variant: 0.5 * (KL(M||P) + KL(M||Q)) / (T * V). ``logits``: ``log_q`` holds logits."""
    terms = _per_token(_js_code_terms, log_p, log_q, logits)  # [2, T]
    return float(0.5 * (terms[0].sum() + terms[1].sum()) / log_p.numel())


def js(log_p: torch.Tensor, log_q: torch.Tensor, logits: bool = False) -> float:
    """Textbook Jensen-Shannon divergence per token, averaged over tokens."""
    return float(0.5 * _per_token(_js_terms, log_p, log_q, logits).mean())


def kl(log_p: torch.Tensor, log_q: torch.Tensor, logits: bool = False) -> float:
    """KL(P||Q) per token, averaged over tokens."""
    return float(_per_token(_kl_terms, log_p, log_q, logits).mean())


def angular(z_p: torch.Tensor, z_q: torch.Tensor) -> float:
    """arccos(cos(z_p, z_q)) per token (logits ``[T, V]``), averaged over tokens."""
    return float(_per_token(_angle, z_p, z_q, False).mean())


def norm(z_p: torch.Tensor, z_q: torch.Tensor) -> float:
    """Frobenius norm of the logit difference ``[T, V]``."""
    return float(torch.linalg.vector_norm(z_p - z_q))


def perplexity(z_q: torch.Tensor, ids: torch.Tensor) -> float:
    """exp(mean next-token cross-entropy) of logits ``[T, V]`` on token ids ``[T]``."""
    return float(torch.exp(F.cross_entropy(z_q[:-1], ids[1:].to(z_q.device))))


class Metric:
    """Scores a pruned model's logits against the dense model's, one calibration row at a time.

    The dense reference is kept as the dense final hidden states (an ``ActivationStore``, :meth:`set_reference`),
    never as ``[n, T, V]`` log-probabilities: :meth:`reference` recomputes one chunk's log-probabilities (one
    head forward) when that chunk is scored."""

    def __init__(self, name: str):
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r}; choose one of {', '.join(METRICS)}")
        self.name = name
        self.hidden = None  # ActivationStore of the dense final hidden states, batches as the runner's

    @property
    def needs_reference(self) -> bool:
        return self.name != "ppl"

    def set_reference(self, final_hidden) -> None:
        """The dense final hidden states (an ``ActivationStore`` of ``[B, T, d]`` batches; the metric owns it)."""
        if self.needs_reference:
            self.hidden = final_hidden

    def reference(self, runner, chunk, row: int | None = None) -> torch.Tensor | None:
        """The dense reference of ``chunk``'s rows, ``[b, T, V]`` (``row``: of that row of the chunk only,
        ``[1, T, V]``): log-probabilities for the divergences, logits for ``angular``/``norm``, from one head
        forward of ``runner`` on the stored dense final hidden states; ``None`` for ``ppl``."""
        if not self.needs_reference:
            return None
        hidden = chunk.of(self.hidden[chunk.batch])  # [b, T, d]
        if row is not None:
            hidden = hidden[row : row + 1]
        logits = runner.chunk_logits(chunk, runner.to_device(hidden), offset=row or 0)
        return logits if self.name in ("angular", "norm") else torch.log_softmax(logits, dim=-1)

    def score(self, reference: torch.Tensor | None, logits: torch.Tensor, ids: torch.Tensor) -> float:
        """Per-row value (>= 0) of ``logits`` ``[T, V]`` for calibration row ``ids`` ``[T]`` against that row's
        ``reference`` ``[T, V]`` (from :meth:`reference`; ``None`` for ``ppl``)."""
        if self.name == "ppl":
            value = perplexity(logits, ids)
        elif self.name in ("angular", "norm"):
            value = (angular if self.name == "angular" else norm)(reference, logits)
        else:
            fn = {"js_code": js_code, "js": js, "kl": kl}[self.name]
            value = fn(reference, logits, logits=True)  # log-softmaxed a slice of tokens at a time
        return max(value, 0.0)  # rounding can leave -1e-9 for identical distributions

    def close(self) -> None:
        """Free the stored dense hidden states."""
        if self.hidden is not None:
            self.hidden.close()
            self.hidden = None
