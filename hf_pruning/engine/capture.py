"""Run a model layer by layer without touching its layers' ``forward``: substitute entries and hooks only.

:func:`substituted` puts stand-in modules in the decoder's ``ModuleList`` for the duration (the real layers,
with any accelerate hooks, stay untouched). :func:`capture` runs the model with every layer replaced by a
recorder, so only the embeddings compute: it returns the layer-0 hidden states per batch in an
:class:`ActivationStore` and, per layer, the keyword arguments the model passes it (attention masks, rotary
position embeddings; Gemma2/3's differ between sliding and full layers), recorded once on a single row so they
broadcast over any batch. :func:`head_forward` runs the model's own final norm and LM head on given final
hidden states the same way.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..remote.hf_pruning_surgery import adapter_for
from .offload import execution_device
from .store import ActivationStore

#: calibration rows run through a layer together (the same batch as the forward that defines "passes")
LAYER_BATCH = 4


class StopForward(Exception):
    """Raised by a stand-in to end a model forward early (never escapes this package)."""


def returns_tuple(layer: nn.Module) -> bool:
    """Whether ``layer``'s class declares a tuple return (older transformers' Gemma2 and OPT layers do; the model
    then reads ``outputs[0]``), from the annotation of its ``forward``."""
    import inspect

    annotation = inspect.signature(type(layer).forward).return_annotation
    return "tuple" in str(annotation).lower()


class Standin(nn.Module):
    """A decoder-layer stand-in: looks like ``layer`` to the model (its attributes, e.g. ``attention_type``,
    are read through) and calls ``fn(hidden, kwargs)`` instead of computing. ``tuple_out``: return ``(h,)``
    (default: as ``layer``'s class declares, :func:`returns_tuple`)."""

    def __init__(self, layer: nn.Module, fn, tuple_out: bool | None = None):
        super().__init__()
        object.__setattr__(self, "_layer", layer)  # not a submodule: its weights are not this module's
        self._fn, self._tuple_out = fn, returns_tuple(layer) if tuple_out is None else tuple_out

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_layer"), name)

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        out = self._fn(hidden, kwargs)
        return (out,) if self._tuple_out else out


@contextlib.contextmanager
def substituted(layers: nn.ModuleList, replacements: dict[int, nn.Module]):
    """Decoder layers ``replacements`` (index -> module) stand in for the originals for the duration."""
    saved = {i: layers[i] for i in replacements}
    try:
        for i, module in replacements.items():
            layers[i] = module
        yield layers
    finally:
        for i, module in saved.items():
            layers[i] = module


def run_layer(layer, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Call one decoder layer as the model does; returns its output hidden states ``[b, T, d]``."""
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def _record(model, ids: torch.Tensor, keep) -> None:
    """One model forward on ``ids`` ``[b, T]`` with every layer a recorder ``keep(idx, hidden, kwargs)``."""
    layers = adapter_for(model).decoder_layers(model)
    last = len(layers) - 1

    def recorder(idx):
        def fn(hidden, kwargs):
            keep(idx, hidden, kwargs)
            if idx == last:
                raise StopForward
            return hidden

        return fn

    with substituted(layers, {i: Standin(layer, recorder(i)) for i, layer in enumerate(layers)}):
        try:
            model(ids.to(execution_device(model.get_input_embeddings())), use_cache=False)
        except StopForward:
            pass


def layer_kwargs(model, ids: torch.Tensor) -> list[dict]:
    """Per decoder layer, the keyword arguments the model calls it with for one row of ``ids`` ``[T]``."""
    found: list = [None] * len(adapter_for(model).decoder_layers(model))

    def keep(idx, hidden, kwargs):
        found[idx] = {k: v for k, v in kwargs.items() if k != "hidden_states"}

    _record(model, ids[None], keep)
    return found


def capture(model, calibration: torch.Tensor, batch_size: int = LAYER_BATCH,
            store: ActivationStore | None = None) -> tuple[ActivationStore, list[dict]]:
    """Layer-0 inputs of ``calibration`` ``[n, T]`` in batches of ``batch_size`` rows (``[b, T, d]`` each, in
    ``store`` or a new CPU store) and the per-layer call kwargs (recorded on row 0; rows share them)."""
    kwargs = layer_kwargs(model, calibration[0])
    store = store if store is not None else ActivationStore()

    def keep(idx, hidden, _):
        if idx == 0:
            store.append(hidden)

    for i in range(0, calibration.shape[0], batch_size):
        _record(model, calibration[i : i + batch_size], keep)
    return store, kwargs


def capture_layer_inputs(model, calibration: torch.Tensor) -> tuple[list[torch.Tensor], list[dict]]:
    """Layer-0 inputs ``[1, T, d]`` per row (on the model's execution device) and the per-layer call kwargs."""
    store, kwargs = capture(model, calibration, batch_size=1)
    device = execution_device(adapter_for(model).decoder_layers(model)[0])
    rows = [store.get(i, device).clone() for i in range(len(store))]
    store.close()  # its files, when activations are on disk, are not left behind
    return rows, kwargs


@torch.no_grad()
def head_forward(model, ids: torch.Tensor, final_hidden: torch.Tensor, tuple_out: bool) -> torch.Tensor:
    """The model's logits ``[b, T, V]`` (float32) for token ids ``[b, T]`` given the last layer's output
    ``[b, T, d]``: the model's own forward with every layer a stand-in (the last returns ``final_hidden``), so
    the final norm, any output projection, the LM head and logit soft-capping are exactly the model's."""
    layers = adapter_for(model).decoder_layers(model)
    last = len(layers) - 1

    def through(idx):
        return lambda hidden, kwargs: final_hidden.to(hidden.device) if idx == last else hidden

    with substituted(layers, {i: Standin(layer, through(i), tuple_out) for i, layer in enumerate(layers)}):
        out = model(ids.to(execution_device(model.get_input_embeddings())), use_cache=False)
    return out.logits.float()


def pass_through(layers: nn.ModuleList, skip, tuple_out: bool) -> dict[int, nn.Module]:
    """Stand-ins that return their input, for the layers ``skip`` (use with :func:`substituted`)."""
    return {i: Standin(layers[i], lambda hidden, kwargs: hidden, tuple_out) for i in skip}
