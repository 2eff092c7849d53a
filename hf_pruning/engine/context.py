"""A calibration context: eval mode, no KV cache, no gradients kept; everything restored in ``finally``."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def calibration_mode(model):
    """Eval mode, ``use_cache=False`` and ``requires_grad=False`` on every parameter, restored on exit."""
    was_training = model.training
    use_cache = getattr(model.config, "use_cache", None)
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    model.eval()
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        model.train(was_training)
        if use_cache is not None:
            model.config.use_cache = use_cache
        for name, p in model.named_parameters():
            p.requires_grad_(grads.get(name, p.requires_grad))


@contextlib.contextmanager
def hooks():
    """Collects hook handles (``handles.append(module.register_forward_hook(...))``); removes all on exit."""
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()
