"""Weights that live off the execution device: accelerate's offload hooks, onloading a layer once, one write path.

A model dispatched by accelerate (``from_pretrained(..., device_map=...)`` with ``"cpu"``/``"disk"`` entries,
``cpu_offload``, ``disk_offload``) keeps offloaded weights on the ``meta`` device and an ``AlignDevicesHook`` on
each leaf module that copies them in from its ``weights_map`` before every call and drops them after. Calling
such a layer once per calibration batch would read it from disk once per batch; :func:`onloaded` brings a
module's weights in once and keeps them for the duration (the hooks still move the inputs). Every weight edit
goes through :func:`write_param`, which changes the live parameter and, for an offloaded module, the copy in its
``weights_map`` (an in-memory dict, or a ``.dat`` file in the offload folder for disk offload; a checkpoint's own
safetensors file is never written), so the edit survives the next offload. Without accelerate's hooks every
function here is a no-op around plain PyTorch.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

import torch
from torch import nn


def _align_hooks(module: nn.Module) -> list:
    """The ``AlignDevicesHook``\\ s attached to ``module`` itself (a ``SequentialHook`` is opened)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    hooks = list(getattr(hook, "hooks", [hook]))
    return [h for h in hooks if type(h).__name__ == "AlignDevicesHook"]


def offload_hook(module: nn.Module):
    """The hook that offloads ``module``'s own weights, or ``None``."""
    return next((h for h in _align_hooks(module) if h.offload or getattr(h, "_hfp_onloaded", False)), None)


def is_offloaded(model: nn.Module) -> bool:
    """Whether any of ``model``'s weights are held off-device by an accelerate hook."""
    return any(offload_hook(m) is not None for m in model.modules())


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: the execution device of its accelerate hook, else where its weights are."""
    for m in module.modules():
        for h in _align_hooks(m):
            if h.execution_device is not None:
                return torch.device(h.execution_device if not isinstance(h.execution_device, int)
                                    else f"cuda:{h.execution_device}")
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def onloaded(module: nn.Module):
    """``module``'s offloaded weights on the execution device for the duration, brought in once (not once per
    call); afterwards they go back to ``meta`` and the hooks offload per call again. Edits made meanwhile must go
    through :func:`write_param` (an in-place change to an onloaded tensor is lost when it is dropped)."""
    opened = []
    try:
        for m in module.modules():
            hook = offload_hook(m)
            if hook is not None and hook.offload:
                hook.pre_forward(m)  # copies the weights in from weights_map
                hook.offload, hook._hfp_onloaded = False, True  # calls now leave them in place
                opened.append((m, hook))
        yield module
    finally:
        for m, hook in reversed(opened):
            hook.offload, hook._hfp_onloaded = True, False
            hook._offload_weights(m)


def _offload_folder(loader) -> str:
    if loader.save_folder is None:  # a loader reading only safetensors files: edits go to a folder of ours
        loader.save_folder = tempfile.mkdtemp(prefix="hf_pruning_offload_")
    os.makedirs(loader.save_folder, exist_ok=True)
    return loader.save_folder


def _store_offloaded(hook, name: str, value: torch.Tensor) -> None:
    """Write ``value`` as the offloaded copy of tensor ``name`` (relative to the hooked module)."""
    from accelerate.utils import OffloadedWeightsLoader, offload_weight

    weights_map = hook.weights_map
    dataset, key = getattr(weights_map, "dataset", weights_map), getattr(weights_map, "prefix", "") + name
    value = value.detach().to("cpu", copy=True)
    if isinstance(dataset, OffloadedWeightsLoader):
        if key in dataset.state_dict:
            dataset.state_dict[key] = value
        else:  # disk: a new .dat file in the offload folder, and the index points at it from now on
            offload_weight(value, key, _offload_folder(dataset), index=dataset.index)
    else:
        dataset[key] = value


def write_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Set ``module``'s parameter or buffer ``name`` (its own, e.g. ``"weight"``) to ``value``: the live tensor
    (same dtype and device as before unless it is on ``meta``) and, when the module is offloaded, its offloaded copy.

    The one path every weight edit of the package takes; a live tensor on ``meta`` (offloaded, not onloaded)
    only gets its offloaded copy written."""
    current = getattr(module, name)
    hook = offload_hook(module)
    if hook is not None:
        _store_offloaded(hook, name, value.to(current.dtype))
    if current.device.type != "meta":
        with torch.no_grad():
            if current.shape == value.shape:
                current.copy_(value)
            else:
                current.data = value.to(device=current.device, dtype=current.dtype)
