"""GradMAP (gradient block ranking + projection compensation), the Taylor baseline, compensation after others."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from tiny_models import ARCHS, tiny_model, tokens

import hf_pruning
from hf_pruning import FinerCutConfig, GradMAPConfig, ShortGPTConfig, SLEBConfig, TaylorConfig
from hf_pruning.config import ConfigError
from hf_pruning.methods import gradmap
from hf_pruning.methods.depth import compensation, layers_return_tuple
from hf_pruning.publish.verify import reload_in_fresh_process
from hf_pruning.remote.hf_pruning_surgery import adapter_for

CALIB = tokens(batch=3, length=24, seed=5)
PRE_NORM = [a for a in ARCHS if a != "opt_postln"]


# ----- the solve -----------------------------------------------------------------------------------------
def test_projection_solve_recovers_a_known_matrix_and_shrinks_to_identity():
    g = torch.Generator().manual_seed(0)
    d = 8
    truth = torch.eye(d, dtype=torch.float64) + 0.3 * torch.randn(d, d, generator=g, dtype=torch.float64)
    a = torch.randn(500, d, generator=g, dtype=torch.float64)
    b = a @ truth.T
    p, info = compensation.solve_projection(a, b, ridge=1e-9)
    assert torch.allclose(p, truth, atol=1e-6)
    p_strong, _ = compensation.solve_projection(a, b, ridge=1e6)
    assert torch.allclose(p_strong, torch.eye(d, dtype=torch.float64), atol=1e-3)
    # the iterative solver minimises the same objective
    p_adam = compensation.adam_projection(a, b, ridge=1e-9, steps=1500, lr=1e-2)
    assert torch.allclose(p_adam, truth, atol=2e-2)
    assert info["gram_rank"] == d


def test_ridge_is_chosen_by_held_out_error():
    g = torch.Generator().manual_seed(2)
    d = 16
    truth = torch.eye(d, dtype=torch.float64) + 0.2 * torch.randn(d, d, generator=g, dtype=torch.float64)
    sample_of = torch.arange(4).repeat_interleave(200)
    a = torch.randn(800, d, generator=g, dtype=torch.float64)
    clean, _ = compensation.choose_ridge(a, a @ truth.T, sample_of)
    assert clean == min(compensation.RIDGE_GRID)  # plenty of exact data: barely shrink
    few = torch.randn(24, d, generator=g, dtype=torch.float64)  # fewer tokens than dimensions, pure noise targets
    noisy, info = compensation.choose_ridge(few, few + 3 * torch.randn(24, d, generator=g, dtype=torch.float64),
                                            torch.arange(4).repeat_interleave(6))
    assert noisy == math.inf  # nothing to learn: the identity generalises best, no compensation
    assert set(info["ridge_validation_mse"]) == set(compensation.RIDGE_GRID)
    assert info["identity_validation_mse"] <= min(info["ridge_validation_mse"].values())


def test_ridge_search_from_one_eigendecomposition_equals_a_solve_per_ridge():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(90, 12, generator=g, dtype=torch.float64)
    b = a @ (torch.eye(12, dtype=torch.float64) + 0.1 * torch.randn(12, 12, generator=g, dtype=torch.float64)).T
    b = b + 0.5 * torch.randn(90, 12, generator=g, dtype=torch.float64)
    folds = torch.arange(3).repeat_interleave(30)
    _, info = compensation.choose_ridge(a, b, folds)
    for ridge, mse in info["ridge_validation_mse"].items():
        total = 0.0
        for f in range(3):
            held = folds == f
            p, _ = compensation.solve_projection(a[~held], b[~held], ridge)
            total += float(((a[held] @ p.T - b[held]) ** 2).sum())
        assert mse == pytest.approx(total / 90, rel=1e-9)


def test_grouped_folds_and_float32_screening_estimate_the_same_errors():
    """``max_folds`` groups rows (row s in fold s % k): equal to leaving those groups out by hand; float32
    screening agrees with float64 to single precision."""
    g = torch.Generator().manual_seed(6)
    a = torch.randn(120, 10, generator=g, dtype=torch.float64)
    b = a + 0.3 * torch.randn(120, 10, generator=g, dtype=torch.float64)
    rows = torch.arange(6).repeat_interleave(20)
    _, grouped = compensation.choose_ridge(a, b, rows, max_folds=2)
    _, by_hand = compensation.choose_ridge(a, b, rows % 2)
    assert grouped == by_hand
    _, single = compensation.choose_ridge(a, b, rows, max_folds=2, dtype=torch.float32)
    for ridge, mse in grouped["ridge_validation_mse"].items():
        assert single["ridge_validation_mse"][ridge] == pytest.approx(mse, rel=1e-4)


def test_compensation_is_skipped_when_no_fit_beats_the_identity_on_held_out_rows(monkeypatch):
    """The automatic ridge includes "no compensation": then the plan has the removals only, and says why."""
    monkeypatch.setattr(compensation, "RIDGE_GRID", (1e-6,))  # a grid of one nearly unregularised fit
    few = tokens(batch=2, length=6, seed=1)  # 12 tokens for a 64 x 64 fit: it cannot generalise
    model = tiny_model("llama")
    hf_pruning.prune_(model, ShortGPTConfig(order=["2.block"], compensate=True), calibration=few)
    comp = model.hf_pruning_report["compensation"]
    assert "beats the identity" in comp["skipped"]
    assert comp["identity_validation_mse"] <= comp["ridge_validation_mse"][1e-6]
    assert [op["op"] for op in hf_pruning.get_plan(model).to_dict()["ops"]] == ["remove_layers"]


def test_singular_system_is_regularised_and_reported():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(50, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 6, generator=g, dtype=torch.float64)
    p, info = compensation.solve_projection(a, a * 2.0, ridge=1e-2)  # rank 2 in 6 dimensions
    assert torch.isfinite(p).all() and info["gram_rank"] == 2 and info["condition"] > 10
    p0, _ = compensation.solve_projection(torch.zeros(10, 4), torch.zeros(10, 4), ridge=1e-2)  # nothing to fit
    assert torch.allclose(p0, torch.eye(4, dtype=torch.float64))


# ----- fusion --------------------------------------------------------------------------------------------
def _layer_outputs(model):
    """Every decoder layer's output over the calibration rows (hooks: before any final norm), ``[tokens, d]``."""
    layers = adapter_for(model).decoder_layers(model)
    outs = [[] for _ in layers]
    handles = [layer.register_forward_hook(
        lambda m, a, out, i=i: outs[i].append((out[0] if isinstance(out, tuple) else out)[0])) for i, layer in enumerate(layers)]
    with torch.no_grad():
        for r in CALIB:
            model(r[None])
    for h in handles:
        h.remove()
    return [torch.cat(o) for o in outs]


