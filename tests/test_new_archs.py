"""Qwen3 and Gemma3 text models, added by the architecture recipe ("Adding an architecture" in the docs).

Each goes through every registered method, save and reload (in process, in a fresh process without
hf_pruning, and on the oldest supported transformers); the parameter counts of the layer states (q/k norms
included) equal the real ones; Gemma3's sliding and global layers survive every op. The older architectures
get these checks from the per-family test files (parametrized over ARCHS); the new ones run them here, once
per method, to keep the suite short (docs/DESIGN-DECISIONS.md). test_ops.py and test_cache.py run every op
and the KV-cache checks on them too.
"""

from __future__ import annotations

import os

import pytest
import torch
from tiny_models import NEW_ARCHS, tiny_model, tokens
from transformers import AutoModelForCausalLM

import hf_pruning
from hf_pruning import PruningConfig
from hf_pruning.publish.verify import reload_in_fresh_process
from hf_pruning.remote import configuration_hf_pruning, hf_pruning_adapters, hf_pruning_state, modeling_hf_pruning
from hf_pruning.remote.hf_pruning_plan import OP_TYPES
from hf_pruning.remote.hf_pruning_surgery import adapter_for, inspect_model

OLD_PYTHON = os.environ.get("HF_PRUNING_OLD_PYTHON")
CALIB = tokens(4, 32, seed=5)

#: one small setting per registered method (a test fails when a method is added without one)
METHOD_SETTINGS = {
    "magnitude": {},
    "wanda": {},
    "sparsegpt": {"blocksize": 32},
    "llm_barber": {"init": "wanda", "threshold": 0.5},
    "flap": {"ratio": 0.2},
    "harp": {"num_layers": 2},
    "heads": {"score": "wanda", "per_layer": 1},
    "plan": {"plan": {"ops": [{"op": "drop_mlp", "layer": 1}]}},
    "shortgpt": {"num_removals": 1},
    "sleb": {"num_removals": 1},
    "finercut": {"num_removals": 1},
    "taylor": {"num_removals": 1},
    "gradmap": {"num_removals": 1},
}
#: methods applied one after another to one model, so that one checkpoint carries the ops of all of them
#: (gradmap first: it scores the dense sublayers)
STACKED = ("gradmap", "heads", "flap", "harp", "plan", "finercut", "sleb", "wanda")


def _prune(arch: str, *methods: str):
    model = tiny_model(arch)
    for method in methods:
        hf_pruning.prune_(model, PruningConfig.from_dict({"method": method, **METHOD_SETTINGS[method]}),
                          calibration=CALIB)
    return model


def _logits(model, x):
    with torch.no_grad():
        return model(x, use_cache=False).logits


def _assert_layer_states_count_every_parameter(model):
    adapter = adapter_for(model)
    for i, (layer, state) in enumerate(zip(adapter.decoder_layers(model), inspect_model(model))):
        assert state.num_params() == sum(p.numel() for p in layer.parameters()), f"layer {i}: {state}"


def test_every_registered_method_has_a_setting_here():
    assert sorted(METHOD_SETTINGS) == hf_pruning.list_methods(), "add the new method to METHOD_SETTINGS"


def test_one_table_serves_every_op_and_architecture():
    """Every op has one adapter method and one simulation; every adapter entry has its generated classes."""
    for name in OP_TYPES:
        assert callable(getattr(hf_pruning_adapters.DecoderAdapter, name + "_")), f"DecoderAdapter.{name}_"
        assert name in hf_pruning_state.SIMULATIONS, f"hf_pruning_state.SIMULATIONS[{name!r}]"
    for cls in hf_pruning_adapters.ADAPTER_CLASSES:
        config_name, model_name = hf_pruning_adapters.pruned_class_names(cls)
        config_cls = getattr(configuration_hf_pruning, config_name)  # auto_map names these module attributes
        model_cls = getattr(modeling_hf_pruning, model_name)
        assert (config_cls.__module__, config_cls.__qualname__) == (configuration_hf_pruning.__name__, config_name)
        assert (model_cls.__module__, model_cls.__qualname__) == (modeling_hf_pruning.__name__, model_name)
        assert config_cls.model_type == f"hf_pruning_{cls.arch}" and model_cls.config_class is config_cls
        assert configuration_hf_pruning.PRUNED_CONFIG_CLASSES[cls.arch] is config_cls
        assert modeling_hf_pruning.PRUNED_MODEL_CLASSES[cls.arch] is model_cls


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_qk_norms_are_counted_and_go_with_queries_and_keys(arch):
    model = tiny_model(arch)
    head_dim = model.config.head_dim
    assert inspect_model(model)[0].qk_norm_params == 2 * head_dim
    _assert_layer_states_count_every_parameter(model)
    hf_pruning.apply_plan_(model, {"ops": [
        {"op": "value_only_attention", "layer": 0},
        {"op": "remove_heads", "layer": 1, "heads": [0, 1, 5]},
        {"op": "drop_attention", "layer": 2},
    ]})
    attn = [adapter_for(model).attention(layer) for layer in adapter_for(model).decoder_layers(model)[:3]]
    assert not hasattr(attn[0], "q_norm") and not hasattr(attn[0], "k_norm")
    assert attn[1].q_norm.weight.shape == (head_dim,)  # one gain per head_dim entry, shared by the heads left
    assert [s.qk_norm_params for s in inspect_model(model)[:3]] == [0, 2 * head_dim, 0]
    _assert_layer_states_count_every_parameter(model)


