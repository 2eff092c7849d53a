"""HARP's alpha search: greedy, top-down, one layer at a time, minimising calibration perplexity.

Layer ``l`` is searched after every chosen layer above it has its alpha fixed; the layers below it are still
dense. Its input is therefore the dense model's residual stream at ``l``, the same for every grid point: the
cached search computes it once and re-runs only layers ``l..L-1`` and the LM head per grid point. The naive
search runs every layer per grid point (what re-evaluating perplexity from scratch costs). Both score the very
layers the plan will produce (:func:`replacement_layer` applies the adapter's own ops to a copy), so they pick
the same alphas, and the chosen scores are the perplexity of the saved model on the calibration rows.
Work is counted in layer-forwards (one decoder layer over the whole calibration set) and head-forwards.

Under a process group each rank runs its own rows; per grid point the ranks' summed NLLs (and whether a rank
abandoned the point) are added over the ranks before the point is compared, so every rank picks the same alpha.
"""

from __future__ import annotations

import copy
import logging
import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ...engine import (
    LAYER_BATCH,
    ActivationStore,
    calibration_mode,
    capture,
    distributed,
    execution_device,
    head_forward,
    onloaded,
)
from ...engine.offload import onloaded_except
from ...remote.hf_pruning_surgery import adapter_for

logger = logging.getLogger(__name__)


_HOOK_ENTRIES = ("forward", "_hf_hook", "_old_forward")  # what accelerate puts in a hooked module's __dict__


def _shallow(module: nn.Module) -> nn.Module:
    """A new module object sharing ``module``'s children and parameters; replacing a child in the copy leaves the
    original untouched. An accelerate hook on ``module`` itself is not carried over (it would call the original's
    forward); the shared children keep theirs."""
    new = copy.copy(module)
    for name in ("_modules", "_parameters", "_buffers"):
        new.__dict__[name] = dict(module.__dict__[name])
    for name in _HOOK_ENTRIES:
        new.__dict__.pop(name, None)
    return new


