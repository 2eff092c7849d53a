"""HARP's alpha search: greedy, top-down, one layer at a time, minimising calibration perplexity.

Layer ``l`` is searched after every chosen layer above it has its alpha fixed; the layers below it are still
dense. Its input is therefore the dense model's residual stream at ``l``, the same for every grid point: the
cached search computes it once and re-runs only layers ``l..L-1`` and the LM head per grid point. The naive
search runs every layer per grid point (what re-evaluating perplexity from scratch costs). Both score the very
layers the plan will produce (:func:`replacement_layer` applies the adapter's own ops to a copy), so they pick
the same alphas, and the chosen scores are the perplexity of the saved model on the calibration rows.
Work is counted in layer-forwards (one decoder layer over the whole calibration set) and head-forwards.
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

from ...engine import calibration_mode, capture_layer_inputs, run_layer
from ...remote.hf_pruning_surgery import adapter_for
from ..depth import head_logits

logger = logging.getLogger(__name__)


def _shallow(module: nn.Module) -> nn.Module:
    """A new module object sharing ``module``'s children and parameters; replacing a child in the copy leaves the
    original untouched."""
    new = copy.copy(module)
    for name in ("_modules", "_parameters", "_buffers"):
        new.__dict__[name] = dict(module.__dict__[name])
    return new


def replacement_layer(adapter, layer: nn.Module, alpha: float) -> nn.Module:
    """The decoder layer HARP makes of ``layer`` with scale ``alpha``, built beside it (``layer`` is unchanged).

    It shares every weight with ``layer`` except those the ops rewrite (the fused output projection; on Gemma2
    the post-attention norm that carries alpha): exactly ``value_only_attention`` then ``scale_output`` of the
    plan, or ``drop_attention`` for alpha = 0.
    """
    new = _shallow(layer)
    if alpha == 0:
        adapter.drop_attention_in_(new)
        return new
    attn = _shallow(adapter.attention(layer))
    attn._modules[adapter.o_name] = copy.deepcopy(attn._modules[adapter.o_name])
    new._modules[adapter.attn_name] = attn
    adapter.value_only_attention_in_(new)
    if alpha != 1:
        if adapter.attn_out_norm:
            new._modules[adapter.attn_out_norm] = copy.deepcopy(new._modules[adapter.attn_out_norm])
        adapter.scale_output_in_(new, "attention", alpha)
    return new


class AlphaSearch:
    """Searches one alpha per layer in ``layers`` over ``grid`` on calibration rows ``[n, T]`` (equal lengths)."""

    def __init__(self, model, calibration: torch.Tensor, layers: list[int], grid: list[float], mode: str = "cached",
                 abandon: bool | None = None):
        self.model = model
        self.adapter = adapter_for(model)
        self.decoder = self.adapter.decoder_layers(model)
        self.ids = calibration
        self.n = calibration.shape[0]
        self.layers = sorted(layers)
        self.grid = list(grid)
        self.mode = mode
        #: early abandoning of grid points (default: on for the cached search, off for the naive one)
        self.abandon = mode == "cached" if abandon is None else abandon
        self.layer_forwards = 0.0
        self.head_forwards = 0.0
        start = time.perf_counter()
        with calibration_mode(model), torch.no_grad():
            self._prepare(calibration)
        self.prepare_s = time.perf_counter() - start  # the capture and dense pass count as search time

    def _prepare(self, calibration: torch.Tensor) -> None:
        inputs, self.kwargs = capture_layer_inputs(self.model, calibration)
        self.tuple_out = isinstance(self.decoder[0](inputs[0], **self.kwargs[0]), tuple)
        # cache[l][s]: dense input of layer l for sample s (layer 0 always; the searched layers in cached mode)
        self.cache: dict[int, list[torch.Tensor]] = {0: inputs}
        if self.mode == "cached":
            keep = set(self.layers)
            hidden = list(inputs)
            for idx in range(max(self.layers)):
                for s in range(self.n):
                    hidden[s] = self._run(idx, self.decoder[idx], hidden[s])
                if idx + 1 in keep:
                    self.cache[idx + 1] = list(hidden)

    def _run(self, idx: int, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        self.layer_forwards += 1 / self.n
        return run_layer(layer, hidden, self.kwargs[idx])

    @torch.no_grad()
    def loss(self, start: int, overrides: dict[int, nn.Module], bound: float = math.inf) -> float | None:
        """Total next-token NLL over the calibration rows, running layers ``start..L-1`` (``overrides`` stand in
        for the model's layers) from the cached dense input of layer ``start``.

        ``bound``: a total already achieved by another grid point; the rows' NLLs are non-negative, so once the
        running sum exceeds it this point cannot win and None is returned early.
        """
        total = 0.0
        for s in range(self.n):
            hidden = self.cache[start][s]
            for idx in range(start, len(self.decoder)):
                hidden = self._run(idx, overrides.get(idx, self.decoder[idx]), hidden)
            logits = head_logits(self.model, self.decoder, self.ids[s], hidden, self.tuple_out)  # [T, V]
            self.head_forwards += 1 / self.n
            target = self.ids[s][1:].to(logits.device)
            total += float(F.cross_entropy(logits[:-1], target, reduction="sum"))
            if total > bound:
                return None
        return total

    def run(self, progress: bool = True) -> tuple[dict[int, float], list[dict], dict[int, nn.Module]]:
        """Top-down greedy search. Returns alpha per layer, a trace (calibration ppl of every grid point per
        layer; None where a point was abandoned) and the chosen replacement layers.

        The cached search tries the previous layer's alpha first and abandons a grid point as soon as its
        running NLL exceeds the best complete one (exact: the same argmin, ties to the earlier grid value).
        """
        start_time = time.perf_counter()
        fixed: dict[int, nn.Module] = {}
        alphas: dict[int, float] = {}
        trace = []
        tokens = self.n * (self.ids.shape[1] - 1)
        with calibration_mode(self.model):
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
        self.seconds = self.prepare_s + time.perf_counter() - start_time
        return alphas, trace, fixed

    def cost(self) -> dict:
        return {"search_s": getattr(self, "seconds", None), "search_layer_forwards": self.layer_forwards,
                "search_head_forwards": self.head_forwards, "mode": self.mode,
                "grid_points": len(self.layers) * len(self.grid), "calibration_tokens": int(self.ids.numel())}
