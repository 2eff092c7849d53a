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


def onload_bound(model: nn.Module) -> bool:
    """Whether onloading ``model``'s layers can cost more than running one calibration row through them: weights
    offloaded (to CPU RAM or disk) for an accelerator that computes far faster than they cross to it. On the CPU a
    row's compute outweighs reading a layer again from RAM or the page cache (2 x tokens flops per fp32 weight
    byte at 128 tokens is 64; a core does tens of Gflop/s and copies GB/s): the real Qwen2.5-Coder-1.5B with its
    layers on disk took 3.1x its in-memory time in FinerCut's search with 4-row chunks, whose branch and bound cuts
    only after whole chunks."""
    return is_offloaded(model) and execution_device(model).type != "cpu"


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


def _own_tensors(module: nn.Module, hook) -> list[tuple[str, torch.Tensor]]:
    """The tensors ``hook`` moves for ``module`` (its own parameters and, when it offloads them, buffers)."""
    from accelerate.utils import named_module_tensors

    return list(named_module_tensors(module, include_buffers=hook.offload_buffers, recurse=hook.place_submodules,
                                     remove_non_persistent=True))


def _matches_offloaded(hook, name: str, value: torch.Tensor) -> bool:
    """Whether the offloaded copy of ``name`` already equals ``value``."""
    try:
        stored = hook.weights_map[name]
    except KeyError:
        return False
    return tuple(stored.shape) == tuple(value.shape) and torch.equal(stored.to(value.device, value.dtype), value)


def _rebind_forward(module: nn.Module) -> None:
    """An accelerate hook calls the ``forward`` the module had when it was hooked; a surgery that changed the
    module's class (a compensation attached to a norm) changed that forward: the hook calls the new one."""
    old = module.__dict__.get("_old_forward")
    current = type(module).forward
    if old is not None and getattr(old, "__func__", None) is not current:
        module._old_forward = current.__get__(module)


@contextlib.contextmanager
def edited(module: nn.Module):
    """``module`` onloaded (:func:`onloaded`) for in-place surgery that may replace, reshape or change tensors
    directly; before it is offloaded again, every tensor of its still-hooked submodules that the surgery replaced
    or changed goes through :func:`write_param` (so the offloaded copies hold the edit), the rest is left as it
    is. Submodules the surgery created anew carry no hook: they stay where they were created (the execution
    device). Without offloading this is a plain ``yield``."""
    with onloaded(module):
        before = {}
        for m in module.modules():
            hook = offload_hook(m)
            if hook is not None:
                before.update({(id(m), name): t for name, t in _own_tensors(m, hook)})
        yield module
        for m in module.modules():
            hook = offload_hook(m)
            if hook is None:
                continue
            _rebind_forward(m)
            for name, t in _own_tensors(m, hook):
                if t.device.type == "meta" or (before.get((id(m), name)) is t and _matches_offloaded(hook, name, t)):
                    continue
                write_param(m, name, t)


@contextlib.contextmanager
def onloaded_except(model: nn.Module, exclude: nn.Module):
    """Every offloaded module of ``model`` outside ``exclude`` (e.g. the decoder's layer list: the embeddings,
    final norm and LM head) onloaded once for the duration, as :func:`onloaded` does."""
    inside = {id(m) for m in exclude.modules()}
    target = next(n for n, m in model.named_modules() if m is exclude)
    with contextlib.ExitStack() as stack:
        for name, m in model.named_modules():
            holder = name == "" or target.startswith(name + ".")  # an ancestor of ``exclude``: its children only
            if id(m) not in inside and not holder and offload_hook(m) is not None:
                stack.enter_context(onloaded(m))
        yield model