def _detached(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` (onloaded) without accelerate hooks (a hook's copy would copy its whole weights
    map); it lives in memory, where ``module``'s weights are now."""
    saved = {}
    for m in module.modules():
        saved[m] = {k: m.__dict__.pop(k) for k in _HOOK_ENTRIES if k in m.__dict__}
    try:
        return copy.deepcopy(module)
    finally:
        for m, entries in saved.items():
            m.__dict__.update(entries)


def replacement_layer(adapter, layer: nn.Module, alpha: float) -> nn.Module:
    """The decoder layer HARP makes of ``layer`` with scale ``alpha``, built beside it (``layer`` is unchanged).

    It shares every weight with ``layer`` except those the ops rewrite (the fused output projection; on Gemma2
    the post-attention norm that carries alpha): exactly ``value_only_attention`` then ``scale_output`` of the
    plan, or ``drop_attention`` for alpha = 0. On an offloaded model the rewritten modules are copies in memory
    (on the execution device) and the shared ones keep their offload hooks.
    """
    new = _shallow(layer)
    if alpha == 0:
        adapter.drop_attention_in_(new)
        return new
    with onloaded(layer):  # the copies are made from the real weights
        attn = _shallow(adapter.attention(layer))
        attn._modules[adapter.o_name] = _detached(attn._modules[adapter.o_name])
        new._modules[adapter.attn_name] = attn
        adapter.value_only_attention_in_(new)
        if alpha != 1:
            if adapter.attn_out_norm:
                new._modules[adapter.attn_out_norm] = _detached(new._modules[adapter.attn_out_norm])
            adapter.scale_output_in_(new, "attention", alpha)
    return new


class AlphaSearch:
    """Searches one alpha per layer in ``layers`` over ``grid`` on calibration rows ``[n, T]`` (equal lengths).

    Layer at a time, batch at a time on the engine: hidden states live in :class:`ActivationStore` objects (CPU, or
    disk under ``store_folder``), each layer is onloaded once per pass over the rows, the logits come from the
    model's own head one batch at a time.
    """

    def __init__(self, model, calibration: torch.Tensor, layers: list[int], grid: list[float], mode: str = "cached",
                 abandon: bool | None = None, batch_size: int = LAYER_BATCH, store_folder: str | bool | None = None):
        self.model = model
        self.adapter = adapter_for(model)
        self.decoder = self.adapter.decoder_layers(model)
        self.ids = calibration
        self.n = calibration.shape[0]  # this rank's rows (all of them without a process group)
        #: the calibration rows over every rank (one collective)
        self.rows = int(distributed.all_sum(torch.tensor(self.n), "the calibration rows"))
        self.layers = sorted(layers)
        self.grid = list(grid)
        self.mode = mode
        self.batch_size = batch_size
        self.store_folder = store_folder
        #: early abandoning of grid points (default: on for the cached search, off for the naive one)
        self.abandon = mode == "cached" if abandon is None else abandon
        self.layer_forwards = 0.0
        self.head_forwards = 0.0
        self.tuple_out = None
        start = time.perf_counter()
        with calibration_mode(model), torch.no_grad():
            self._prepare(calibration)
        self.prepare_s = time.perf_counter() - start  # the capture and dense pass count as search time

    def _prepare(self, calibration: torch.Tensor) -> None:
        inputs, self.kwargs = capture(self.model, calibration, self.batch_size, ActivationStore(self.store_folder))
        # cache[l]: the dense inputs of layer l, every row (layer 0 in naive mode; the searched layers in cached mode)
        self.cache: dict[int, ActivationStore] = {0: inputs}
        if self.mode == "cached":
            keep = set(self.layers)
            hidden = inputs
            for idx in range(max(self.layers)):
                out = self._propagate(idx, self.decoder[idx], hidden)
                if hidden not in self.cache.values():
                    hidden.close()
                hidden = out
                if idx + 1 in keep:
                    self.cache[idx + 1] = hidden
            if 0 not in keep:  # the cached search starts at searched layers only
                self.cache.pop(0).close()

    def close(self) -> None:
        """Drop the cached hidden states (their files, for a store on disk)."""
        for store in self.cache.values():
            store.close()
        self.cache = {}

    def _propagate(self, idx: int, layer: nn.Module, inputs: ActivationStore) -> ActivationStore:
        """``layer`` (at position ``idx``), onloaded once, over every batch of ``inputs``; its outputs."""
        outputs = inputs.like()
        with onloaded(layer):
            device = execution_device(layer)
            for b in range(len(inputs)):
                hidden = inputs.get(b, device)  # [b, T, d]
                out = layer(hidden, **self.kwargs[idx])
                if self.tuple_out is None:
                    self.tuple_out = isinstance(out, tuple)
                outputs.append(out[0] if isinstance(out, tuple) else out)
                self.layer_forwards += hidden.shape[0] / self.n
        return outputs

    @torch.no_grad()
    def loss(self, start: int, overrides: dict[int, nn.Module], bound: float = math.inf) -> float | None:
        """Total next-token NLL over the calibration rows, running layers ``start..L-1`` (``overrides`` stand in
        for the model's layers) from the cached dense input of layer ``start``.

        ``bound``: a total already achieved by another grid point; the rows' NLLs are non-negative, so once the
        running sum exceeds it this point cannot win and None is returned (the remaining head batches are
        skipped). Under a process group the ranks' sums are added (:meth:`_over_ranks`) and the point is
        abandoned when a rank abandoned it or the total exceeds ``bound``.
        """
        hidden = self.cache[start]
        for idx in range(start, len(self.decoder)):
            out = self._propagate(idx, overrides.get(idx, self.decoder[idx]), hidden)
            if hidden is not self.cache[start]:
                hidden.close()
            hidden = out
        total, row = 0.0, 0
        try:
            with onloaded_except(self.model, self.decoder):  # the embeddings, final norm and head, once
                for b in range(len(hidden)):
                    final = hidden[b]  # [b, T, d]
                    for r in range(final.shape[0]):  # the head one row at a time: one [1, T, V] of logits alive
                        ids = self.ids[row + r : row + r + 1]  # [1, T]
                        logits = head_forward(self.model, ids, final[r : r + 1], self.tuple_out)[0]  # [T, V] fp32
                        self.head_forwards += 1 / self.n
                        target = ids[0, 1:].to(logits.device)
                        total += float(F.cross_entropy(logits[:-1], target, reduction="sum"))  # a float, row order
                        del logits
                        if total > bound:
                            return self._over_ranks(total, True, bound)
                    row += final.shape[0]
        finally:
            hidden.close()
        return self._over_ranks(total, False, bound)

    @staticmethod
    def _over_ranks(total: float, abandoned: bool, bound: float) -> float | None:
        """This rank's NLL sum (or that it abandoned the point) made the all-rows one: summed over the ranks
        with the abandon flags (one collective of 2 numbers); None when abandoned. Without a process group
        ``total``, or None when ``abandoned``."""
        if distributed.active():
            both = distributed.all_sum(torch.tensor([total, float(abandoned)], dtype=torch.float64),
                                       "HARP's calibration loss")
            total, abandoned = float(both[0]), bool(both[1] > 0) or float(both[0]) > bound
        return None if abandoned else total

    def run(self, progress: bool = True) -> tuple[dict[int, float], list[dict], dict[int, nn.Module]]:
        """Top-down greedy search. Returns alpha per layer, a trace (calibration ppl of every grid point per
        layer; None where a point was abandoned) and the chosen replacement layers.

        The cached search tries the previous layer's alpha first and abandons a grid point as soon as its
        running NLL exceeds the best complete one (exact: the same argmin, ties to the earlier grid value).
        """
        start_time = time.perf_counter()
        fixed: dict[int, nn.Module] = {}
        alphas: dict[int, float] = {}
        trace: list = []
        with calibration_mode(self.model):
            try:
                self._search(fixed, alphas, trace, progress)
            finally:
                self.close()
        self.seconds = self.prepare_s + time.perf_counter() - start_time
        return alphas, trace, fixed

    def _search(self, fixed: dict, alphas: dict, trace: list, progress: bool) -> None:
        tokens = self.rows * (self.ids.shape[1] - 1)  # every rank's
        bar = tqdm(total=len(self.layers) * len(self.grid), desc="HARP alpha search", unit="point",
                   disable=not progress)
        previous = len(self.grid) - 1
        for layer in sorted(self.layers, reverse=True):
            best, ppl = None, {}
            order = list(range(len(self.grid)))
            if self.abandon:
                order = [previous] + [k for k in order if k != previous]
            for k in order:
                alpha = self.grid[k]
                candidate = replacement_layer(self.adapter, self.decoder[layer], alpha)
                bound = best[0] if best is not None and self.abandon else math.inf
                value = self.loss(layer if self.mode == "cached" else 0, {**fixed, layer: candidate}, bound)
                ppl[alpha] = None if value is None else math.exp(value / tokens)
                if value is not None and (best is None or (value, k) < best[:2]):
                    best = (value, k, candidate)
                bar.update()
            _, previous, fixed[layer] = best
            alphas[layer] = self.grid[previous]
            trace.append({"layer": layer, "alpha": alphas[layer], "ppl": {a: ppl[a] for a in self.grid}})
            logger.info("HARP: layer %d alpha %.2f (calibration ppl %.3f)", layer, alphas[layer], ppl[alphas[layer]])
        bar.close()

    def cost(self) -> dict:
        return {"search_s": getattr(self, "seconds", None), "search_layer_forwards": self.layer_forwards,
                "search_head_forwards": self.head_forwards, "mode": self.mode,
                "grid_points": len(self.layers) * len(self.grid), "calibration_tokens": self.rows * self.ids.shape[1]}
