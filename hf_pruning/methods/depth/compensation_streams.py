"""The dense and the pruned residual streams run in lockstep, layer at a time, batch at a time (the engine).

Both streams start from the captured layer-0 inputs and are one until the first removal. Each decoder layer is
onloaded once per pass and runs every batch of the dense stream and (from the first removal on) of the pruned
stream, with the removed sublayers dropped through the adapter's own drop ops for the duration (what the plan
will do) and removed blocks passed through. One pass (:meth:`Lockstep.walk`) keeps running float64 sums per
stream position (the token mean and the mean token norm), from which the shifts follow, and each candidate
layer's carrier contribution until its fit's data is complete; the caller then decides (from the shifts so far)
whether to accumulate that layer's :class:`FitStats` from the stores, so no layer runs twice. Activations live in
:class:`ActivationStore`\\ s (a dense and a pruned store at a time, plus the contribution stores of the layers
whose fit data is not complete yet: one, or a few across a removed span).
"""

from __future__ import annotations

import contextlib
import functools

import torch

from ...engine import LAYER_BATCH, ActivationStore, capture, distributed, execution_device, hooks, onloaded, run_layer
from ...remote.hf_pruning_surgery import adapter_for, inspect_model
from .compensation_fit import FitStats
from .ranks import row_offset
from .runner import dropped_sublayers

#: most folds of the ridge validation (rows in fold ``row % K``; fewer rows: one row per fold)
MAX_FOLDS = 8


def fold_count(rows: int) -> int:
    """``K = min(rows, MAX_FOLDS)``; one row has two folds, the halves of its tokens."""
    return 2 if rows == 1 else min(rows, MAX_FOLDS)


def contribution_module(adapter, layer, sublayer: str):
    """The module whose output is ``sublayer``'s contribution to the residual stream."""
    if adapter.uses_norm_target(sublayer):
        return getattr(layer, adapter.attn_out_norm if sublayer == "attention" else adapter.mlp_out_norm)
    return adapter.output_linear(layer, sublayer)