@pytest.mark.parametrize("arch", PRE_NORM)
def test_fused_compensation_reproduces_the_fit(arch):
    """After pruning, the fused model's hidden state at the compensated layer matches the fit's prediction."""
    dense = tiny_model(arch)
    model = tiny_model(arch)
    hf_pruning.prune_(model, ShortGPTConfig(order=["2.block", "4.block"], compensate=True, ridge=0.1),
                      calibration=CALIB)
    comp = model.hf_pruning_report["compensation"]
    j_new, j = comp["pruned_layer_index"], comp["layer"]
    assert comp["mse_after"] < comp["mse_before"]
    feeds = {0: 1, 1: 3, 3: 5, 5: 6}  # kept layers -> the next kept layer (6: the final norm)
    got = _layer_outputs(model)[j_new]
    target = _layer_outputs(dense)[feeds[j] - 1]  # the dense stream where the next consumer reads it
    mse = float(((got.double() - target.double()) ** 2).mean())
    assert mse == pytest.approx(comp["mse_after"], rel=1e-3, abs=1e-9)
    fused = [op for op in hf_pruning.get_plan(model).to_dict()["ops"] if op["op"] == "add_linear"]
    assert len(fused) == 1 and fused[0]["fused"] == (arch != "gemma2")  # Gemma2: a module after its post-norm


