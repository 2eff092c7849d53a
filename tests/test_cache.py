"""KV cache: attention-less layers (layer 0 included) take no cache; incremental decoding stays exact."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHS, NEW_ARCHS, tiny_model, tokens
from transformers import DynamicCache

import hf_pruning

PLAN = {
    "ops": [
        {"op": "drop_attention", "layer": 0},
        {"op": "remove_heads", "layer": 1, "heads": [0, 5, 6]},
        {"op": "value_only_attention", "layer": 3},
        {"op": "drop_mlp", "layer": 4},
        {"op": "remove_layers", "layers": [2]},
    ]
}


def pruned(arch):
    return hf_pruning.apply_plan_(tiny_model(arch), PLAN)


@pytest.mark.parametrize("arch", ARCHS + NEW_ARCHS)
def test_one_token_steps_equal_full_forward(arch):
    model = pruned(arch)
    x = tokens(batch=2, length=10)
    with torch.no_grad():
        full = model(x, use_cache=False).logits
        out = model(x[:, :4], use_cache=True)
        cache = out.past_key_values
        steps = [out.logits]
        for t in range(4, x.shape[1]):
            out = model(x[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    # layers 0 and 2 (value-only, renumbered) hold no KV states; the others do
    assert cache.get_seq_length() == x.shape[1]
    for idx in (0, 2):
        assert getattr(cache.layers[idx], "keys", None) is None or cache.layers[idx].keys.numel() == 0
    assert cache.layers[1].keys.numel() > 0 and cache.layers[1].get_seq_length() == x.shape[1]


@pytest.mark.parametrize("arch", ARCHS + NEW_ARCHS)
def test_generate_with_and_without_cache_agree(arch):
    model = pruned(arch)
    x = tokens(batch=1, length=6)
    a = model.generate(x, max_new_tokens=8, do_sample=False, use_cache=True)
    b = model.generate(x, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt"])
def test_padding_matches_unpadded(arch):
    """Head counts kept consistent: a left-padded batch gives the same logits as the unpadded row."""
    model = pruned(arch)
    x = tokens(batch=1, length=8)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(x)], dim=1)
    with torch.no_grad():
        plain = model(x).logits
        with_pad = model(padded, attention_mask=mask).logits[:, 3:]
    torch.testing.assert_close(with_pad, plain, atol=1e-4, rtol=0)


def test_user_cache_is_prepared():
    model = pruned("llama")
    x = tokens(batch=1, length=5)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(x, past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == 5


@pytest.mark.parametrize("arch", ARCHS + NEW_ARCHS)
def test_static_cache_generate_matches_dynamic(arch):
    model = pruned(arch)
    x = tokens(batch=1, length=5)
    reference = model.generate(x, max_new_tokens=4, do_sample=False)
    out = model.generate(x, max_new_tokens=4, do_sample=False, cache_implementation="static")
    assert torch.equal(out, reference)


@pytest.mark.parametrize("arch", ARCHS + NEW_ARCHS)
@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_one_token_steps_through_a_prebuilt_cache(arch, kind):
    """A cache built before the first forward (as generate builds it): positions and masks come from the slots
    of attention-less layers too (layer 0 here), so each must report a real layer's length."""
    from transformers import StaticCache

    model = pruned(arch)
    x = tokens(batch=1, length=8)
    cache = DynamicCache(config=model.config) if kind == "dynamic" else StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad():
        full = model(x, use_cache=False).logits
        steps = [model(x[:, :3], past_key_values=cache, use_cache=True).logits]
        for t in range(3, x.shape[1]):
            steps.append(model(x[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    assert int(cache.get_seq_length()) == x.shape[1]
