"""Evaluation on tiny models: deterministic perplexity, measured KV bytes, lm-eval zero-shot, pruning cost."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import ARCHS, tiny_model, tiny_tokenizer, tokens

import hf_pruning
from hf_pruning.accounting import flops_per_token
from hf_pruning.evaluation import (
    compare_speed,
    measure_pruning,
    measure_speed,
    perplexity,
    zero_shot,
)


def test_perplexity_is_deterministic_and_matches_a_direct_computation():
    model = tiny_model("llama")
    windows = tokens(batch=5, length=32, seed=1)
    a, b = perplexity(model, windows, batch_size=2), perplexity(model, windows, batch_size=5)
    assert abs(a - b) < 1e-6 * a
    with torch.no_grad():
        logits = model(windows).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert abs(a - nll.exp().item()) < 1e-4 * a
    assert not model.training


@pytest.mark.parametrize("arch", ARCHS)
def test_measured_kv_bytes_drop_by_the_removed_attention_share(arch):
    dense = tiny_model(arch)
    pruned = hf_pruning.apply_plan_(tiny_model(arch), {"ops": [
        {"op": "drop_attention", "layer": 0}, {"op": "value_only_attention", "layer": 4}]})
    d = measure_speed(dense, prefill_tokens=16, decode_tokens=2)
    p = measure_speed(pruned, prefill_tokens=16, decode_tokens=2)
    if arch in ("mistral", "gemma2"):  # sliding-window layers keep at most window-1 tokens: compare per layer
        assert p["kv_bytes_per_token"] < d["kv_bytes_per_token"]
    else:
        assert p["kv_bytes_per_token"] == pytest.approx(d["kv_bytes_per_token"] * 4 / 6)


def test_compare_speed_reports_ratios_and_the_flop_ideal():
    dense = tiny_model("qwen2")
    pruned = hf_pruning.apply_plan_(tiny_model("qwen2"), {"ops": [{"op": "remove_layers", "layers": [0, 1, 2]}]})
    out = compare_speed(dense, pruned, prefill_tokens=32, decode_tokens=4, repeats=1)
    for key in ("prefill_speedup", "decode_speedup", "ideal_speedup", "kv_removed"):
        assert out[key] is not None and out[key] > 0
    assert out["kv_removed"] == pytest.approx(0.5)
    head = dense.lm_head.weight.numel()
    assert out["ideal_speedup"] == pytest.approx(
        (flops_per_token(dense, 32)) / (flops_per_token(dense, 32) - (flops_per_token(dense, 32) - 2 * head) / 2))


def test_measure_pruning_reports_time_passes_and_memory():
    model = tiny_model("opt")
    calib = tokens(batch=4, length=32)
    cost = measure_pruning(lambda: hf_pruning.apply_plan_(model, {"ops": [{"op": "drop_mlp", "layer": 1}]}),
                           model, calib)
    assert cost["prune_s"] > 0 and cost["forward_s"] > 0 and cost["passes"] == cost["prune_s"] / cost["forward_s"]
    assert cost["peak_rss_mb"] > 0 and cost["peak_rss_ratio"] >= 1  # the model itself plus the working set
    assert cost["peak_rss_ratio"] == pytest.approx((cost["model_mb"] + cost["peak_rss_delta_mb"]) / cost["model_mb"])


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_zero_shot_on_the_embedded_tasks(tok):
    model = tiny_model("llama")
    acc = zero_shot(model, tok, limit=6, batch_size=4)
    assert set(acc) == {"social_iqa", "wikihow_goal_inference"}
    assert all(0.0 <= v <= 1.0 for v in acc.values())
    assert zero_shot(model, tok, ["social_iqa"], limit=6, batch_size=4) == {"social_iqa": acc["social_iqa"]}


def test_unknown_task_is_a_clear_error(tok):
    with pytest.raises(ValueError, match="unknown lm-eval task.*no_such_task.*local tasks: social_iqa"):
        zero_shot(tiny_model("llama"), tok, ["no_such_task"], limit=2)


def test_tokenizer_without_special_tokens_is_refused(tok):
    bare = copy.deepcopy(tok)
    bare.eos_token = None
    bare.bos_token = None
    with pytest.raises(ValueError, match="neither an EOS nor a BOS token"):
        zero_shot(tiny_model("llama"), bare, ["social_iqa"], limit=2)