@pytest.mark.parametrize("arch", ["llama", "gemma2", "opt"])
def test_compensated_results_save_and_reload(arch, tmp_path):
    model = tiny_model(arch)
    hf_pruning.prune_(model, GradMAPConfig(num_removals=2, ridge=0.1), calibration=CALIB)
    stock = arch != "gemma2"
    assert (type(model).__name__.startswith("Pruned")) != stock
    hf_pruning.save_pretrained(model, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (cfg["model_type"] == arch) == stock
    x = tokens()
    with torch.no_grad():
        logits = model(x, use_cache=False).logits
    assert torch.equal(reload_in_fresh_process(tmp_path / "m", x, max_new_tokens=2)["logits"], logits)


def test_compensation_composes_with_every_depth_method():
    # a fixed ridge: with the automatic one, these 72 calibration tokens may rightly prefer no compensation
    for config in (ShortGPTConfig(num_removals=2, compensate=True, ridge=0.1),
                   SLEBConfig(num_removals=2, compensate=True, ridge=0.1),
                   FinerCutConfig(num_removals=3, compensate=True, ridge=0.1),
                   TaylorConfig(num_removals=2, compensate=True, ridge=0.1), GradMAPConfig(num_removals=2, ridge=0.1)):
        model = tiny_model("qwen2")
        hf_pruning.prune_(model, config, calibration=CALIB)
        ops = [op["op"] for op in hf_pruning.get_plan(model).to_dict()["ops"]]
        assert ops[-1] == "add_linear", (config, ops)
        assert model.hf_pruning_report["compensation"]["mse_after"] < model.hf_pruning_report["compensation"]["mse_before"]
    plain = tiny_model("qwen2")
    hf_pruning.prune_(plain, GradMAPConfig(num_removals=2, compensate=False), calibration=CALIB)
    assert "add_linear" not in [op["op"] for op in hf_pruning.get_plan(plain).to_dict()["ops"]]


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_compensation_after_an_earlier_step_dropped_every_mlp(arch):
    """A model pruned before (every MLP dropped) has no MLP output to carry the projection: the attention does."""
    model = tiny_model(arch)
    hf_pruning.prune_(model, hf_pruning.PlanConfig(plan={"ops": [{"op": "drop_mlp", "layer": i} for i in range(6)]}))
    hf_pruning.prune_(model, GradMAPConfig(num_removals=1, ridge=0.1), calibration=CALIB)
    assert hf_pruning.get_plan(model).to_dict()["ops"][-1]["sublayer"] == "attention"
    compensation = model.hf_pruning_report["compensation"]
    assert compensation["sublayer"] == "attention" and compensation["mse_after"] < compensation["mse_before"]


def test_layer_is_the_shortlisted_fit_that_generalises_best(monkeypatch):
    """Automatic ridge: the SHORTLIST kept layers with the largest shift are fitted, and the one whose fit has the
    lowest held-out error relative to leaving the layer alone carries the projection; a fixed ridge (or a
    shortlist of one) keeps the paper's rule, the largest shift."""
    calib = tokens(batch=6, length=48, seed=3)
    runs = {}
    for shortlist in (1, 3):
        monkeypatch.setattr(compensation, "SHORTLIST", shortlist)
        model = tiny_model("llama")
        hf_pruning.prune_(model, ShortGPTConfig(order=["1.block"], compensate=True), calibration=calib)
        runs[shortlist] = model.hf_pruning_report["compensation"]
    shifts = {int(k): v for k, v in runs[3]["shifts"].items()}
    by_shift = sorted((i for i in shifts if shifts[i] > 0), key=lambda i: (-shifts[i], i))
    ratios = runs[3]["validated_error_ratio"]
    assert sorted(ratios) == sorted(by_shift[:3])
    assert runs[3]["layer"] == min(ratios, key=ratios.get)
    assert list(runs[1]["validated_error_ratio"]) == [by_shift[0]] and runs[1]["layer"] == by_shift[0]
    # the chosen layer's ridge is then picked leaving one row out, and that fit beats the identity too
    chosen = runs[3]
    assert ratios[chosen["layer"]] < 1 and set(chosen["ridge_validation_mse"]) == set(compensation.RIDGE_GRID)
    assert min(chosen["ridge_validation_mse"].values()) < chosen["identity_validation_mse"]
    fixed = tiny_model("llama")
    hf_pruning.prune_(fixed, ShortGPTConfig(order=["1.block"], compensate=True, ridge=0.1), calibration=calib)
    assert fixed.hf_pruning_report["compensation"]["layer"] == by_shift[0]


def test_compensation_fits_on_its_own_calibration_when_given():
    """``compensation_calibration``: the search scores ``calibration``, the projection is fitted on the other set,
    exactly as replaying the found order with the fit's data would do."""
    big = tokens(batch=6, length=40, seed=9)
    searched = tiny_model("mistral")
    hf_pruning.prune_(searched, SLEBConfig(num_removals=2, compensate=True, ridge=0.1), calibration=CALIB,
                      compensation_calibration=big)
    comp = searched.hf_pruning_report["compensation"]
    assert comp["calibration_tokens"] == big.numel() and "add_linear" in str(hf_pruning.get_plan(searched).to_dict())
    order = searched.hf_pruning_report["order"]
    same_search = tiny_model("mistral")
    hf_pruning.prune_(same_search, SLEBConfig(num_removals=2, compensate=True, ridge=0.1), calibration=CALIB)
    assert same_search.hf_pruning_report["order"] == order  # the search saw CALIB only
    replayed = tiny_model("mistral")  # an order needs no search data: the fit's data is enough
    hf_pruning.prune_(replayed, SLEBConfig(order=order, compensate=True, ridge=0.1), compensation_calibration=big)
    for name, value in searched.state_dict().items():
        assert torch.equal(value, replayed.state_dict()[name]), name
    fused = dict(searched.named_parameters())
    other = dict(same_search.named_parameters())
    assert any(not torch.equal(fused[k], other[k]) for k in fused)  # fitting on CALIB gives another projection


def test_compensation_calibration_is_refused_where_nothing_is_fitted():
    model = tiny_model("llama")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="compensate=True"):
        hf_pruning.prune_(model, GradMAPConfig(num_removals=1, compensate=False), calibration=CALIB,
                          compensation_calibration=CALIB)
    with pytest.raises(ValueError, match="compensate=True"):
        hf_pruning.prune_(model, hf_pruning.WandaConfig(sparsity=0.5), calibration=CALIB, compensation_calibration=CALIB)
    with pytest.raises(ValueError, match="token ids"):
        hf_pruning.prune_(model, GradMAPConfig(num_removals=1), calibration=CALIB, compensation_calibration=CALIB.float())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cli_builds_the_compensation_windows_from_the_method_input_flags(tmp_path, monkeypatch):
    """``--compensation-samples/--compensation-seq-len`` come from the config's declared input and reach
    ``prune_`` as ``compensation_calibration``; a method that declares no such input has no such flag."""
    from tiny_models import tiny_tokenizer

    from hf_pruning.cli import main

    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    seen = {}
    real = hf_pruning.prune_

    def spy(model, config, calibration=None, **inputs):
        seen.update({"calibration": calibration.shape, **{k: v.shape for k, v in inputs.items()}})
        return real(model, config, calibration=calibration, **inputs)

    monkeypatch.setattr(hf_pruning, "prune_", spy)
    assert main(["-q", "prune", str(src), str(tmp_path / "out"), "--method", "sleb", "--num-removals", "1",
                 "--compensate", "--ridge", "0.1", "--n-samples", "2", "--seq-len", "24",
                 "--compensation-samples", "3", "--compensation-seq-len", "40"]) == 0
    assert seen == {"calibration": (2, 24), "compensation_calibration": (3, 40)}
    assert main(["-q", "prune", str(src), str(tmp_path / "out2"), "--method", "wanda",
                 "--compensation-samples", "3"]) == 2


