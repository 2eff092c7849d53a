"""Tiny models with weights offloaded the way accelerate does it, for the engine's parity tests.

``offloaded_model(arch, mode, folder)`` returns the same tiny model as ``tiny_model(arch)`` with:

- ``"memory"``: nothing offloaded (the reference);
- ``"cpu"``: every weight offloaded to a CPU ``weights_map`` by ``accelerate.cpu_offload`` (execution on CPU:
  on this GPU-less machine that is what CPU offload looks like to the code);
- ``"disk"``: saved with ``save_pretrained`` and reloaded with a ``device_map`` that keeps the embeddings, the
  first two decoder layers, the final norm and the head in memory and puts the other layers on ``"disk"``
  (their weights are read from the checkpoint's safetensors file; edits go to ``folder/offload``).
"""

from __future__ import annotations

import os

import torch
from tiny_models import tiny_model

MODES = ("memory", "cpu", "disk")


def _disk_map(model) -> dict:
    from hf_pruning.remote.hf_pruning_surgery import adapter_for

    adapter = adapter_for(model)
    layers = adapter.decoder_layers(model)
    names = {id(m): n for n, m in model.named_modules()}
    layer_names = [names[id(layer)] for layer in layers]
    device_map = {name: ("cpu" if i < 2 else "disk") for i, name in enumerate(layer_names)}
    prefix = layer_names[0].rsplit(".", 2)[0]  # the module holding the layer list, e.g. "model"
    for name in dict(model.named_children()):
        if name != prefix.split(".")[0]:
            device_map[name] = "cpu"
    for name, _ in model.get_submodule(prefix).named_children():
        if name != "layers":
            device_map[f"{prefix}.{name}"] = "cpu"
    return device_map


def offloaded_model(arch: str, mode: str, folder: str, seed: int = 0, model=None):
    """The tiny ``arch`` model (``tiny_model(arch, seed)``, or ``model``) with its weights placed as ``mode`` says."""
    model = tiny_model(arch, seed) if model is None else model
    if mode == "memory":
        return model
    if mode == "cpu":
        from accelerate import cpu_offload

        return cpu_offload(model, execution_device=torch.device("cpu"))
    if mode == "disk":
        from transformers import AutoModelForCausalLM

        path = os.path.join(folder, f"{arch}-checkpoint")
        model.save_pretrained(path)
        reloaded = AutoModelForCausalLM.from_pretrained(
            path, device_map=_disk_map(model), offload_folder=os.path.join(folder, "offload"),
            dtype=torch.float32, attn_implementation=model.config._attn_implementation)
        return reloaded.eval()
    raise ValueError(mode)


def offload_hooks_in_place(model) -> int:
    """How many modules still carry an accelerate hook that offloads their weights (0 for an in-memory model)."""
    from hf_pruning.engine import offload_hook

    return sum(offload_hook(m) is not None for m in model.modules())
