"""The language-model loss backpropagated one decoder layer at a time (layer-level checkpointing).

A no-grad forward keeps only each remaining layer's input, batch by batch, in an :class:`ActivationStore`
(CPU, or disk with ``store_folder``). The head (the model's own final norm, LM head and loss) runs once per
batch on the last layer's output and gives ``dL/dh`` there. Then, from the top layer down, each layer is
onloaded once and recomputed with gradients on its stored input, batch by batch: the incoming gradient
``dL/d(output)`` is pulled back to ``dL/d(input)`` (the next layer's incoming gradient, kept in a store) and to
the layer's weights, and a visitor reduces what it needs to scalars in that step, so no weight gradient outlives
its layer. Peak memory: one layer's weights and fp32 weight gradients, one batch on the execution device, the
stores (each the size of the calibration hidden states) and one row's logits. The sum of ``loss_row / n`` is the
mean of the rows' losses, exactly the loss of the whole-model backward it replaces. Under a process group ``n``
counts every rank's rows: each rank's gradients are its rows' share, and their sum over the ranks is the gradient
of the mean loss over all rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from ...engine import (
    LAYER_BATCH,
    ActivationStore,
    Standin,
    capture,
    execution_device,
    onloaded,
    propagate,
    run_layer,
    substituted,
)
from ...remote.hf_pruning_surgery import adapter_for
from ..depth.ranks import total_count


@dataclass
class LayerGrad:
    """What the backward step of one layer on one batch gives a visitor (all on the execution device).

    ``h_in``, ``h_out``, ``g_out``: the layer's input, output and ``dL/d(output)`` ``[b, T, d]`` (detached);
    ``param_grads``: ``dL/dθ`` of this batch for the layer's parameters (``params`` order), or ``None``."""

    layer: int
    batch: int
    h_in: torch.Tensor
    h_out: torch.Tensor
    g_out: torch.Tensor
    param_grads: tuple[torch.Tensor, ...] | None


def head_loss(model, ids: torch.Tensor, final_hidden: torch.Tensor, tuple_out: bool) -> torch.Tensor:
    """The model's mean next-token loss on token ids ``[b, T]`` (labels = ids) given the last layer's output
    ``final_hidden`` ``[b, T, d]``, differentiable in ``final_hidden``: the model's own forward with every layer a
    stand-in (the last returns ``final_hidden``), so final norm, LM head, soft-capping and loss are the model's."""
    layers = adapter_for(model).decoder_layers(model)
    last = len(layers) - 1

    def through(idx):
        return lambda hidden, kwargs: final_hidden.to(hidden.device) if idx == last else hidden

    ids = ids.to(execution_device(model.get_input_embeddings()))
    with substituted(layers, {i: Standin(layer, through(i), tuple_out) for i, layer in enumerate(layers)}):
        return model(ids, labels=ids, use_cache=False).loss


@torch.no_grad()
def _forward(model, layers, below: list[int], calibration: torch.Tensor, batch_size: int, store_folder,
             counts: dict) -> tuple[dict[int, ActivationStore], ActivationStore, list[dict]]:
    """Inputs of the kept layers ``below`` the top one, and the top kept layer's input, batch by batch
    (skipped layers pass their input)."""
    hidden, kwargs = capture(model, calibration, batch_size, ActivationStore(store_folder))
    inputs = {}
    for i in tqdm(below, desc="gradient pass: forward", unit="layer"):
        inputs[i] = hidden
        with onloaded(layers[i]):
            hidden = propagate(layers[i], hidden, kwargs[i])
        counts["layer_forwards"] += 1
    return inputs, hidden, kwargs


def _head_gradient(model, ids: torch.Tensor, rows: torch.Tensor, n: int, tuple_out: bool) -> torch.Tensor:
    """``dL/dh`` ``[b, T, d]`` at the last layer's output ``rows`` for token ids ``ids`` ``[b, T]``, with ``L``
    the mean of the ``n`` calibration rows' losses. The head runs one row at a time, so one row's logits
    ``[1, T, V]`` (and their gradient) are alive at most."""
    device = execution_device(model.get_input_embeddings())
    per_row = []
    for r in range(rows.shape[0]):
        hidden = rows[r : r + 1].to(device).clone().requires_grad_(True)  # [1, T, d]
        with torch.enable_grad():
            loss = head_loss(model, ids[r][None], hidden, tuple_out) / n
            (grad,) = torch.autograd.grad(loss, hidden)
        per_row.append(grad)
    return torch.cat(per_row)