@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_runner_reuses_the_dense_prefix_exactly(arch):
    """The compensation's pruned pass starts at the first removal from the dense pass's cache: same stream as a
    pruned pass from layer 0, with fewer layer calls."""
    from hf_pruning.methods.depth import Candidate, DepthRunner

    model = tiny_model(arch)
    removed = [Candidate(3, "block"), Candidate(4, "mlp")]
    dense = DepthRunner(model, CALIB)
    shared = DepthRunner(model, CALIB, removed=removed, prefix_from=dense)
    alone = DepthRunner(model, CALIB, removed=removed)
    for mine, ref in zip(shared.cache, alone.cache):
        for a, b in zip(mine, ref):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert shared.layer_forwards < alone.layer_forwards
    with pytest.raises(ValueError, match="nothing removed"):
        DepthRunner(model, CALIB, removed=removed, prefix_from=alone)


@pytest.mark.parametrize("arch", ARCHS)
def test_runner_batches_rows_like_running_them_one_by_one(arch, monkeypatch):
    """The cached stream is computed in batches of rows (a last, partial batch included); it equals running
    every row alone, and the work counter counts rows, not calls."""
    from hf_pruning.methods.depth import runner as depth

    model = tiny_model(arch)
    removed = [depth.Candidate(2, "attention")]
    monkeypatch.setattr(depth, "LAYER_BATCH", 1)
    alone = depth.DepthRunner(model, CALIB, removed=removed)
    monkeypatch.setattr(depth, "LAYER_BATCH", 2)  # 3 rows: a batch of 2, then 1
    batched = depth.DepthRunner(model, CALIB, removed=removed)
    for mine, ref in zip(batched.cache, alone.cache):
        assert [a.shape for a in mine] == [b.shape for b in ref]
        for a, b in zip(mine, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert batched.layer_forwards == pytest.approx(alone.layer_forwards)


# ----- stage 1 ---------------------------------------------------------------------------------------------
def _dead_blocks(model, blocks):
    """Zero the output projections of ``blocks``: each becomes the identity and its Taylor score is exactly 0."""
    adapter = adapter_for(model)
    layers = adapter.decoder_layers(model)
    with torch.no_grad():
        for i in blocks:
            for sub in ("attention", "mlp"):
                lin = adapter.output_linear(layers[i], sub)
                lin.weight.zero_()
                if lin.bias is not None:
                    lin.bias.zero_()
    return model


@pytest.mark.parametrize("score", ["taylor", "contribution", "fisher"])
@pytest.mark.parametrize("mode", ["iterative", "one_shot"])
def test_forced_answer_identity_blocks_go_first(mode, score):
    model = _dead_blocks(tiny_model("llama"), [1, 3])
    hf_pruning.prune_(model, GradMAPConfig(num_removals=2, score=score, mode=mode, compensate=False),
                      calibration=CALIB)
    report = model.hf_pruning_report
    assert report["order"] == ["1.block", "3.block"]
    assert report["search"]["backward_passes"] == (2 if mode == "iterative" else 1)


def test_iterative_mode_rescores_the_pruned_model(monkeypatch):
    seen = []
    real = gradmap.pruner.gradient_scores

    def spy(model, calibration, skip, score, tuple_out, **kwargs):
        seen.append(sorted(skip))
        return real(model, calibration, skip, score, tuple_out, **kwargs)

    monkeypatch.setattr(gradmap.pruner, "gradient_scores", spy)
    model = tiny_model("mistral")
    hf_pruning.prune_(model, GradMAPConfig(num_removals=3, mode="iterative", compensate=False), calibration=CALIB)
    removed = [int(c.split(".")[0]) for c in model.hf_pruning_report["order"]]
    assert seen == [[], sorted(removed[:1]), sorted(removed[:2])]


def test_scores_are_those_of_the_pruned_model_and_only_blocks_get_gradients():
    model = tiny_model("llama")
    tuple_out = layers_return_tuple(model, CALIB)
    scores = gradmap.gradient_scores(model, CALIB, {5}, "grad", tuple_out)
    assert set(scores) == {0, 1, 2, 3, 4}
    assert all(p.grad is None for p in model.parameters())  # nothing is left behind
    # independent: the model with block 5 really removed, one backward over all rows at once (mean of row losses)
    ref = hf_pruning.apply_plan_(tiny_model("llama"), [{"op": "remove_layers", "layers": [5]}])
    loss = sum(ref(r[None], labels=r[None]).loss for r in CALIB) / len(CALIB)
    loss.backward()
    layers = ref.model.layers
    expected = {i: float(sum(p.grad.abs().sum() for p in layers[i].parameters()))
                / sum(p.numel() for p in layers[i].parameters()) for i in range(5)}
    assert scores == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("score", ["contribution", "fisher"])
@pytest.mark.parametrize("arch", PRE_NORM)
def test_contribution_score_is_the_taylor_sum_of_each_block_update(arch, score):
    """Independent reference: autograd on the hidden states transformers returns (layer inputs, in the graph);
    ``contribution`` sums |g ⊙ delta|, ``fisher`` sums (g ⊙ delta)^2."""
    model = tiny_model(arch)
    scores = gradmap.gradient_scores(model, CALIB, set(), score, layers_return_tuple(model, CALIB))
    assert all(p.grad is None for p in model.parameters())  # activation gradients only
    n_layers = len(adapter_for(model).decoder_layers(model))
    expected = [0.0] * (n_layers - 1)  # the last entry of hidden_states is after the final norm: not compared
    for row in CALIB:
        out = model(row[None], labels=row[None], output_hidden_states=True, use_cache=False)
        hidden = out.hidden_states  # h_0 (embeddings) .. h_{L-1} are layer inputs, [1, T, d] each
        grads = torch.autograd.grad(out.loss / len(CALIB), hidden[1:n_layers])
        for i in range(n_layers - 1):  # block i maps h_i to h_{i+1}
            term = (grads[i] * (hidden[i + 1] - hidden[i])).detach().double()
            expected[i] += float(term.abs().sum() if score == "contribution" else term.pow(2).sum())
    assert [scores[i] for i in range(n_layers - 1)] == pytest.approx(expected, rel=1e-4)
    assert all(v > 0 for v in scores.values())


def test_gradient_pass_memory_stays_flat_with_more_rows(monkeypatch):
    """Rows go through the layers in batches of LAYER_BATCH: the whole model runs only to capture the layer-0
    inputs (after one row that records the layers' kwargs) and for the head, one row at a time (one row's
    logits); every layer call sees one batch."""
    from hf_pruning.engine import LAYER_BATCH

    model = tiny_model("llama")
    widths, layer_widths = [], []
    original = type(model).forward

    def spy(self, input_ids=None, **kw):
        widths.append(input_ids.shape[0])
        return original(self, input_ids=input_ids, **kw)

    monkeypatch.setattr(type(model), "forward", spy)
    handles = [layer.register_forward_pre_hook(lambda m, args: layer_widths.append(args[0].shape[0]))
               for layer in adapter_for(model).decoder_layers(model)]
    gradmap.gradient_scores(model, tokens(6, 16), set(), "grad", False)
    for h in handles:
        h.remove()
    assert LAYER_BATCH == 4 and widths == [1, 4, 2] + [1] * 6  # kwargs row, capture x 2 batches, head x 6 rows
    # per batch: a forward and a recomputation of every layer but the top one, which runs once, with its graph
    assert max(layer_widths) == LAYER_BATCH and len(layer_widths) == (5 * 2 + 1) * 2


# ----- bad input -------------------------------------------------------------------------------------------
def test_bad_inputs_fail_clearly_and_leave_the_model_unchanged():
    model = tiny_model("llama")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="would remove every block"):
        hf_pruning.prune_(model, GradMAPConfig(num_removals=6), calibration=CALIB)
    with pytest.raises(ValueError, match="token ids"):
        hf_pruning.prune_(model, GradMAPConfig(num_removals=1), calibration=CALIB.float())
    with pytest.raises(ValueError, match="needs calibration"):
        hf_pruning.prune_(model, GradMAPConfig(order=["1.block"]))  # compensation fits on data
    post = tiny_model("opt_postln")
    with pytest.raises(ValueError, match="do_layer_norm_before=False"):
        hf_pruning.prune_(post, ShortGPTConfig(num_removals=1, compensate=True), calibration=CALIB)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not getattr(model.config, "pruning_plan", None)


@pytest.mark.parametrize("make, message", [
    (lambda: GradMAPConfig(ridge=0.0), "ridge must be a number > 0"),
    (lambda: GradMAPConfig(ridge=-1), "ridge must be a number > 0"),
    (lambda: GradMAPConfig(score="hessian"), "score must be one of"),
    (lambda: GradMAPConfig(mode="twice"), "mode must be one of"),
    (lambda: TaylorConfig(solver="lbfgs"), "solver must be"),
])
def test_bad_configs(make, message):
    with pytest.raises(ConfigError, match=message):
        make()
