"""Sequential layer-by-layer processing for mask methods: each layer sees inputs from the already-pruned
layers before it, and peak memory does not grow with depth (one layer's activations at a time)."""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ...accounting import prunable_linears
from ...calibration import calibration_mode, capture_layer_inputs, hooks, run_layer
from ...config import ConfigError
from ...remote.hf_pruning_surgery import adapter_for

logger = logging.getLogger(__name__)


def check_widths(model, nm: tuple[int, int] | None) -> None:
    """An N:M pattern needs every input width to be a multiple of M: checked before anything changes."""
    if nm is None:
        return
    adapter = adapter_for(model)
    for i, layer in enumerate(adapter.decoder_layers(model)):
        for name, lin in prunable_linears(layer).items():
            if lin.in_features % nm[1]:
                raise ConfigError(f"pattern {nm[0]}:{nm[1]}: layer {i} {name} has input width {lin.in_features}, "
                                  f"not a multiple of {nm[1]}; use an unstructured sparsity or another M")


def input_stat_hooks(handles: list, linears: dict[str, nn.Linear], make_stat: Callable[[nn.Linear], object],
                     update: Callable[[object, torch.Tensor], None]) -> dict:
    """Hook every linear so each call feeds its input ``[tokens, in]`` (float32) to ``update(stat, x)``; the
    hook handles go to ``handles``. Returns name -> stat, filled as forwards run.

    Linears called one after another on the very same input tensor (q/k/v, gate/up) share one stat object,
    updated once per call: their statistics are identical, so they are computed once."""
    stats = {name: make_stat(lin) for name, lin in linears.items()}
    last: dict = {"x": None, "stat": None}  # holds the last input, so its identity cannot be reused

    def hook(name, x):
        if last["x"] is x:
            stats[name] = last["stat"]
            return
        update(stats[name], x.detach().reshape(-1, x.shape[-1]).float())
        last.update(x=x, stat=stats[name])

    for name, lin in linears.items():
        handles.append(lin.register_forward_hook(lambda mod, args, out, name=name: hook(name, args[0])))
    return stats


def collect_input_stats(layer: nn.Module, inputs: list[torch.Tensor], kwargs: dict,
                        make_stat: Callable[[nn.Linear], object], update: Callable[[object, torch.Tensor], None]) -> dict:
    """Run ``layer`` over ``inputs`` once with hooks feeding each linear's input ``[tokens, in]`` to ``update``."""
    with hooks() as handles:
        stats = input_stat_hooks(handles, prunable_linears(layer), make_stat, update)
        for h in inputs:
            run_layer(layer, h, kwargs)
    return stats


def prune_in_flight(layer: nn.Module, inputs: list[torch.Tensor], kwargs: dict,
                    prune_linear: Callable[[str, nn.Linear, torch.Tensor], None]) -> list[torch.Tensor]:
    """Run ``layer`` ONCE over all calibration rows, pruning each linear just before the forward reaches it.

    ``prune_linear(name, linear, x)`` gets the linear's input over every calibration token (``[tokens, in]``,
    float32; linears reading the same tensor get the same object) and changes the weight in place; the linear
    then computes with the pruned weight, so the layer's output is the pruned layer's output and no second
    pass is needed. Linears later in the layer (o_proj,
    down_proj) therefore see inputs from the already-pruned ones before them (SparseGPT's "true sequential").
    All rows go through in one call (a hook must see every token before the weight changes): the activations
    of one layer for all calibration tokens are held. Returns the outputs split like ``inputs``.
    """
    linears = prunable_linears(layer)
    done: set[str] = set()
    last: list = [None, None]  # (raw input, flattened): q/k/v read one tensor and get the same ``x`` object

    def pre(mod, args, name):
        if name not in done:  # a linear called twice in one forward is pruned on its first call
            done.add(name)
            if last[0] is not args[0]:
                last[:] = [args[0], args[0].detach().reshape(-1, args[0].shape[-1]).float()]
            prune_linear(name, mod, last[1])

    with hooks() as handles:
        for name, lin in linears.items():
            handles.append(lin.register_forward_pre_hook(lambda mod, args, name=name: pre(mod, args, name)))
        out = run_layer(layer, torch.cat(inputs), kwargs)  # [rows, T, d]
    missing = sorted(set(linears) - done)
    if missing:
        raise RuntimeError(f"the layer's forward never called {missing}; prune with one_pass=False")
    return list(out.split([h.shape[0] for h in inputs]))


#: calibration rows run through a layer together (the same batch as the forward that defines "passes")
LAYER_BATCH = 4


@torch.no_grad()
def sequential(model, calibration: torch.Tensor, process_layer: Callable, desc: str,
               batch_size: int | None = None) -> list[dict]:
    """Call ``process_layer(index, layer, inputs, kwargs) -> dict`` for every decoder layer in order, then
    propagate the inputs through the (now pruned) layer. ``inputs`` is a list of hidden-state batches
    ``[b, T, d]`` (masks and rotary embeddings captured for one row broadcast over the batch). A
    ``process_layer`` that already ran the pruned layer returns ``(report, outputs)`` instead, and the
    propagation pass is skipped. Returns the per-layer reports."""
    adapter = adapter_for(model)
    reports = []
    with calibration_mode(model):
        rows, layer_kwargs = capture_layer_inputs(model, calibration)
        batch_size = batch_size or LAYER_BATCH
        inputs = [torch.cat(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
        del rows
        for i, layer in enumerate(tqdm(adapter.decoder_layers(model), desc=desc, unit="layer")):
            result = process_layer(i, layer, inputs, layer_kwargs[i])
            report, outputs = result if isinstance(result, tuple) else (result, None)
            reports.append(report or {})
            inputs = outputs if outputs is not None else [run_layer(layer, h, layer_kwargs[i]) for h in inputs]
    return reports