def blockwise_backward(model, calibration: torch.Tensor, skip: set[int], tuple_out: bool,
                       visit: Callable[[LayerGrad], None], param_grads: bool,
                       batch_size: int = LAYER_BATCH, store_folder: str | bool | None = None,
                       counts: dict | None = None) -> list[int]:
    """Backpropagate the mean LM loss of ``calibration`` ``[n, T]`` through the model with layers ``skip`` passed
    through, one layer at a time from the top, calling ``visit(LayerGrad)`` per (layer, batch); returns the
    kept layers. ``param_grads``: also give ``dL/dθ`` of the layer's parameters (``list(layer.parameters())``
    order, the layer onloaded). The caller's ``calibration_mode`` freezes the parameters; they require grad
    only within their layer's step. ``counts``: adds the work done, in layers over the whole calibration set,
    to ``"layer_forwards"`` (no-grad forwards and recomputations) and ``"layer_backwards"``.

    The top kept layer runs once, with its graph, batch by batch right before the head and its backward (so
    it is not recomputed); the bottom kept layer, when neither its input gradient nor (``param_grads``) its
    parameter gradients are wanted, is not rerun at all: its output is the stored input of the layer above."""
    counts = counts if counts is not None else {}
    counts.setdefault("layer_forwards", 0)
    counts.setdefault("layer_backwards", 0)
    layers = adapter_for(model).decoder_layers(model)
    kept = [i for i in range(len(layers)) if i not in skip]
    if not kept:
        return kept
    inputs, top_input, kwargs = _forward(model, layers, kept[:-1], calibration, batch_size, store_folder, counts)
    inputs[kept[-1]] = top_input
    n = total_count(calibration.shape[0], "calibration rows")  # every rank's rows: the loss is their mean

    def from_head(b: int, h_out: torch.Tensor) -> torch.Tensor:
        ids = calibration[b * batch_size : b * batch_size + h_out.shape[0]]  # [b, T]
        return _head_gradient(model, ids, h_out, n, tuple_out).to(h_out.device)

    # the bottom layer reads its output from the store of the layer above when it has nothing to differentiate
    bottom_reads_output = not param_grads and len(kept) > 1
    bar = tqdm(total=len(kept), desc="gradient pass: backward", unit="layer")
    grads = None
    try:
        for pos in range(len(kept) - 1, -1, -1):
            i = kept[pos]
            step = _LayerStep(i, layers[i], inputs[i], kwargs[i], param_grads, need_input_grad=pos > 0,
                              stored_output=inputs[kept[1]] if pos == 0 and bottom_reads_output else None)
            grads = step.run(grads, from_head, visit, counts)
            if not (pos == 1 and bottom_reads_output):
                inputs.pop(i).close()
            bar.update(1)
    finally:
        bar.close()
        for store in [*inputs.values(), grads]:
            if store is not None:
                store.close()
    return kept


@dataclass
class _LayerStep:
    """One layer's backward step over every batch (``stored_output``: its output per batch, when stored)."""

    i: int
    layer: object
    inputs: ActivationStore
    kwargs: dict
    param_grads: bool
    need_input_grad: bool
    stored_output: ActivationStore | None

    def run(self, grads: ActivationStore | None, from_head, visit, counts: dict) -> ActivationStore:
        """Visit every batch with ``dL/d(output)`` from ``grads`` (the layer above's store, closed here) or, for
        the top layer (``grads`` None), ``from_head(b, h_out)``; returns ``dL/d(input)`` per batch (empty when
        not needed)."""
        out_grads = self.inputs.like()
        rerun = self.need_input_grad or self.param_grads or self.stored_output is None
        with onloaded(self.layer):
            params = list(self.layer.parameters()) if self.param_grads else []
            device = execution_device(self.layer)
            try:
                for p in params:
                    p.requires_grad_(True)
                for b in range(len(self.inputs)):
                    h_in = self.inputs.get(b, device).requires_grad_(self.need_input_grad)  # [b, T, d]
                    if rerun:
                        with torch.enable_grad():
                            h_out = run_layer(self.layer, h_in, self.kwargs)  # [b, T, d], with the graph
                    else:  # nothing to differentiate: the stored output is this layer's
                        h_out = self.stored_output.get(b, device)
                    if grads is None:  # the top layer: the head's gradient at this very output
                        g_out = from_head(b, h_out.detach())  # [b, T, d]
                    else:
                        g_out = grads.get(b, h_out.device).to(h_out.dtype)  # [b, T, d]
                    wrt = ([h_in] if self.need_input_grad else []) + params
                    got = torch.autograd.grad(h_out, wrt, g_out) if wrt else ()
                    if self.need_input_grad:
                        out_grads.append(got[0])
                    visit(LayerGrad(self.i, b, h_in.detach(), h_out.detach(), g_out,
                                    tuple(got[1:] if self.need_input_grad else got) if self.param_grads else None))
                    del h_out, got
            except BaseException:
                out_grads.close()
                raise
            finally:
                for p in params:
                    p.requires_grad_(False)
                if grads is not None:
                    grads.close()
        counts["layer_forwards"] += 1 if rerun else 0
        counts["layer_backwards"] += 1 if (self.need_input_grad or self.param_grads) else 0
        return out_grads
