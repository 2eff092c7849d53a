"""The sequential engine: for each decoder layer, for each batch.

Calibration activations live in an :class:`ActivationStore` (CPU or disk); each decoder layer is onloaded once
(:func:`onloaded`) while every batch goes through it one at a time, and the layer's outputs become the next
layer's inputs. Peak memory is one layer's weights, one batch on the execution device and the store.
"""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from ..remote.hf_pruning_surgery import adapter_for
from .capture import LAYER_BATCH, capture, run_layer
from .capture import layer_kwargs as layer_kwargs_of
from .checkpoint import LayerCheckpoint
from .context import calibration_mode
from .offload import execution_device, onloaded
from .store import ActivationStore


@torch.no_grad()
def propagate(layer, inputs: ActivationStore, kwargs: dict, outputs: ActivationStore | None = None) -> ActivationStore:
    """``layer``'s outputs for every batch of ``inputs`` (one batch on the layer's device at a time)."""
    outputs = outputs if outputs is not None else inputs.like()
    device = execution_device(layer)
    for i in range(len(inputs)):
        outputs.append(run_layer(layer, inputs.get(i, device), kwargs))
    return outputs


@torch.no_grad()
def sequential(model, calibration: torch.Tensor, process_layer: Callable, desc: str,
               batch_size: int | None = None, store_folder: str | bool | None = None) -> list[dict]:
    """Call ``process_layer(index, layer, inputs, kwargs) -> report`` for every decoder layer in order, each
    layer onloaded once, then propagate the inputs through the (now changed) layer. ``inputs`` is an
    :class:`ActivationStore` of hidden-state batches ``[b, T, d]`` (the kwargs captured on one row broadcast
    over a batch). A ``process_layer`` that already ran the changed layer returns ``(report, outputs)``
    (a store) and the propagation pass is skipped. ``store_folder``: keep activations on disk there
    (``True``: a temporary folder). Inside ``engine.resumable(folder)`` every finished layer is checkpointed and
    a rerun resumes after the last one (:mod:`.checkpoint`). Returns the per-layer reports."""
    layers = adapter_for(model).decoder_layers(model)
    batch_size = batch_size or LAYER_BATCH
    with calibration_mode(model):
        checkpoint = LayerCheckpoint.active(model, calibration, desc, batch_size)
        inputs = checkpoint.restore(layers, store_folder) if checkpoint else None
        reports, start = (list(checkpoint.reports), checkpoint.done) if inputs is not None else ([], 0)
        if inputs is None:
            inputs, layer_kwargs = capture(model, calibration, batch_size, ActivationStore(store_folder))
        else:
            layer_kwargs = layer_kwargs_of(model, calibration[0])
        try:
            bar = tqdm(range(start, len(layers)), desc=desc, unit="layer", initial=start, total=len(layers))
            for i in bar:
                layer = layers[i]
                with onloaded(layer):
                    result = process_layer(i, layer, inputs, layer_kwargs[i])
                    report, outputs = result if isinstance(result, tuple) else (result, None)
                    if outputs is None:
                        outputs = propagate(layer, inputs, layer_kwargs[i])
                    reports.append(report or {})
                    if checkpoint:
                        checkpoint.save(i, layer, outputs, reports)
                inputs.close()
                inputs = outputs
        finally:
            inputs.close()
        if checkpoint:
            checkpoint.finish()
    return reports
