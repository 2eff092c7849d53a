"""FinerCut, ShortGPT and SLEB: score functions, the search modes, budgets, plans, save/reload, pictures, errors."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import ARCHS, tiny_model, tokens

import hf_pruning
from hf_pruning import FinerCutConfig, ShortGPTConfig, SLEBConfig
from hf_pruning.config import ConfigError
from hf_pruning.methods.depth import Candidate, candidates_for, removal_params
from hf_pruning.methods.finercut import finercut_search, metrics, removal_score
from hf_pruning.publish.verify import reload_in_fresh_process

CALIB = tokens(batch=3, length=24, seed=5)


def _lp(probs):
    return torch.tensor(probs, dtype=torch.float64).log()


# ----- score functions on hand-made distributions ---------------------------------------------------------
def test_divergences_match_hand_computed_values():
    p, q = [0.5, 0.5], [0.9, 0.1]
    m = [(a + b) / 2 for a, b in zip(p, q)]
    kl = lambda a, b: sum(x * math.log(x / y) for x, y in zip(a, b))  # noqa: E731
    log_p, log_q = _lp([p]), _lp([q])
    assert metrics.kl(log_p, log_q) == pytest.approx(kl(p, q))
    assert metrics.js(log_p, log_q) == pytest.approx(0.5 * (kl(p, m) + kl(q, m)))
    # the official code's variant: reversed KL terms, averaged over the 2 vocabulary entries of the 1 token
    assert metrics.js_code(log_p, log_q) == pytest.approx(0.5 * (kl(m, p) + kl(m, q)) / 2)
    assert metrics.js(log_p, log_q) != pytest.approx(metrics.js_code(log_p, log_q) * 2)  # not the same formula
    for fn in (metrics.js, metrics.js_code):
        assert fn(log_p, log_q) == pytest.approx(fn(log_q, log_p))  # symmetric
        assert fn(log_p, log_p) == pytest.approx(0.0, abs=1e-12)


def test_angular_norm_and_perplexity():
    a = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    b = torch.tensor([[0.0, 2.0, 0.0], [2.0, 2.0, 0.0]])
    assert metrics.angular(a, b) == pytest.approx((math.pi / 2 + 0.0) / 2, abs=1e-3)  # float32 acos near 1
    assert metrics.norm(a, b) == pytest.approx(math.sqrt(1 + 4 + 1 + 1))
    uniform = torch.zeros(5, 7)  # every next token equally likely among 7
    assert metrics.perplexity(uniform, torch.tensor([1, 2, 3, 4, 5])) == pytest.approx(7.0)


@pytest.mark.parametrize("tokens", [1, 63, 64, 150])
def test_metrics_over_token_slices_equal_the_whole_tensor_formulas(tokens):
    """The metrics run over slices of TOKEN_SLICE tokens (and log-softmax logits a slice at a time); every value
    is bit-identical to the same formula on whole [T, V] tensors."""
    g = torch.Generator().manual_seed(tokens)
    z_p = torch.randn(tokens, 1000, generator=g) * 3  # [T, V] logits
    z_q = z_p + torch.randn(tokens, 1000, generator=g)
    log_p, log_q = torch.log_softmax(z_p, -1), torch.log_softmax(z_q, -1)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)

    def kl_terms(a, b):  # [T]
        return (a.exp() * (a - b)).sum(-1)

    whole = {
        "js_code": float(0.5 * (kl_terms(log_m, log_p).sum() + kl_terms(log_m, log_q).sum()) / log_p.numel()),
        "js": float(0.5 * (kl_terms(log_p, log_m) + kl_terms(log_q, log_m)).mean()),
        "kl": float(kl_terms(log_p, log_q).mean()),
    }
    for name, want in whole.items():
        fn = getattr(metrics, name)
        assert fn(log_p, log_q) == want and fn(log_p, z_q, logits=True) == want, name
    angle = torch.arccos(torch.nn.functional.cosine_similarity(z_p, z_q, dim=-1).clamp(-1.0, 1.0)).mean()
    assert metrics.angular(z_p, z_q) == float(angle)


def test_unknown_metric_is_refused():
    with pytest.raises(ConfigError, match="unknown metric 'cosine'"):
        FinerCutConfig(metric="cosine")
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.Metric("cosine")


# ----- the search ------------------------------------------------------------------------------------------
def _order(model, **kw):
    steps = finercut_search(model, FinerCutConfig(**kw), CALIB, progress=False)["steps"]
    return [str(s.candidate) for s in steps], steps


@pytest.mark.parametrize("arch", ARCHS)
def test_exact_search_equals_naive_search_with_less_work(arch):
    model = tiny_model(arch)
    before = copy.deepcopy(model.state_dict())
    naive, naive_steps = _order(model, sublayer_ratio=0.5, search="naive")
    exact, exact_steps = _order(model, sublayer_ratio=0.5, search="exact")
    assert exact == naive
    assert [s.score for s in exact_steps] == [s.score for s in naive_steps]  # bitwise the same scores
    assert exact_steps[-1].layer_forwards < 0.7 * naive_steps[-1].layer_forwards
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the search changes nothing


@pytest.mark.parametrize("arch", ["llama", "gemma2", "opt_postln"])
def test_first_choice_matches_an_independent_brute_force(arch):
    """Every candidate removed through the public plan API on a copy, scored from full-model logits."""
    model = tiny_model(arch)
    with torch.no_grad():
        dense = [torch.log_softmax(model(row[None]).logits[0].float(), -1) for row in CALIB]
    scores = {}
    for c in candidates_for(model, "sublayer"):
        pruned = hf_pruning.apply_plan_(copy.deepcopy(model), [{"op": f"drop_{'attention' if c.kind == 'attention' else 'mlp'}", "layer": c.layer}])
        with torch.no_grad():
            values = [metrics.js_code(d, torch.log_softmax(pruned(row[None]).logits[0].float(), -1))
                      for d, row in zip(dense, CALIB)]
        scores[str(c)] = sum(values) / len(values)
    order, steps = _order(model, num_removals=1)
    best = min(scores, key=lambda k: (scores[k], Candidate.parse(k)))
    assert order == [best]
    assert steps[0].score == pytest.approx(scores[best], rel=1e-4)


def _brute_force_scores(model, removed: list[str]) -> dict[str, float]:
    """js_code of every candidate not in ``removed``, removed on a copy (with ``removed``) through the plan API."""
    with torch.no_grad():
        dense = [torch.log_softmax(model(row[None]).logits[0].float(), -1) for row in CALIB]
    scores = {}
    for c in candidates_for(model, "sublayer"):
        if str(c) in removed:
            continue
        ops = [{"op": f"drop_{Candidate.parse(k).kind}", "layer": Candidate.parse(k).layer} for k in [*removed, str(c)]]
        pruned = hf_pruning.apply_plan_(copy.deepcopy(model), ops)
        with torch.no_grad():
            values = [metrics.js_code(d, torch.log_softmax(pruned(row[None]).logits[0].float(), -1))
                      for d, row in zip(dense, CALIB)]
        scores[str(c)] = sum(values) / len(values)
    return scores


@pytest.mark.parametrize("arch", ["llama", "opt_postln"])
def test_removal_score_of_any_set_matches_the_search_and_a_brute_force(arch):
    model = tiny_model(arch)
    before = copy.deepcopy(model.state_dict())
    order, steps = _order(model, num_removals=3)
    for k in (1, 3):  # the search's score of each step is the score of its prefix set
        assert removal_score(model, CALIB, order[:k]) == pytest.approx(steps[k - 1].score, rel=1e-6)
    assert removal_score(model, CALIB, []) == 0.0
    other = [c for c in candidates_for(model, "sublayer") if str(c) not in order[:2]][0]
    assert removal_score(model, CALIB, [*order[:2], other]) == pytest.approx(
        _brute_force_scores(model, order[:2])[str(other)], rel=1e-4)  # a set the search never chose
    block = removal_score(model, CALIB, ["1.block"], metric="kl")  # whole blocks and other metrics too
    assert block > 0 and block != removal_score(model, CALIB, ["1.attention"], metric="kl")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="does not have"):
        removal_score(model, CALIB, ["99.mlp"])


@pytest.mark.parametrize("arch", ["gemma2", "opt_postln"])
def test_cost_aware_search_picks_the_least_score_increase_per_parameter(arch):
    model = tiny_model(arch)
    freed, _ = removal_params(model)
    weight = {str(c): freed[(c.layer, c.kind)] for c in candidates_for(model, "sublayer")}
    order, steps = _order(model, num_removals=2, cost_aware=True)
    previous, removed = 0.0, []
    for step in range(2):
        scores = _brute_force_scores(model, removed)
        best = min(scores, key=lambda k: ((scores[k] - previous) / weight[k], Candidate.parse(k)))
        assert order[step] == best
        assert steps[step].score == pytest.approx(scores[best], rel=1e-4)
        previous, removed = scores[best], [*removed, best]
    plain, _ = _order(model, num_removals=2)
    assert order != plain  # on these models the two rules disagree, so the test can tell them apart


@pytest.mark.parametrize("arch", ARCHS)
def test_cost_aware_exact_search_equals_naive(arch):
    model = tiny_model(arch)
    naive, naive_steps = _order(model, sublayer_ratio=0.5, search="naive", cost_aware=True)
    exact, exact_steps = _order(model, sublayer_ratio=0.5, search="exact", cost_aware=True)
    assert exact == naive
    assert [s.score for s in exact_steps] == [s.score for s in naive_steps]
    assert exact_steps[-1].layer_forwards < naive_steps[-1].layer_forwards
    fast, _ = _order(model, sublayer_ratio=0.5, search="fast", rescore=2, cost_aware=True)
    assert len(set(fast)) == len(fast) == len(exact)


def test_search_is_deterministic_and_fast_mode_is_cheaper():
    model = tiny_model("llama")
    first, _ = _order(model, sublayer_ratio=0.5)
    again, exact_steps = _order(model, sublayer_ratio=0.5)
    assert first == again
    fast, fast_steps = _order(model, sublayer_ratio=0.5, search="fast", rescore=2)
    assert len(fast) == len(first) and len(set(fast)) == len(fast)
    assert fast_steps[-1].layer_forwards < exact_steps[-1].layer_forwards


def test_one_shot_removes_in_ascending_single_removal_score():
    model = tiny_model("qwen2")
    one_shot, steps = _order(model, num_removals=4, one_shot=True)
    scores = [s.score for s in steps]
    assert scores == sorted(scores)
    greedy_first, _ = _order(model, num_removals=1)
    assert one_shot[0] == greedy_first[0]


def test_exclude_front_waits_then_readmits():
    model = tiny_model("llama")  # 6 layers, 12 candidates; x=0.5 excludes layers 0..3 for int(12*0.5)+1 = 7 removals
    order, _ = _order(model, num_removals=9, exclude_front=0.5)
    layers = [Candidate.parse(c).layer for c in order]
    assert all(layer >= 4 for layer in layers[:4])  # only layers 4, 5 are available: 4 candidates
    assert len(order) == 9 and len(set(order)) == 9


@pytest.mark.parametrize("granularity", ["attention", "mlp", "block"])
def test_granularities_only_pick_their_kind(granularity):
    model = tiny_model("mistral")
    order, _ = _order(model, num_removals=2, granularity=granularity)
    assert {Candidate.parse(c).kind for c in order} == {granularity}


def test_param_ratio_stops_at_the_first_prefix_reaching_it():
    model = tiny_model("llama")
    freed, total = removal_params(model)
    order, _ = _order(model, param_ratio=0.3)
    cands = [Candidate.parse(c) for c in order]
    removed = sum(freed[(c.layer, c.kind)] for c in cands)
    before = removed - freed[(cands[-1].layer, cands[-1].kind)]
    assert removed >= 0.3 * total > before


# ----- results: plans, save/reload, stock class ----------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_finercut_end_to_end_saves_and_reloads(arch, tmp_path):
    model = tiny_model(arch)
    hf_pruning.prune_(model, FinerCutConfig(num_removals=4), calibration=CALIB)
    report = model.hf_pruning_report
    assert len(report["order"]) == 4 and report["search"]["search_layer_forwards"] > 0
    # the model the search scored is the model the plan built: same score from a plain forward
    fresh = tiny_model(arch)
    with torch.no_grad():
        values = [metrics.js_code(torch.log_softmax(fresh(r[None]).logits[0].float(), -1),
                                  torch.log_softmax(model(r[None]).logits[0].float(), -1)) for r in CALIB]
    assert sum(values) / len(values) == pytest.approx(report["scores"][-1], rel=1e-4, abs=1e-9)
    saved = json.loads(json.dumps(model.config.pruning_config[-1]))
    assert saved["method"] == "finercut" and saved["order"] == report["order"]
    hf_pruning.save_pretrained(model, tmp_path / "m")
    x = tokens()
    with torch.no_grad():
        logits = model(x, use_cache=False).logits
    out = reload_in_fresh_process(tmp_path / "m", x, max_new_tokens=3)
    assert torch.equal(out["logits"], logits)


def test_whole_layer_results_save_as_the_stock_class(tmp_path):
    model = tiny_model("llama")
    hf_pruning.prune_(model, SLEBConfig(num_removals=2), calibration=CALIB)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 4
    plan = hf_pruning.get_plan(model).to_dict()
    assert [op["op"] for op in plan["ops"]] == ["remove_layers"]
    hf_pruning.save_pretrained(model, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "llama"
    assert not list((tmp_path / "m").glob("*.py"))


def test_both_sublayers_of_a_layer_become_a_removed_layer():
    model = tiny_model("llama")
    hf_pruning.prune_(model, FinerCutConfig(order=["5.mlp", "2.attention", "5.attention"]), calibration=None)
    ops = hf_pruning.get_plan(model).to_dict()["ops"]
    assert ops == [{"op": "drop_attention", "layer": 2}, {"op": "remove_layers", "layers": [5]}]
    # OPT post-LN keeps its residual-stream norms when both sublayers go: not the same as removing the layer
    post = tiny_model("opt_postln")
    hf_pruning.prune_(post, FinerCutConfig(order=["5.mlp", "5.attention"]), calibration=None)
    assert [op["op"] for op in hf_pruning.get_plan(post).to_dict()["ops"]] == ["drop_mlp", "drop_attention"]


def test_a_recorded_order_reproduces_the_result_without_calibration():
    searched = tiny_model("gemma2")
    hf_pruning.prune_(searched, FinerCutConfig(sublayer_ratio=0.25), calibration=CALIB)
    record = searched.config.pruning_config[-1]
    replayed = tiny_model("gemma2")
    hf_pruning.prune_(replayed, hf_pruning.PruningConfig.from_dict(record))
    assert hf_pruning.get_plan(replayed).to_dict() == hf_pruning.get_plan(searched).to_dict()
    first_two = tiny_model("gemma2")
    hf_pruning.prune_(first_two, FinerCutConfig(order=record["order"], num_removals=2))
    assert first_two.config.pruning_config[-1]["order"] == record["order"][:2]


# ----- baselines ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_shortgpt_removes_the_lowest_block_influence(arch):
    model = tiny_model(arch)
    with torch.no_grad():  # independent: the model's own hidden states (before the final norm)
        hs = [model(r[None], output_hidden_states=True).hidden_states for r in CALIB]
    n_layers = model.config.num_hidden_layers
    bi = []
    for i in range(n_layers):
        if i == n_layers - 1:
            break  # the last returned hidden state is after the final norm: compare the others
        cos = torch.cat([F.cosine_similarity(h[i][0], h[i + 1][0], dim=-1) for h in hs])
        bi.append(1 - cos.mean().item())
    hf_pruning.prune_(model, ShortGPTConfig(num_removals=2), calibration=CALIB)
    ours = model.hf_pruning_report["block_influence"]
    assert ours[:-1] == pytest.approx(bi, rel=1e-4)
    lowest = sorted(range(n_layers), key=lambda i: ours[i])[:2]
    assert model.hf_pruning_report["order"] == [f"{i}.block" for i in lowest]
    assert model.config.num_hidden_layers == n_layers - 2


def test_sleb_exact_equals_naive():
    model = tiny_model("qwen2")
    exact, naive = copy.deepcopy(model), copy.deepcopy(model)
    hf_pruning.prune_(exact, SLEBConfig(num_removals=3), calibration=CALIB)
    hf_pruning.prune_(naive, SLEBConfig(num_removals=3, search="naive"), calibration=CALIB)
    assert exact.hf_pruning_report["order"] == naive.hf_pruning_report["order"]
    assert (exact.hf_pruning_report["search"]["search_layer_forwards"]
            < naive.hf_pruning_report["search"]["search_layer_forwards"])


# ----- pictures -------------------------------------------------------------------------------------------
def test_removal_map_png_from_a_model_and_from_an_order(tmp_path):
    pytest.importorskip("matplotlib")
    from hf_pruning.publish.plots import removal_map, removal_order

    model = tiny_model("llama")
    hf_pruning.prune_(model, FinerCutConfig(num_removals=3), calibration=CALIB)
    assert removal_order(model) == (model.hf_pruning_report["order"], 6)
    path = removal_map(model, tmp_path / "map.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert removal_map(["3.attention", "1.block"], tmp_path / "b.png", num_layers=4).stat().st_size > 1000
    with pytest.raises(ValueError, match="bad removal"):
        removal_map(["9.attention"], tmp_path / "c.png", num_layers=4)
    assert not (tmp_path / "c.png").exists()


def test_cli_prunes_with_finercut_and_draws_the_map(tmp_path):
    pytest.importorskip("matplotlib")
    from tiny_models import tiny_tokenizer

    from hf_pruning.cli import main

    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    assert main(["-q", "prune", str(src), str(tmp_path / "out"), "--method", "finercut", "--num-removals", "2",
                 "--n-samples", "2", "--seq-len", "32", "--metric", "js"]) == 0
    assert main(["-q", "show", str(tmp_path / "out"), "--removal-map", str(tmp_path / "map.png")]) == 0
    assert (tmp_path / "map.png").read_bytes()[:4] == b"\x89PNG"


# ----- bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config, message", [
    (dict(num_removals=12), "would remove every sublayer"),
    (dict(num_removals=40), "more removals than candidates"),
    (dict(param_ratio=0.995), "would need every sublayer removed"),
    (dict(sublayer_ratio=0.01), "removes no sublayer"),
])
def test_impossible_budgets_fail_clearly_and_change_nothing(config, message):
    model = tiny_model("llama")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        hf_pruning.prune_(model, FinerCutConfig(**config), calibration=CALIB)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not getattr(model.config, "pruning_plan", None)


@pytest.mark.parametrize("make, message", [
    (lambda: FinerCutConfig(param_ratio=0.2, num_removals=3), "give one budget"),
    (lambda: FinerCutConfig(sublayer_ratio=1.5), "sublayer_ratio must be a fraction"),
    (lambda: FinerCutConfig(granularity="heads"), "granularity must be one of"),
    (lambda: FinerCutConfig(search="quick"), "search must be one of"),
    (lambda: FinerCutConfig(exclude_front=1.0), "exclude_front must be a fraction"),
    (lambda: FinerCutConfig(order=["3.heads"]), "bad candidate"),
    (lambda: SLEBConfig(search="fast"), "search must be 'exact' or 'naive'"),
    (lambda: ShortGPTConfig(num_removals=0), "num_removals must be a positive integer"),
])
def test_bad_configs(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_too_short_calibration_is_refused():
    with pytest.raises(ValueError, match="too short to score"):
        hf_pruning.prune_(tiny_model("llama"), FinerCutConfig(num_removals=1), calibration=tokens(2, 8))
    with pytest.raises(ValueError, match="too short to score"):
        hf_pruning.prune_(tiny_model("llama"), ShortGPTConfig(num_removals=1), calibration=tokens(2, 8))
