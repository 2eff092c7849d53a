"""The language-model loss backpropagated one decoder layer at a time (layer-level checkpointing).

A no-grad forward keeps only each remaining layer's input, batch by batch, in an :class:`ActivationStore`
(CPU, or disk with ``store_folder``). The head (the model's own final norm, LM head and loss) runs once per
batch on the last layer's output and gives ``dL/dh`` there. Then, from the top layer down, each layer is
onloaded once and recomputed with gradients on its stored input, batch by batch: the incoming gradient
``dL/d(output)`` is pulled back to ``dL/d(input)`` (the next layer's incoming gradient, kept in a store) and to
the layer's weights, and a visitor reduces what it needs to scalars in that step, so no weight gradient outlives
its layer. Peak memory: one layer's weights and fp32 weight gradients, one batch on the execution device, the
stores (each the size of the calibration hidden states) and one row's logits. The sum of ``loss_row / n`` is the
mean of the rows' losses, exactly the loss of the whole-model backward it replaces.
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
def _forward(model, layers, kept: list[int], calibration: torch.Tensor, batch_size: int,
             store_folder) -> tuple[dict[int, ActivationStore], ActivationStore, list[dict]]:
    """Inputs of every kept layer and the last output, batch by batch (skipped layers pass their input)."""
    hidden, kwargs = capture(model, calibration, batch_size, ActivationStore(store_folder))
    inputs = {}
    for i in tqdm(kept, desc="gradient pass: forward", unit="layer"):
        inputs[i] = hidden
        with onloaded(layers[i]):
            hidden = propagate(layers[i], hidden, kwargs[i])
    return inputs, hidden, kwargs


def _head_gradients(model, calibration: torch.Tensor, final: ActivationStore, batch_size: int,
                    tuple_out: bool) -> ActivationStore:
    """``dL/dh`` ``[b, T, d]`` at the last layer's output per batch, with ``L`` the mean of the rows' losses.
    The head runs one row at a time, so one row's logits ``[1, T, V]`` (and their gradient) are alive at most."""
    n = calibration.shape[0]
    grads = final.like()
    device = execution_device(model.get_input_embeddings())
    for b in range(len(final)):
        rows = final.get(b, device)  # [b, T, d]
        per_row = []
        for r in range(rows.shape[0]):
            ids = calibration[b * batch_size + r][None]  # [1, T]
            hidden = rows[r : r + 1].clone().requires_grad_(True)  # [1, T, d]
            with torch.enable_grad():
                loss = head_loss(model, ids, hidden, tuple_out) / n
                (grad,) = torch.autograd.grad(loss, hidden)
            per_row.append(grad)
        grads.append(torch.cat(per_row))
    return grads


def blockwise_backward(model, calibration: torch.Tensor, skip: set[int], tuple_out: bool,
                       visit: Callable[[LayerGrad], None], param_grads: bool,
                       batch_size: int = LAYER_BATCH, store_folder: str | bool | None = None) -> list[int]:
    """Backpropagate the mean LM loss of ``calibration`` ``[n, T]`` through the model with layers ``skip`` passed
    through, one layer at a time from the top, calling ``visit(LayerGrad)`` per (layer, batch); returns the
    kept layers. ``param_grads``: also give ``dL/dθ`` of the layer's parameters (``list(layer.parameters())``
    order, the layer onloaded). The caller's ``calibration_mode`` freezes the parameters; they require grad
    only within their layer's step."""
    layers = adapter_for(model).decoder_layers(model)
    kept = [i for i in range(len(layers)) if i not in skip]
    inputs, final, kwargs = _forward(model, layers, kept, calibration, batch_size, store_folder)
    grads = None
    try:
        grads = _head_gradients(model, calibration, final, batch_size, tuple_out)
        final.close()
        for i in tqdm(kept[::-1], desc="gradient pass: backward", unit="layer"):
            grads = _layer_backward(i, layers[i], inputs[i], kwargs[i], grads, visit, param_grads,
                                    need_input_grad=i != kept[0])
            inputs.pop(i).close()
    finally:
        for store in [*inputs.values(), final, grads]:
            if store is not None:
                store.close()
    return kept


def _layer_backward(i: int, layer, inputs: ActivationStore, kwargs: dict, grads: ActivationStore, visit,
                    param_grads: bool, need_input_grad: bool) -> ActivationStore:
    """One layer's backward step over every batch; returns ``dL/d(input)`` per batch (empty when not needed)."""
    out_grads = grads.like()
    with onloaded(layer):
        params = list(layer.parameters()) if param_grads else []
        device = execution_device(layer)
        try:
            for p in params:
                p.requires_grad_(True)
            for b in range(len(inputs)):
                h_in = inputs.get(b, device).requires_grad_(need_input_grad)  # [b, T, d]
                with torch.enable_grad():
                    h_out = run_layer(layer, h_in, kwargs)  # [b, T, d], recomputed with the graph
                g_out = grads.get(b, h_out.device).to(h_out.dtype)  # [b, T, d]
                wrt = ([h_in] if need_input_grad else []) + params
                got = torch.autograd.grad(h_out, wrt, g_out) if wrt else ()
                if need_input_grad:
                    out_grads.append(got[0])
                visit(LayerGrad(i, b, h_in.detach(), h_out.detach(), g_out,
                                tuple(got[1:] if need_input_grad else got) if param_grads else None))
                del h_out, got
        except BaseException:
            out_grads.close()
            raise
        finally:
            for p in params:
                p.requires_grad_(False)
            grads.close()
    return out_grads
