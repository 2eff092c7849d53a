"""Layer-by-layer processing for mask methods on the engine: each layer sees inputs from the already-pruned
layers before it, each layer is onloaded once, and one batch of calibration rows is on the device at a time
(the activations live in an :class:`~hf_pruning.engine.ActivationStore`).

Inside a layer, :func:`prune_staged` prunes the linears group by group in the order the forward reaches them
(q/k/v, then o, then gate/up, then down on LLaMA-like layers; q/k/v, out, fc1, fc2 on OPT): each group's
statistics are accumulated batch by batch over a forward that stops at the group, then the group is pruned, so
the linears later in the layer see inputs from the already-pruned ones (SparseGPT's "true sequential"). It
costs what one forward of the layer costs: a block whose output is its output projection's (attention: o_proj,
MLP: down_proj) runs, in the passes after that projection is pruned, as the projection on its inputs recorded
in the pass that stopped there, and a finished block is replayed from its recorded outputs; so each part of
the layer computes once per batch, as in the all-rows forward of the earlier one-pass flow (whose masks these
are). The structure (groups, output projections) comes from one forward of one row, once per run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
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
from .replay import Recorder, Through, replayed

logger = logging.getLogger(__name__)

__all__ = ["LAYER_BATCH", "REPLAY_TAILS", "LayerPlan", "check_widths", "collect_input_stats", "input_groups",
           "input_stat_hooks", "layer_plan", "prune_staged", "sequential"]


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


@dataclass
class LayerPlan:
    """How one forward of a decoder layer reaches its prunable linears (:func:`layer_plan`)."""

    #: the linears grouped by the input tensor they read, in the order the forward reaches them
    groups: list[list[str]]
    #: per direct child block (attention, MLP module) whose output IS the output of one of its linears, called
    #: once and in the block's last group: (that linear's name, the block's output tuple length or None)
    tails: dict[str, tuple[str, int | None]] = field(default_factory=dict)


@torch.no_grad()
def layer_plan(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> LayerPlan:
    """One forward of ``layer`` on ``hidden`` ``[b, T, d]`` (one row is enough) with hooks on its linears
    and blocks: the groups of linears by the input they read (linears called one after another on the very
    same tensor form a group: q/k/v, gate/up; a linear called twice counts at its first call) and the blocks
    whose output is their last linear's output (o_proj's for the attention, down_proj's for the MLP).
    Raises when a linear is never called (the staged schedule cannot prune it; ``one_pass=False`` can)."""
    linears, blocks = prunable_linears(layer), _blocks(layer)
    groups: list[list[str]] = []
    last: list = [None]  # the previous linear's input (held, so its identity cannot be reused)
    outs: dict[str, list] = {}  # linear -> its outputs, one per call
    block_out: dict = {}

    def pre(name, x):
        if name in outs:
            return
        outs[name] = []
        if groups and last[0] is x:
            groups[-1].append(name)
        else:
            groups.append([name])
        last[0] = x

    with hooks() as handles:
        for name, lin in linears.items():
            handles.append(lin.register_forward_pre_hook(lambda mod, args, name=name: pre(name, args[0])))
            handles.append(lin.register_forward_hook(lambda mod, args, out, name=name: outs[name].append(out)))
        for child in blocks:
            handles.append(layer.get_submodule(child).register_forward_hook(
                lambda mod, args, out, child=child: block_out.__setitem__(child, out)))
        run_layer(layer, hidden, kwargs)
    missing = sorted(set(linears) - set(outs))
    if missing:
        raise RuntimeError(f"the layer's forward never called {missing}; prune with one_pass=False")
    order = {name: k for k, group in enumerate(groups) for name in group}
    tails = {}
    for child, names in blocks.items():
        out = block_out.get(child)
        y = out[0] if isinstance(out, tuple) and out else out
        for name in groups[max(order[n] for n in names)]:
            if name in names and len(outs[name]) == 1 and outs[name][0] is y:
                tails[child] = (name, len(out) if isinstance(out, tuple) else None)
    return LayerPlan(groups, tails)


def input_groups(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> list[list[str]]:
    """The groups of :func:`layer_plan`: the prunable linears grouped by the input they read, in call order."""
    return layer_plan(layer, hidden, kwargs).groups


def _blocks(layer: nn.Module) -> dict[str, set[str]]:
    """Per direct child of ``layer`` that holds prunable linears (and is not one itself: the attention and MLP
    modules, not OPT's fc1/fc2): the names (inside the layer) of its linears."""
    names = list(prunable_linears(layer))
    out = {}
    for child in dict(layer.named_children()):
        inside = {n for n in names if n.startswith(child + ".")}
        if inside and child not in names:
            out[child] = inside
    return out


def _plan_of(layer: nn.Module, inputs: ActivationStore, kwargs: dict, plans: dict | None) -> LayerPlan:
    """:func:`layer_plan` on one row of the first batch; with ``plans`` (a dict kept over one run), computed
    once per layer structure (the class and every submodule's name and class) and reused for the others."""
    key = (type(layer), tuple((n, type(m)) for n, m in layer.named_modules()))
    if plans is not None and key in plans:
        return plans[key]
    plan = layer_plan(layer, inputs.get(0, execution_device(layer))[:1], kwargs)
    if plans is not None:
        plans[key] = plan
    return plan


#: replay a block whose output is its last linear's (attention, MLP) from that linear's inputs recorded in the
#: pass that stopped there, so that every part of the layer runs once per batch, as in one forward. False: the
#: later passes rerun such blocks (about 1.7 layer forwards per layer on LLaMA-like layers), same results.
REPLAY_TAILS = True
#: the same for a linear whose input is wider than the hidden states (down_proj: a store of ``[b, T,
#: intermediate]``, 2.7 H on SmolLM2, 3.5 H on Llama-3-8B, held until the layer's outputs are made). False:
#: the last pass reruns the MLP's gate/up instead (about 1.45 layer forwards per layer, peak store 3 H).
REPLAY_WIDE_TAILS = True


def _tail(plan: LayerPlan, group: list[str], linears: dict, width: int) -> str | None:
    """The block whose output linear is in ``group`` and that :data:`REPLAY_TAILS` replays, if any."""
    for child, (name, _) in plan.tails.items():
        if name in group and REPLAY_TAILS and (REPLAY_WIDE_TAILS or linears[name].in_features <= width):
            return child
    return None


class _Schedule:
    """The passes of :func:`prune_staged` over one layer: which blocks run, which are replayed, which are
    recorded, and the stores that hold what they need (closed by :meth:`close`, except those handed out)."""

    def __init__(self, layer: nn.Module, inputs: ActivationStore, kwargs: dict, blocks: dict[str, set[str]]):
        self.layer, self.inputs, self.kwargs, self.blocks = layer, inputs, kwargs, blocks
        self.replays: dict = {}  # (layer, child) -> (outputs store, arity) | Through
        self.recorders: dict[str, Recorder] = {}  # child -> Recorder, for the next pass
        self.tried: set[str] = set()  # blocks recorded (or tried) once

    def stage(self, first: nn.Linear, name: str, stat, update, kept: ActivationStore | None) -> None:
        """Every batch through the layer (replayed blocks replayed, recorders recording) until the forward
        reaches ``first``, whose input goes to ``update(stat, x)`` (and to ``kept``); there it stops."""
        device = execution_device(self.layer)

        def stop(mod, args):
            update(stat, _flat(args[0]))
            if kept is not None:
                kept.append(args[0])
            raise StopForward

        with replayed(self.replays), hooks() as handles:
            handles.append(first.register_forward_pre_hook(stop))
            for child, recorder in self.recorders.items():
                handles.append(self.layer.get_submodule(child).register_forward_hook(recorder.hook))
            for i in range(len(self.inputs)):
                try:
                    run_layer(self.layer, self.inputs.get(i, device), self.kwargs)
                except StopForward:
                    continue
                raise RuntimeError(f"the layer's forward did not reach {name} on batch {i}; prune with one_pass=False")
        for child, recorder in self.recorders.items():
            key = (self.layer, child)
            if recorder.complete():
                if isinstance(self.replays.get(key), Through):
                    self.replays[key].inputs.close()
                self.replays[key] = (recorder.outputs, recorder.arity)
            else:
                recorder.outputs.close()
        self.recorders = {}

    def finished(self, pruned: set[str]) -> None:
        """Blocks whose linears are all pruned are recorded by the next pass that runs them (once)."""
        for child, names in self.blocks.items():
            if names <= pruned and child not in self.tried:
                self.tried.add(child)
                self.recorders[child] = Recorder(self.inputs)

    def close(self, keep: dict | None = None) -> None:
        """Close every store, except the recorded block outputs handed to ``keep`` (child -> store)."""
        for (_, child), value in self.replays.items():
            if isinstance(value, Through):
                value.inputs.close()
            elif keep is not None:
                keep[child] = value[0]
            else:
                value[0].close()
        for recorder in self.recorders.values():
            recorder.outputs.close()


@torch.no_grad()
def prune_staged(layer: nn.Module, inputs: ActivationStore, kwargs: dict, make_stat: Callable[[nn.Linear], object],
                 update: Callable[[object, torch.Tensor], None],
                 prune_group: Callable[[dict[str, nn.Linear], object], None],
                 outputs: bool = True, plans: dict | None = None,
                 block_outputs: dict | None = None) -> ActivationStore | None:
    """Prune ``layer``'s linears group by group (:func:`layer_plan`), each on the statistics of its own
    input in the layer as pruned so far.

    For each group: every batch of ``inputs`` runs through the layer until the forward reaches the group's
    first linear, where ``update(stat, x)`` gets that input ``[tokens, in]`` (float32) and the forward stops
    (:class:`~hf_pruning.engine.StopForward`); then ``prune_group(linears, stat)`` (name -> linear, in call
    order) edits the group's weights (through ``write_param``). The statistic of a group is thus accumulated
    over every calibration token, one batch on the device at a time, and equals the one a single forward over
    all rows would give (up to float summation order). No part of the layer runs twice on a batch: a block
    whose output is its last linear's (o_proj, down_proj) keeps that linear's inputs from the pass that
    stopped there and is replaced in the later passes by that linear on them (``replay.Through``); the next
    pass records its outputs and the ones after replay them (``replay.py``; the same tensors, so nothing
    changes numerically). With ``outputs``, one more pass returns the pruned layer's outputs (a store like
    ``inputs``); else None. ``plans``: a dict kept over a run (:func:`layer_plan` once per layer structure).
    ``block_outputs``: receives the recorded outputs of the pruned blocks (child name -> store; the caller
    closes them).
    """
    linears = prunable_linears(layer)
    plan = _plan_of(layer, inputs, kwargs, plans)
    schedule = _Schedule(layer, inputs, kwargs, _blocks(layer))
    pruned: set[str] = set()
    try:
        for k, group in enumerate(plan.groups):
            later = outputs or k + 1 < len(plan.groups)  # a pass over the layer follows this group's pruning
            tail = _tail(plan, group, linears, inputs[0].shape[-1]) if later else None
            kept = inputs.like() if tail else None  # the tail linear's inputs, [b, T, in] per batch
            stat = make_stat(linears[group[0]])
            try:
                schedule.stage(linears[group[0]], group[0], stat, update, kept)
                prune_group({name: linears[name] for name in group}, stat)
            except BaseException:
                if kept is not None:
                    kept.close()
                raise
            del stat
            pruned.update(group)
            if tail:  # closed with the schedule from here on
                schedule.replays[(layer, tail)] = Through(linears[plan.tails[tail][0]], kept, plan.tails[tail][1])
            schedule.finished(pruned)
        if not outputs:
            return None
        with replayed(schedule.replays, consume=True):  # the last pass: replayed batches are let go as it goes
            return propagate(layer, inputs, kwargs)
    finally:
        schedule.close(block_outputs)


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
