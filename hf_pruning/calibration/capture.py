"""Run a model layer by layer: capture what each decoder layer receives, then call layers one at a time.

``capture_layer_inputs`` runs the model once per sample with every decoder layer replaced by a pass-through
recorder (so only the embeddings compute), stopping before the final norm and LM head with a private
exception. It returns the layer-0 hidden states of every sample and, per layer, the keyword arguments the
model passes it (attention masks, rotary position embeddings; Gemma2's differ between sliding and full
layers), so that ``run_layer`` can later call any layer exactly as the model would.
"""

from __future__ import annotations

import torch

from ..remote.hf_pruning_surgery import adapter_for


class _StopForward(Exception):
    """Raised by the last recorder to end a capture forward early (never escapes this module)."""


def _hidden(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def capture_layer_inputs(model, calibration: torch.Tensor) -> tuple[list[torch.Tensor], list[dict]]:
    """Layer-0 inputs ``[1, T, d]`` per sample and the per-layer call kwargs (shared by all samples).

    Every calibration row is run on its own (batch 1), so masks and position embeddings are the same for all.
    """
    layers = adapter_for(model).decoder_layers(model)
    device = next(model.parameters()).device
    inputs: list[torch.Tensor] = []
    layer_kwargs: list[dict | None] = [None] * len(layers)

    def recorder(idx):
        def forward(*args, **kwargs):
            hidden = _hidden(args, kwargs)
            if idx == 0:
                inputs.append(hidden.detach().clone())
            if layer_kwargs[idx] is None:
                layer_kwargs[idx] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            if idx == len(layers) - 1:
                raise _StopForward
            return hidden

        return forward

    try:
        for idx, layer in enumerate(layers):
            layer.forward = recorder(idx)
        for row in calibration:
            try:
                model(row[None].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for layer in layers:  # drop the instance attribute: the class's forward is back
            layer.__dict__.pop("forward", None)
    return inputs, layer_kwargs


def run_layer(layer, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Call one decoder layer as the model does; returns its output hidden states ``[1, T, d]``."""
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out
