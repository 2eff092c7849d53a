"""HARP (value-only attention, alpha search, presets), FLAP and the uniform head-pruning baselines."""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch
from emulate import Emulator
from tiny_models import ARCHS, MODEL_CLASSES, tiny_config, tiny_model, tokens
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

import hf_pruning
from hf_pruning.accounting import accounting
from hf_pruning.calibration.moments import input_moments
from hf_pruning.config import ConfigError
from hf_pruning.evaluation import kv_cache_bytes
from hf_pruning.methods.flap import choose_channels, shrink_ops
from hf_pruning.methods.flap.pruner import channel_params
from hf_pruning.methods.harp import AlphaSearch
from hf_pruning.publish.verify import reload_in_fresh_process
from hf_pruning.remote.hf_pruning_surgery import adapter_for, inspect_model

IDENTITY = "hf_pruning_test_identity"
_TARGETS: set[int] = set()


def _identity_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Real attention, except that in the layers of ``_TARGETS`` the probabilities are forced to the identity."""
    if module.layer_idx in _TARGETS:
        b, h, t, _ = query.shape  # query: [B, H, T, hd]; value: [B, H_kv, T, hd]
        probs = torch.eye(t, dtype=value.dtype).expand(b, h, t, t)  # every token attends only to itself
        v = value.repeat_interleave(h // value.shape[1], dim=1)  # [B, H, T, hd]
        return (probs @ v).transpose(1, 2).contiguous(), probs  # [B, T, H, hd]
    eager = sys.modules[type(module).__module__].eager_attention_forward
    return eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


AttentionInterface.register(IDENTITY, _identity_attention)
AttentionMaskInterface.register(IDENTITY, eager_mask)  # the delegate is eager attention: it needs full masks


def identity_reference(model, layers: list[int], alphas: list[float], ops: list[dict] = ()):
    """A copy of the unpruned ``model`` whose ``layers`` attend to themselves only, with the alphas applied to the
    sublayer's contribution by hooks (and earlier ``ops`` emulated)."""
    ref = copy.deepcopy(model)
    ref.config._attn_implementation = IDENTITY
    emulator = Emulator(ref)
    for op in ops:
        emulator.apply(op)
    for layer, alpha in zip(layers, alphas):
        emulator.apply({"op": "scale_output", "layer": layer, "sublayer": "attention", "alpha": alpha})
    return ref


def _logits(model, x):
    with torch.no_grad():
        return model(x, use_cache=False).logits


# ---------------------------------------------------------------------------------------------------------
# the operator
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_value_only_attention_equals_identity_scores(arch):
    """HARP with alphas 0.3 / 0 / 1 on the top layers == full attention with identity probabilities and the
    contribution scaled (Gemma2: after its post-attention norm; soft-capping and sliding windows bypassed)."""
    model = tiny_model(arch)
    layers, alphas = [3, 4, 5], [0.3, 0.0, 1.0]
    pruned = hf_pruning.prune_(copy.deepcopy(model), hf_pruning.HARPConfig(layers=layers, alphas=alphas))
    _TARGETS.clear()
    _TARGETS.update(layers)
    x = tokens()
    torch.testing.assert_close(_logits(pruned, x), _logits(identity_reference(model, layers, alphas), x),
                               atol=2e-5, rtol=1e-5)
    states = inspect_model(pruned)
    assert [s.attention for s in states[3:]] == ["value_only", "none", "value_only"]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma2"])