class Lockstep:
    """The dense and pruned streams of ``model`` on ``calibration`` ``[n, T]`` with ``parts`` (layer -> dropped
    sublayers) dropped and layers ``whole`` passed through. ``store_folder``: activations on disk there.

    Under a process group ``calibration`` is this rank's share of the rows: the running moments are summed over
    the ranks at each stream position (one reduction of ``2 (d + 2)`` float64 per layer) and the folds are those
    of the global rows, so the shifts and every fold's statistics (summed over the ranks by the caller) are those
    of all the rows."""

    def __init__(self, model, calibration: torch.Tensor, parts: dict[int, set[str]], whole: list[int],
                 store_folder: str | bool | None = None, batch_size: int = LAYER_BATCH):
        self.model, self.ids, self.batch_size = model, calibration, batch_size
        self.adapter = adapter_for(model)
        self.layers = self.adapter.decoder_layers(model)
        self.hidden = self.adapter.hidden_size(model.config)
        self.states = inspect_model(model)
        self.parts, self.whole = parts, set(whole)
        self.first = min(parts, default=len(self.layers))  # streams are one below this layer
        self.folder = store_folder
        self.layer_forwards = 0.0
        self.kwargs: list[dict] = []
        self.first_row, self.rows = row_offset(calibration.shape[0])  # this rank's first global row, every rank's

    # ----- one layer on one stream -----------------------------------------------------------------------
    def dropped(self, idx: int):
        """Layer ``idx`` with its removed sublayers dropped (the adapter's drop ops), restored afterwards."""
        return dropped_sublayers(self.adapter, self.layers[idx], self.states[idx], self.parts.get(idx, set()),
                                 self.hidden)

    @torch.no_grad()
    def _run(self, layer, inputs: ActivationStore, idx: int, moments: _Moments | None) -> ActivationStore:
        """``layer`` on every batch of ``inputs`` (one batch on the execution device at a time); ``moments``
        adds up the outputs' running sums."""
        outputs, device = inputs.like(), execution_device(layer)
        for b in range(len(inputs)):
            out = run_layer(layer, inputs.get(b, device), self.kwargs[idx])  # [b, T, d]
            if moments is not None:
                moments.add(out)
            outputs.append(out)
        self.layer_forwards += 1.0
        return outputs

    def _step(self, idx: int, dense: ActivationStore, pruned: ActivationStore | None, on_pruned=None,
              moments: tuple[_Moments, _Moments] | None = None):
        """Layer ``idx`` on both streams (``pruned`` None: the streams are still one); ``on_pruned(layer)`` is a
        context around the pruned run (the shared run below the first removal), e.g. hooks; ``moments``: the
        (dense, pruned) running sums of the outputs. Returns the next (dense, pruned) stores."""
        dense_moments, pruned_moments = moments if moments is not None else (None, None)
        around = on_pruned or (lambda layer: contextlib.nullcontext())
        with onloaded(self.layers[idx]):
            if idx < self.first:  # the streams are one: this run is the pruned one too
                with around(self.layers[idx]):
                    return self._run(self.layers[idx], dense, idx, dense_moments), None
            dense_next = self._run(self.layers[idx], dense, idx, dense_moments)
            source = pruned if pruned is not None else dense
            if idx in self.whole:  # passed through: the pruned stream does not change
                return dense_next, source
            with self.dropped(idx) as layer, around(layer):
                return dense_next, self._run(layer, source, idx, pruned_moments)

    def _start(self) -> ActivationStore:
        store, self.kwargs = capture(self.model, self.ids, self.batch_size, ActivationStore(self.folder))
        return store

    def folds_of(self, batch: int, tokens: int) -> list[tuple[int, slice, slice]]:
        """``(fold, rows, tokens)`` slices of batch ``batch`` (rows within the batch, token positions)."""
        n, k = self.ids.shape[0], fold_count(self.rows)
        if self.rows == 1:
            return [(0, slice(0, 1), slice(0, tokens // 2)), (1, slice(0, 1), slice(tokens // 2, tokens))]
        first_row = batch * self.batch_size
        rows = min(self.batch_size, n - first_row)
        return [(f, slice(r, r + 1), slice(0, tokens)) for r in range(rows)
                for f in [(self.first_row + first_row + r) % k]]

    # ----- the pass: running moments and, as each fit's data completes, its statistics ----------------------
    def walk(self, carrier: dict[int, str], feeds: dict[int, int], arrive) -> tuple[dict, dict, dict]:
        """One pass over every layer (both streams). Returns, per stream position ``k`` (the input of layer
        ``k``; ``L``: the last output), the float64 token-mean of the dense and the pruned stream ``[d]`` and
        the dense stream's mean token norm. On the way, each kept layer ``j`` with a ``carrier[j]`` from the
        last layer below the first removal on (below it every shift is 0) keeps its carrier's contribution on
        the pruned stream until position ``feeds[j]`` is complete; then, in layer order,
        ``arrive(j, moments, accumulate)`` gets the moments so far (the same three dicts) and a callable that
        builds ``j``'s :class:`FitStats` from the stores (``a``: the contribution; ``b = D - (H - a)`` with
        ``H`` the pruned output and ``D`` the dense stream at ``feeds[j]``; no layer runs)."""
        device = execution_device(self.layers[0])
        dense, pruned = self._start(), None
        start = _Moments(device, self.hidden)
        for b in range(len(dense)):
            start.add(dense.get(b, device))
        _reduce(start)
        dense_mean, pruned_mean, dense_norm = {0: start.mean()}, {0: start.mean()}, {0: start.norm()}
        moments = (dense_mean, pruned_mean, dense_norm)
        pending: dict[int, ActivationStore] = {}  # kept layer -> its carrier's contribution per batch
        try:
            for k in range(len(self.layers)):
                hook = None
                if k in carrier and k >= self.first - 1:
                    pending[k] = ActivationStore(self.folder)
                    hook = _contribution_hook(self.adapter, carrier[k], pending[k])
                sums = (_Moments(device, self.hidden), _Moments(device, self.hidden) if k >= self.first else None)
                dense_next, pruned_next = self._step(k, dense, pruned, hook, moments=sums)
                _reduce(*(s for s in sums if s is not None))
                self._drop(dense, pruned, dense_next, pruned_next)
                dense, pruned = dense_next, pruned_next
                dense_mean[k + 1], dense_norm[k + 1] = sums[0].mean(), sums[0].norm()
                if pruned is None:
                    pruned_mean[k + 1] = dense_mean[k + 1]
                else:
                    pruned_mean[k + 1] = pruned_mean[k] if k in self.whole else sums[1].mean()
                for j in [j for j in pending if feeds[j] == k + 1]:
                    contributions = pending.pop(j)
                    try:
                        arrive(j, moments, functools.partial(
                            self._accumulate, contributions, dense, pruned if pruned is not None else dense,
                            execution_device(self.layers[j])))
                    finally:
                        contributions.close()
        finally:
            self._drop(dense, pruned)
            for contributions in pending.values():
                contributions.close()
        return moments

    def _drop(self, *old_then_new: ActivationStore | None) -> None:
        """Close the first two stores (the old dense and pruned) unless they are among the new ones."""
        old, new = old_then_new[:2], old_then_new[2:]
        keep = [s for s in new if s is not None]
        for store in {id(s): s for s in old if s is not None}.values():
            if not any(store is k for k in keep):
                store.close()

    def _accumulate(self, contributions: ActivationStore, dense: ActivationStore, pruned: ActivationStore,
                    device) -> FitStats:
        stats = FitStats.zeros(fold_count(self.rows), self.hidden, device)
        for b in range(len(dense)):
            h = pruned.get(b, device)  # [b, T, d] the pruned layer's output (passed through any removed span)
            a = contributions.get(b, device).reshape(h.shape)  # [b, T, d] the carrier's contribution (OPT: [bT, d])
            target = dense.get(b, device)  # [b, T, d] the dense stream its consumer reads
            for fold, rows, tokens in self.folds_of(b, a.shape[1]):
                a_f, h_f, d_f = (x[rows, tokens].reshape(-1, x.shape[-1]) for x in (a, h, target))  # [t, d]
                stats.add(fold, a_f, d_f - (h_f - a_f), drift=h_f - d_f)
        return stats


def _contribution_hook(adapter, sublayer: str | None, sink: ActivationStore):
    """A context around the pruned run of a layer keeping ``sublayer``'s contribution per batch in ``sink``."""

    @contextlib.contextmanager
    def around(layer):
        with hooks() as handles:
            module = contribution_module(adapter, layer, sublayer)
            handles.append(module.register_forward_hook(lambda m, args, out: sink.append(out)))
            yield

    return around


class _Moments:
    """Running float64 sums of a stream's tokens: their sum ``[d]``, the sum of their norms and their count."""

    def __init__(self, device, d: int):
        self.total = torch.zeros(d, dtype=torch.float64, device=device)  # [d]
        self.norms, self.count, self.device = 0.0, 0, device

    def add(self, hidden: torch.Tensor) -> None:
        h = hidden.double().reshape(-1, hidden.shape[-1])  # [b*T, d]
        self.total = self.total + h.sum(0)
        self.norms += float(torch.linalg.vector_norm(h, dim=-1).sum())
        self.count += h.shape[0]

    def mean(self) -> torch.Tensor:
        return (self.total / self.count).cpu()

    def norm(self) -> float:
        return self.norms / max(self.count, 1)


def _reduce(*moments: _Moments) -> None:
    """Sum ``moments`` over the ranks, in place, in one reduction (``[d + 2]`` float64 each); a no-op without a
    process group."""
    if not distributed.active():
        return
    parts = [torch.cat([m.total, m.total.new_tensor([m.norms, float(m.count)])]) for m in moments]
    summed = distributed.all_sum(torch.cat(parts), "the streams' running moments")
    for m, part in zip(moments, summed.split([p.numel() for p in parts])):
        m.total, m.norms, m.count = part[:-2], float(part[-2]), int(round(float(part[-1])))
