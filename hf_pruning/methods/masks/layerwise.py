"""Layer-by-layer processing for mask methods on the engine: each layer sees inputs from the already-pruned
layers before it, each layer is onloaded once, and one batch of calibration rows is on the device at a time
(the activations live in an :class:`~hf_pruning.engine.ActivationStore`).

Inside a layer, :func:`prune_staged` prunes the linears group by group in the order the forward reaches them
(q/k/v, then o, then gate/up, then down on LLaMA-like layers; q/k/v, out, fc1, fc2 on OPT): each group's
statistics are accumulated batch by batch over a forward that stops at the group, then the group is pruned, so
the linears later in the layer see inputs from the already-pruned ones (SparseGPT's "true sequential"). A
block whose linears are all pruned (the attention) is replayed from its recorded outputs in the later passes.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from ...accounting import prunable_linears
from ...config import ConfigError
from ...engine import (
    LAYER_BATCH,
    ActivationStore,
    StopForward,
    execution_device,
    hooks,
    propagate,
    run_layer,
)
from ...engine import sequential as engine_sequential
from ...remote.hf_pruning_surgery import adapter_for
from .replay import Recorder, replayed

logger = logging.getLogger(__name__)

__all__ = ["LAYER_BATCH", "check_widths", "collect_input_stats", "input_groups", "input_stat_hooks",
           "prune_staged", "sequential"]


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


def _flat(x: torch.Tensor) -> torch.Tensor:
    """A linear's input ``[..., in]`` as ``[tokens, in]`` in float32 (statistics never in bf16/fp16)."""
    return x.detach().reshape(-1, x.shape[-1]).float()


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
        update(stats[name], _flat(x))
        last.update(x=x, stat=stats[name])

    for name, lin in linears.items():
        handles.append(lin.register_forward_hook(lambda mod, args, out, name=name: hook(name, args[0])))
    return stats


def collect_input_stats(layer: nn.Module, inputs: ActivationStore, kwargs: dict,
                        make_stat: Callable[[nn.Linear], object], update: Callable[[object, torch.Tensor], None]) -> dict:
    """Run ``layer`` over every batch of ``inputs`` (one on the device at a time) with hooks feeding each
    linear's input ``[tokens, in]`` to ``update``; returns name -> stat."""
    device = execution_device(layer)
    with hooks() as handles:
        stats = input_stat_hooks(handles, prunable_linears(layer), make_stat, update)
        for i in range(len(inputs)):
            run_layer(layer, inputs.get(i, device), kwargs)
    return stats