def test_value_only_after_uneven_head_removal(arch):
    """GQA groups made uneven by an earlier head removal (zero padding heads) fold exactly."""
    model = tiny_model(arch)
    remove = {"op": "remove_heads", "layer": 4, "heads": [1, 2, 3] if arch == "mistral" else [0]}
    pruned = hf_pruning.apply_plan_(copy.deepcopy(model), {"ops": [remove]})
    hf_pruning.prune_(pruned, hf_pruning.HARPConfig(layers=[4, 5], alphas=[0.6, 0.9]))
    _TARGETS.clear()
    _TARGETS.update([4, 5])
    x = tokens()
    ref = identity_reference(model, [4, 5], [0.6, 0.9], ops=[remove])
    torch.testing.assert_close(_logits(pruned, x), _logits(ref, x), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt"])
def test_alpha_zero_removes_the_sublayer_and_q_k_are_deleted(arch):
    model = tiny_model(arch)
    before = hf_pruning.parameter_count(model)
    plan_report = accounting(model, hf_pruning.get_method("harp").run(
        model, hf_pruning.HARPConfig(layers=[4, 5], alphas=[0.0, 0.5]), None).plan)
    pruned = hf_pruning.prune_(copy.deepcopy(model), hf_pruning.HARPConfig(layers=[4, 5], alphas=[0.0, 0.5]))
    adapter = adapter_for(pruned)
    layers = adapter.decoder_layers(pruned)
    names4 = {n for n, _ in layers[4].named_parameters()}
    names5 = {n for n, _ in layers[5].named_parameters()}
    assert not any("self_attn" in n for n in names4)  # q, k, v, o and the attention norm are gone
    assert not any(p in n for n in names5 for p in ("q_proj", "k_proj"))
    assert before - hf_pruning.parameter_count(pruned) == plan_report["params_removed"]
    # KV cache: 2 of 6 layers keep no keys/values (exact: no sliding windows in these models)
    x = tokens(1, 12)
    with torch.no_grad():
        dense_kv = kv_cache_bytes(model(x, use_cache=True).past_key_values)
        pruned_kv = kv_cache_bytes(pruned(x, use_cache=True).past_key_values)
    assert pruned_kv / dense_kv == pytest.approx(4 / 6, abs=1e-12)
    assert plan_report["kv_removed_fraction"] == pytest.approx(2 / 6, abs=1e-12)


def test_accounting_matches_hand_counts():
    model = tiny_model("llama")  # d 64, 8 query heads of 8, 4 KV heads
    plan = hf_pruning.get_method("harp").run(model, hf_pruning.HARPConfig(layers=[4, 5], alphas=[0.5, 0.5]),
                                             None).plan
    report = accounting(model, plan, context=100)
    d, hd, nq, nkv = 64, 8, 8, 4
    assert report["removed_by_part"] == {"qk": 2 * d * hd * (nq + nkv), "vo": 2 * d * hd * (nq - nkv), "mlp": 0}
    assert report["params_removed"] == 2 * d * hd * (nq + nkv) + 2 * d * hd * (nq - nkv)
    # per layer: full attention 2*d*hd*(2nq+2nkv) + 2*nq*hd*ctx/2 x 2 flops; value-only 2*(2*d*nkv*hd)
    saved = 2 * (d * hd * (2 * nq + 2 * nkv) + 2 * nq * hd * 50 - 2 * d * nkv * hd)
    assert report["flops_per_token_before"] - report["flops_per_token_after"] == pytest.approx(2 * saved)


# ---------------------------------------------------------------------------------------------------------
# the alpha search
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_cached_search_equals_naive_with_less_work(arch):
    model = tiny_model(arch)
    calib = tokens(4, 24, seed=1)
    grid = [0.0, 0.25, 0.5, 0.75, 1.0]
    runs = {}
    for name, mode, abandon in (("cached", "cached", False), ("abandoning", "cached", True), ("naive", "naive", False)):
        search = AlphaSearch(model, calib, [3, 4, 5], grid, mode, abandon=abandon)
        alphas, trace, _ = search.run(progress=False)
        runs[name] = (alphas, trace, search)
    assert runs["cached"][0] == runs["naive"][0] == runs["abandoning"][0]
    for a, b, c in zip(runs["cached"][1], runs["naive"][1], runs["abandoning"][1]):
        assert a["layer"] == b["layer"] == c["layer"]
        for alpha in grid:
            assert math.isclose(a["ppl"][alpha], b["ppl"][alpha], rel_tol=1e-9)
            assert c["ppl"][alpha] is None or c["ppl"][alpha] == a["ppl"][alpha]  # abandoned, or the same value
    # cached: one dense pass up to the lowest searched layer, then per grid point only the layers from the
    # searched one up; naive: every layer per grid point; abandoning stops hopeless points early
    assert runs["cached"][2].layer_forwards == pytest.approx(5 + len(grid) * (1 + 2 + 3))
    assert runs["naive"][2].layer_forwards == pytest.approx(len(grid) * 3 * 6)
    assert runs["cached"][2].head_forwards == runs["naive"][2].head_forwards == pytest.approx(len(grid) * 3)
    assert runs["abandoning"][2].layer_forwards <= runs["cached"][2].layer_forwards


@pytest.mark.parametrize("arch", ["llama", "gemma2", "opt_postln"])
def test_search_score_is_the_pruned_models_calibration_perplexity(arch):
    model = tiny_model(arch)
    calib = tokens(4, 24, seed=2)
    pruned = hf_pruning.prune_(copy.deepcopy(model), hf_pruning.HARPConfig(num_layers=3), calib)
    report = pruned.hf_pruning_report
    last = report["alpha_trace"][-1]  # the lowest layer, searched last, with every other alpha fixed
    assert last["layer"] == 3 and report["alphas"][0] == last["alpha"]
    with torch.no_grad():
        loss = pruned(calib, labels=calib, use_cache=False).loss
    assert math.exp(float(loss)) == pytest.approx(last["ppl"][last["alpha"]], rel=1e-5)
    # the record replays without calibration and gives the same model
    record = pruned.config.pruning_config[-1]
    replayed = hf_pruning.prune_(copy.deepcopy(model), hf_pruning.PruningConfig.from_dict(record))
    x = tokens()
    assert torch.equal(_logits(replayed, x), _logits(pruned, x))


def test_search_prefers_the_alpha_that_fits():
    """A layer whose attention output was scaled up 3x: the search undoes it, choosing alpha ~ 1/3 over 1."""
    model = tiny_model("llama")
    calib = tokens(4, 24, seed=3)
    reference = copy.deepcopy(model)
    _TARGETS.clear()
    _TARGETS.add(5)
    reference.config._attn_implementation = IDENTITY  # the "truth": layer 5 value-only with alpha 1/3
    with torch.no_grad():
        teacher = reference.generate(calib[:, :4], max_new_tokens=20, do_sample=False, use_cache=False)
    o = adapter_for(model).decoder_layers(model)[5].self_attn.o_proj
    with torch.no_grad():
        o.weight.mul_(3.0)
    report = hf_pruning.prune_(copy.deepcopy(model), hf_pruning.HARPConfig(layers=[5], grid=[0.2, 1 / 3, 0.5, 1.0]),
                               teacher).hf_pruning_report
    assert report["alphas"] == [pytest.approx(1 / 3)]
    # alpha 1 (tried first) is far off: better points abandon it... and 0.2 / 0.5 stop early once 1/3 is known
    assert None in report["alpha_trace"][0]["ppl"].values()


# ---------------------------------------------------------------------------------------------------------
# presets, records, saving
# ---------------------------------------------------------------------------------------------------------
def test_llama_preset_places_the_published_alphas():
    config = tiny_config("llama")
    config.num_hidden_layers = 32
    torch.manual_seed(0)
    model = MODEL_CLASSES["llama"](config).eval()
    pruned = hf_pruning.prune_(model, hf_pruning.HARPConfig(preset="llama-3.1-8b"))  # no calibration needed
    states = inspect_model(pruned)
    assert [i for i, s in enumerate(states) if s.attention == "none"] == [24, 25, 27]  # alpha 0: V/O gone too
    assert [i for i, s in enumerate(states) if s.attention == "value_only"] == [26, 28, 29, 30, 31]
    scales = {op["layer"]: op["alpha"] for op in pruned.config.pruning_plan["ops"] if op["op"] == "scale_output"}
    assert scales == {26: 0.1, 28: 0.1, 29: 0.1, 30: 0.2, 31: 0.8}


@pytest.mark.parametrize("arch", ["llama", "gemma2", "opt"])
def test_harp_flap_saves_and_reloads_without_hf_pruning(arch, tmp_path):
    model = tiny_model(arch)
    calib = tokens(4, 24, seed=4)
    pruned = hf_pruning.prune_(model, hf_pruning.HARPConfig(num_layers=2, flap_ratio=0.1,
                                                            grid=[0.0, 0.5, 1.0]), calib)
    hf_pruning.save_pretrained(pruned, tmp_path / "m")
    x = tokens()
    out = reload_in_fresh_process(tmp_path / "m", x, max_new_tokens=5)
    assert torch.equal(out["logits"], _logits(pruned, x))
    gen = pruned.generate(x[:1], max_new_tokens=5, do_sample=False)
    assert torch.equal(out["generated"], gen) and torch.equal(out["generated_no_cache"], gen)


# ---------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------
def _unchanged(model, fn, error, match):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        fn()
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_bad_harp_input_is_refused_and_the_model_is_unchanged():
    model = tiny_model("llama")
    calib = tokens(4, 24)
    harp = hf_pruning.HARPConfig
    _unchanged(model, lambda: hf_pruning.prune_(model, harp(num_layers=6), calib), ValueError, "at most 5")
    _unchanged(model, lambda: hf_pruning.prune_(model, harp(layers=[2, 9], alphas=[1, 1])), ValueError, "out of range")
    _unchanged(model, lambda: hf_pruning.prune_(model, harp(preset="qwen2-7b")), ValueError, "28-layer")
    for kwargs, match in (({"num_layers": 2, "alphas": [0.5, 1.5]}, r"\[0, 1\]"),
                          ({"layers": [4, 5], "alphas": [0.5]}, "one per layer"),
                          ({"preset": "gemma2-9b", "alphas": [0.5]}, "not both"),
                          ({"num_layers": 2, "grid": [-0.1, 0.5]}, r"\[0, 1\]"),
                          ({}, "exactly one"), ({"num_layers": 2, "flap_ratio": 1.0}, "flap_ratio"),
                          ({"preset": "llama-3"}, "unknown HARP preset")):
        with pytest.raises(ConfigError, match=match):
            harp(**kwargs)
    hf_pruning.prune_(model, harp(layers=[5], alphas=[0.5]))
    _unchanged(model, lambda: hf_pruning.prune_(model, harp(layers=[4, 5], alphas=[1, 1])), ValueError,
               "already value-only")
    with pytest.raises(ValueError, match="calibration"):
        hf_pruning.prune_(tiny_model("llama"), harp(num_layers=2))


# ---------------------------------------------------------------------------------------------------------
# FLAP
# ---------------------------------------------------------------------------------------------------------
def _mlp_in(layer, arch):
    return [layer.fc1] if arch.startswith("opt") else [layer.mlp.gate_proj, layer.mlp.up_proj]


@pytest.mark.parametrize("arch", ARCHS)
def test_flap_matches_an_independent_computation_and_compensates_constant_channels(arch):
    """The kept channels equal a from-scratch WIFV + standardisation + global cut computed here; removing
    channels whose input is constant (dead rows) with the mean bias is exact."""
    model = tiny_model(arch)
    layers = adapter_for(model).decoder_layers(model)
    dead = {i: [5 + i, 40, 77] for i in range(len(layers))}
    with torch.no_grad():
        for i, chans in dead.items():
            for lin in _mlp_in(layers[i], arch):
                lin.weight[chans] = 0
                if lin.bias is not None:
                    lin.bias[chans] = 0.5  # OPT: relu(0.5) = 0.5, a constant non-zero input to fc2
    calib = tokens(4, 24, seed=5)
    # reference: WIFV from hooks, standardised per layer, the lowest overall removed
    sums = {}
    outs = {i: (layers[i].fc2 if arch.startswith("opt") else layers[i].mlp.down_proj) for i in range(len(layers))}
    handles = [outs[i].register_forward_pre_hook(lambda m, a, i=i: sums.setdefault(i, []).append(a[0].reshape(-1, a[0].shape[-1])))
               for i in outs]
    with torch.no_grad():
        model(calib, use_cache=False)
    for h in handles:
        h.remove()
    z = []
    for i in range(len(layers)):
        x = torch.cat(sums[i]).double()
        s = x.var(0) * outs[i].weight.double().pow(2).sum(0)
        z.append((s - s.mean()) / s.std())
    n_dead = sum(len(c) for c in dead.values())
    order = torch.argsort(torch.cat(z), stable=True)[:n_dead + 4]  # the dead ones and 4 more
    width = outs[0].in_features
    expected = {i: sorted(set(range(width)) - {int(k) % width for k in order if int(k) // width == i})
                for i in range(len(layers))}
    more = hf_pruning.prune_(copy.deepcopy(model), hf_pruning.FLAPConfig(ratio=(n_dead + 4) / (width * len(layers))),
                             calib)
    assert {op["layer"]: op["keep"] for op in more.config.pruning_plan["ops"]} == {
        i: k for i, k in expected.items() if len(k) < width}
    # removing exactly the constant channels with the mean bias leaves the outputs unchanged
    moments = input_moments(model, calib, outs)
    keep = {i: sorted(set(range(width)) - set(c)) for i, c in dead.items()}
    exact = hf_pruning.apply_plan_(copy.deepcopy(model), hf_pruning.PruningPlan(ops=shrink_ops(outs, moments, keep)))
    x = tokens()
    torch.testing.assert_close(_logits(exact, x), _logits(model, x), atol=2e-5, rtol=1e-5)
    plain = hf_pruning.apply_plan_(copy.deepcopy(model), hf_pruning.PruningPlan(ops=shrink_ops(outs, moments, keep, False)))
    if arch.startswith("opt"):  # without the bias the constant 0.5 inputs are lost
        assert not torch.allclose(_logits(plain, x), _logits(model, x), atol=1e-3)


def test_flap_refuses_a_budget_that_empties_a_layer():
    scores = {0: torch.tensor([0.0, 1.0], dtype=torch.float64), 1: torch.arange(100, dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"every MLP channel of layer\(s\) \[0\]"):
        choose_channels(scores, 99)
    model = tiny_model("llama")
    _unchanged(model, lambda: hf_pruning.prune_(model, hf_pruning.FLAPConfig(ratio=0.995), tokens(4, 24)),
               ValueError, "every MLP channel")
    with pytest.raises(ConfigError, match="exactly one"):
        hf_pruning.FLAPConfig()


def test_flap_param_ratio_and_harp_flap_matched_budget():
    model = tiny_model("llama")
    calib = tokens(4, 24, seed=6)
    per_channel = channel_params(model)
    flap = hf_pruning.prune_(copy.deepcopy(model), hf_pruning.FLAPConfig(param_ratio=0.05), calib)
    acc = flap.hf_pruning_report["accounting"]
    assert abs(acc["removed_by_part"]["mlp"] - 0.05 * acc["decoder_params"]) <= per_channel / 2
    matched = hf_pruning.prune_(copy.deepcopy(model), hf_pruning.HARPConfig(num_layers=2, flap_match=True,
                                                                            alphas=[0.5, 0.5]), calib)
    acc = matched.hf_pruning_report["accounting"]
    attention = sum(2 * s.hidden * s.head_dim * (s.q_heads + s.kv_heads) for s in inspect_model(model))
    target = attention * 2 / 6  # what removing 2/6 of every layer's attention would free
    removed = acc["removed_by_part"]["qk"] + acc["removed_by_part"]["vo"] + acc["removed_by_part"]["mlp"]
    assert acc["removed_by_part"]["mlp"] > 0 and abs(removed - target) <= per_channel / 2
    assert acc["kv_removed_fraction"] == pytest.approx(2 / 6)


# ---------------------------------------------------------------------------------------------------------
# uniform head pruning
# ---------------------------------------------------------------------------------------------------------
def _weaken_group(model, group: int):
    """Scale KV group ``group`` (its query heads, k/v rows and o columns) by 0.01 in every layer."""
    adapter = adapter_for(model)
    with torch.no_grad():
        for layer in adapter.decoder_layers(model):
            attn = layer.self_attn
            hd = attn.head_dim
            nq, nkv = attn.q_proj.out_features // hd, attn.k_proj.out_features // hd
            rep = nq // nkv
            q_rows = slice(group * rep * hd, (group + 1) * rep * hd)
            kv_rows = slice(group * hd, (group + 1) * hd)
            attn.q_proj.weight[q_rows] *= 0.01
            attn.o_proj.weight[:, q_rows] *= 0.01
            attn.k_proj.weight[kv_rows] *= 0.01
            attn.v_proj.weight[kv_rows] *= 0.01


@pytest.mark.parametrize("score", ["magnitude", "wanda"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_uniform_group_pruning_removes_the_weak_group(arch, score):
    model = tiny_model(arch)
    _weaken_group(model, 2)
    pruned = hf_pruning.prune_(copy.deepcopy(model), hf_pruning.HeadsConfig(score=score, per_layer=1), tokens(4, 24))
    heads = pruned.hf_pruning_report["removed_heads"]
    assert heads == {i: [4, 5] for i in range(6)}  # 8 query heads over 4 KV groups: group 2 = heads 4, 5
    assert pruned.hf_pruning_report["accounting"]["kv_removed_fraction"] == pytest.approx(1 / 4)
    assert all(s.kv_heads == 3 and s.q_heads == 6 for s in inspect_model(pruned))


def test_query_head_pruning_keeps_groups_even_and_refuses_breaking_them():
    model = tiny_model("llama")  # 8 query heads, 4 KV groups of 2
    pruned = hf_pruning.prune_(copy.deepcopy(model), hf_pruning.HeadsConfig(unit="query", per_layer=4))
    for heads in pruned.hf_pruning_report["removed_heads"].values():
        assert sorted(h // 2 for h in heads) == [0, 1, 2, 3]  # one head from every group
    assert all(s.kv_heads == 4 and s.q_heads == 4 for s in inspect_model(pruned))
    _unchanged(model, lambda: hf_pruning.prune_(model, hf_pruning.HeadsConfig(unit="query", per_layer=2)),
               ValueError, "breaks the GQA groups")
    _unchanged(model, lambda: hf_pruning.prune_(model, hf_pruning.HeadsConfig(per_layer=4)), ValueError,
               "every head")
    with pytest.raises(ValueError, match="calibration"):
        hf_pruning.prune_(model, hf_pruning.HeadsConfig(score="wanda", per_layer=1))


def test_head_param_ratio_takes_the_smallest_uniform_count():
    model = tiny_model("llama")
    total = accounting(model)["decoder_params"]
    one = accounting(model, hf_pruning.get_method("heads").run(model, hf_pruning.HeadsConfig(per_layer=1), None).plan)
    ratio = one["params_removed_fraction"] + 0.001  # just above one group per layer: two are needed
    pruned = hf_pruning.prune_(copy.deepcopy(model), hf_pruning.HeadsConfig(param_ratio=ratio))
    assert pruned.hf_pruning_report["per_layer"] == 2
    assert pruned.hf_pruning_report["accounting"]["params_removed"] >= ratio * total
