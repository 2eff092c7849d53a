"""Shared by the bad-input tests: a refused call raises the expected error and leaves the model as it was."""

from __future__ import annotations

import re

import pytest
import torch

#: the five supported architectures (the OPT post-LayerNorm variant adds nothing to input checks)
ARCHS5 = ("llama", "mistral", "qwen2", "gemma2", "opt")


def snapshot(model) -> dict[str, torch.Tensor]:
    """Every tensor of the model's state, cloned; offloaded weights are read from accelerate's offload store."""
    if any(getattr(m, "_hf_hook", None) is not None for m in model.modules()):
        from accelerate.utils.modeling import get_state_dict_offloaded_model

        return {k: v.clone() for k, v in get_state_dict_offloaded_model(model).items()}
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before: dict[str, torch.Tensor]) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    for name, old in before.items():
        new = after[name]
        if old.is_meta:  # no values to compare: the shape and dtype must not move
            assert new.is_meta and new.shape == old.shape and new.dtype == old.dtype, name
        else:
            assert torch.equal(new, old), name


def refused(model, call, error: type[BaseException], *patterns: str) -> BaseException:
    """``call()`` raises ``error`` whose message matches every regex in ``patterns`` (what is wrong and the way
    out); the model keeps its class, every tensor and its config records."""
    before = snapshot(model)
    cls = type(model)
    config = getattr(model, "config", None)
    records = {k: getattr(config, k, None) for k in ("pruning_plan", "pruning_config", "model_type")}
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in: {message}"
    assert type(model) is cls
    assert {k: getattr(config, k, None) for k in records} == records
    assert_unchanged(model, before)
    return info.value