def test_gemma3_layer_types_follow_removed_layers_and_attentionless_layers_keep_their_kind():
    model = tiny_model("gemma3")  # sliding: 0, 1, 2, 4; global: 3, 5
    plan = {"ops": [
        {"op": "drop_attention", "layer": 0},
        {"op": "value_only_attention", "layer": 5},
        {"op": "remove_layers", "layers": [3]},
    ]}
    hf_pruning.apply_plan_(model, plan)
    assert model.config.layer_types == ["sliding_attention"] * 4 + ["full_attention"]
    attn = [adapter_for(model).attention(layer) for layer in adapter_for(model).decoder_layers(model)]
    assert [a.is_sliding for a in attn] == [True] * 4 + [False]  # transformers 4.x picks the RoPE table by it
    _assert_caches_agree(model)


@pytest.mark.parametrize("kind", ["sliding", "full"])
def test_gemma3_without_any_attention_of_one_kind_keeps_caches_exact(kind):
    """Cache slots, masks and positions come from the layers that keep attention of the other kind."""
    layers = (0, 1, 2, 4) if kind == "sliding" else (3, 5)
    ops = [{"op": "drop_attention" if i % 2 else "value_only_attention", "layer": i} for i in layers]
    _assert_caches_agree(hf_pruning.apply_plan_(tiny_model("gemma3"), {"ops": ops}))


def _assert_caches_agree(model):
    x = tokens(batch=1, length=14)  # longer than the sliding window (6)
    reference = model.generate(x, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(model.generate(x, max_new_tokens=8, do_sample=False), reference)
    assert torch.equal(model.generate(x, max_new_tokens=8, do_sample=False, cache_implementation="static"), reference)


@pytest.mark.parametrize("arch", NEW_ARCHS)
@pytest.mark.parametrize("method", sorted(METHOD_SETTINGS))
def test_every_method_prunes_saves_and_reloads(arch, method, tmp_path):
    model = _prune(arch, method)
    _assert_layer_states_count_every_parameter(model)
    x = tokens()
    logits = _logits(model, x)
    assert torch.isfinite(logits).all()
    hf_pruning.save_pretrained(model, tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    assert type(again).__name__ == type(model).__name__
    assert torch.equal(_logits(again, x), logits)
    assert hf_pruning.get_plan(again).to_dict() == hf_pruning.get_plan(model).to_dict()


def _stacked_checkpoint(arch: str, path):
    model = _prune(arch, *STACKED)
    ops = {op.name for op in hf_pruning.get_plan(model).ops}
    assert {"remove_heads", "shrink_mlp", "remove_layers"} <= ops and ops & {"value_only_attention", "drop_attention"}
    hf_pruning.save_pretrained(model, path)
    x = tokens(length=14)
    return model, x, _logits(model, x), model.generate(x[:1], max_new_tokens=6, do_sample=False)


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_stacked_methods_reload_in_a_fresh_process(arch, tmp_path):
    model, x, logits, gen = _stacked_checkpoint(arch, tmp_path / "m")
    out = reload_in_fresh_process(tmp_path / "m", x, max_new_tokens=6)
    assert out["class"] == type(model).__name__ and out["class"].startswith("Pruned")
    assert torch.equal(out["logits"], logits)
    torch.testing.assert_close(out["logits_stepwise"], logits, atol=1e-5, rtol=0)
    assert torch.equal(out["generated"], gen) and torch.equal(out["generated_no_cache"], gen)


@pytest.mark.oldtf
@pytest.mark.skipif(not OLD_PYTHON, reason="set HF_PRUNING_OLD_PYTHON (make test builds .venv-tf457 and sets it)")
@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_stacked_methods_run_on_oldest_transformers(arch, tmp_path):
    dense = tiny_model(arch)
    hf_pruning.save_pretrained(dense, tmp_path / "dense")
    model, x, logits, gen = _stacked_checkpoint(arch, tmp_path / "m")
    old_dense = reload_in_fresh_process(tmp_path / "dense", x, python=OLD_PYTHON)
    old = reload_in_fresh_process(tmp_path / "m", x, max_new_tokens=6, python=OLD_PYTHON)
    assert old["class"] == type(model).__name__
    version_gap = (old_dense["logits"] - _logits(dense, x)).abs().max().item()
    assert (old["logits"] - logits).abs().max().item() <= 2 * version_gap + 1e-5
    assert torch.equal(old["generated"], gen) and torch.equal(old["generated_no_cache"], gen)


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_accounting_parts_include_the_qk_norms(arch):
    from hf_pruning.accounting import accounting

    model = tiny_model(arch)
    plan = hf_pruning.PruningPlan.from_dict({"ops": [{"op": "value_only_attention", "layer": 4},
                                                     {"op": "value_only_attention", "layer": 5}]})
    report = accounting(model, plan)
    d, hd = model.config.hidden_size, model.config.head_dim
    nq, nkv = model.config.num_attention_heads, model.config.num_key_value_heads
    assert report["removed_by_part"]["qk"] == 2 * (d * hd * (nq + nkv) + 2 * hd)
    assert sum(report["removed_by_part"].values()) == report["params_removed"]