@torch.no_grad()
def input_groups(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> list[list[str]]:
    """The prunable linears of ``layer`` grouped by the input they read, in the order one forward on
    ``hidden`` ``[b, T, d]`` reaches them: linears called one after another on the very same tensor form a
    group (q/k/v, gate/up). A linear called twice counts at its first call. Raises when a linear is never
    called (the staged schedule cannot prune it; ``one_pass=False`` can)."""
    linears = prunable_linears(layer)
    groups: list[list[str]] = []
    last: list = [None]  # the previous linear's input (held, so its identity cannot be reused)
    seen: set[str] = set()

    def pre(name, x):
        if name in seen:
            return
        seen.add(name)
        if groups and last[0] is x:
            groups[-1].append(name)
        else:
            groups.append([name])
        last[0] = x

    with hooks() as handles:
        for name, lin in linears.items():
            handles.append(lin.register_forward_pre_hook(lambda mod, args, name=name: pre(name, args[0])))
        run_layer(layer, hidden, kwargs)
    missing = sorted(set(linears) - seen)
    if missing:
        raise RuntimeError(f"the layer's forward never called {missing}; prune with one_pass=False")
    return groups


def _children_linears(layer: nn.Module) -> dict[str, set[str]]:
    """Per direct child of ``layer`` holding prunable linears: the names (inside the layer) of its linears."""
    names = list(prunable_linears(layer))
    out = {}
    for child in dict(layer.named_children()):
        inside = {n for n in names if n == child or n.startswith(child + ".")}
        if inside:
            out[child] = inside
    return out


def _stage_pass(layer, inputs: ActivationStore, kwargs: dict, first: nn.Linear, name: str, stat, update,
                replays: dict, recorders: dict) -> None:
    """Every batch through ``layer`` (blocks in ``replays`` replayed, blocks in ``recorders`` recorded) until
    the forward reaches ``first``, whose input goes to ``update(stat, x)``; there the forward stops."""
    device = execution_device(layer)

    def stop(mod, args):
        update(stat, _flat(args[0]))
        raise StopForward

    with replayed(replays), hooks() as handles:
        handles.append(first.register_forward_pre_hook(stop))
        for child, recorder in recorders.items():
            handles.append(layer.get_submodule(child).register_forward_hook(recorder.hook))
        for i in range(len(inputs)):
            try:
                run_layer(layer, inputs.get(i, device), kwargs)
            except StopForward:
                continue
            raise RuntimeError(f"the layer's forward did not reach {name} on batch {i}; prune with one_pass=False")


@torch.no_grad()
def prune_staged(layer: nn.Module, inputs: ActivationStore, kwargs: dict, make_stat: Callable[[nn.Linear], object],
                 update: Callable[[object, torch.Tensor], None],
                 prune_group: Callable[[dict[str, nn.Linear], object], None],
                 outputs: bool = True) -> ActivationStore | None:
    """Prune ``layer``'s linears group by group (:func:`input_groups`), each on the statistics of its own
    input in the layer as pruned so far.

    For each group: every batch of ``inputs`` runs through the layer until the forward reaches the group's
    first linear, where ``update(stat, x)`` gets that input ``[tokens, in]`` (float32) and the forward stops
    (:class:`~hf_pruning.engine.StopForward`); then ``prune_group(linears, stat)`` (name -> linear, in call
    order) edits the group's weights (through ``write_param``). The statistic of a group is thus accumulated
    over every calibration token, one batch on the device at a time, and equals the one a single forward over
    all rows would give (up to float summation order). A block of the layer (a direct child: the attention
    module) whose linears are all pruned is recorded by the next pass that runs it and replayed in the later
    ones (``replay.py``; the same tensors, so nothing changes numerically). With ``outputs``, one more pass
    returns the pruned layer's outputs (a store like ``inputs``); else None.
    """
    linears = prunable_linears(layer)
    groups = input_groups(layer, inputs.get(0, execution_device(layer))[:1], kwargs)
    children, pruned = _children_linears(layer), set()
    replays: dict = {}  # (layer, child) -> (outputs, arity)
    recorders: dict = {}  # child -> Recorder, for the pass in progress
    try:
        for group in groups:
            stat = make_stat(linears[group[0]])
            _stage_pass(layer, inputs, kwargs, linears[group[0]], group[0], stat, update, replays, recorders)
            for child, recorder in recorders.items():
                if recorder.complete():
                    replays[(layer, child)] = (recorder.outputs, recorder.arity)
                else:
                    recorder.outputs.close()
            prune_group({name: linears[name] for name in group}, stat)
            del stat
            pruned.update(group)
            recorders = {child: Recorder(inputs) for child, names in children.items()
                         if names <= pruned and (layer, child) not in replays}
            children = {c: n for c, n in children.items() if c not in recorders}
        if not outputs:
            return None
        with replayed(replays):
            return propagate(layer, inputs, kwargs)
    finally:
        for store, _ in replays.values():
            store.close()
        for recorder in recorders.values():
            recorder.outputs.close()


@torch.no_grad()
def sequential(model, calibration: torch.Tensor, process_layer: Callable, desc: str,
               batch_size: int | None = None, store_folder: str | bool | None = None) -> list[dict]:
    """Call ``process_layer(index, layer, inputs, kwargs) -> report`` for every decoder layer in order
    (:func:`hf_pruning.engine.sequential`: each layer onloaded once, one batch on the device at a time), then
    propagate the inputs through the (now pruned) layer. ``inputs`` is an
    :class:`~hf_pruning.engine.ActivationStore` of hidden-state batches ``[b, T, d]`` (masks and rotary
    embeddings captured for one row broadcast over the batch). A ``process_layer`` that already ran the
    pruned layer returns ``(report, outputs)`` (a store) instead, and the propagation pass is skipped.
    ``batch_size`` defaults to this module's ``LAYER_BATCH``. Returns the per-layer reports."""
    return engine_sequential(model, calibration, process_layer, desc, batch_size or LAYER_BATCH, store_folder)
