"""GradMAP, Taylor and the compensation on the engine: in memory, with CPU offload and with disk offload the same
plan, the same compensation matrix, the same weights and logits; and the layer-by-layer gradient scores equal a
whole-model autograd reference."""

from __future__ import annotations

import pytest
import torch
from offload_models import offload_hooks_in_place, offloaded_model
from tiny_models import ARCHS, tiny_model, tokens

import hf_pruning
from hf_pruning import GradMAPConfig, ShortGPTConfig, TaylorConfig
from hf_pruning.engine import offload_hook, onloaded
from hf_pruning.methods import gradmap
from hf_pruning.methods.depth import method as depth_method
from hf_pruning.remote.hf_pruning_surgery import adapter_for

CALIB = tokens(batch=4, length=24, seed=5)
PROBE = tokens(batch=2, length=16, seed=7)
FIT = depth_method.fit_compensation
PRE_NORM = [a for a in ARCHS if a != "opt_postln"]  # the compensation refuses post-LN OPT
METHODS = {
    "gradmap": lambda: GradMAPConfig(num_removals=2, ridge=0.1),
    "gradmap_auto_ridge": lambda: GradMAPConfig(num_removals=1, score="taylor", mode="iterative"),
    "gradmap_plain": lambda: GradMAPConfig(num_removals=2, mode="iterative", compensate=False),
    "taylor": lambda: TaylorConfig(num_removals=2),
    "shortgpt_compensated": lambda: ShortGPTConfig(num_removals=2, compensate=True, ridge=0.1),
}


def _layer_weights(model) -> list[dict[str, torch.Tensor]]:
    """Every decoder layer's tensors, read with the layer onloaded (an offloaded layer's live tensors are meta)."""
    out = []
    for layer in adapter_for(model).decoder_layers(model):
        with onloaded(layer):
            out.append({k: v.detach().clone() for k, v in layer.state_dict().items()})
    return out


def _prune(arch, mode, make, folder, monkeypatch):
    """Prune the ``mode`` copy of the tiny ``arch`` model; what the parity checks compare."""
    model = offloaded_model(arch, mode, str(folder))
    layers = list(adapter_for(model).decoder_layers(model))
    hooks_before = offload_hooks_in_place(model)
    fitted = []

    def spy(*args, **kwargs):
        ops, report = FIT(*args, **kwargs)
        fitted.extend(op.tensors["weight"].clone() for op in ops)
        return ops, report

    monkeypatch.setattr(depth_method, "fit_compensation", spy)
    hf_pruning.prune_(model, make(), calibration=CALIB)
    plan = model.config.pruning_plan
    removed = [i for op in plan["ops"] if op["op"] == "remove_layers" for i in op["layers"]]
    # the hooks of the kept modules are all still there (a removed layer takes its own hooks with it)
    expected_hooks = hooks_before - sum(offload_hook(m) is not None for i in removed for m in layers[i].modules())
    with torch.no_grad():
        logits = model(PROBE, use_cache=False).logits
    return {"plan": plan, "report": model.hf_pruning_report, "fitted": fitted, "logits": logits,
            "weights": _layer_weights(model), "hooks": (offload_hooks_in_place(model), expected_hooks)}


CASES = [(arch, method) for arch in PRE_NORM for method in METHODS] + [
    ("opt_postln", "gradmap_plain"), ("opt_postln", "taylor")]  # post-LN OPT: the searches, no compensation


@pytest.mark.parametrize("arch, method", CASES)
def test_same_result_in_memory_with_cpu_and_disk_offload(arch, method, tmp_path, monkeypatch):
    runs = {mode: _prune(arch, mode, METHODS[method], tmp_path / mode, monkeypatch)
            for mode in ("memory", "cpu", "disk")}
    ref = runs["memory"]
    for mode in ("cpu", "disk"):
        got = runs[mode]
        assert got["plan"] == ref["plan"], mode
        assert got["report"]["order"] == ref["report"]["order"], mode
        for mine, theirs in zip(got["report"].get("history", []), ref["report"].get("history", [])):
            assert mine["scores"] == pytest.approx(theirs["scores"], rel=1e-6), mode
        assert len(got["fitted"]) == len(ref["fitted"]), mode
        for mine, theirs in zip(got["fitted"], ref["fitted"]):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)
        hooks, expected = got["hooks"]
        assert hooks == expected and hooks > 0, mode
        torch.testing.assert_close(got["logits"], ref["logits"], rtol=0, atol=1e-6)
        for mine, theirs in zip(got["weights"], ref["weights"]):
            assert mine.keys() == theirs.keys(), mode
            for name in mine:
                torch.testing.assert_close(mine[name], theirs[name], rtol=0, atol=1e-6)


# ----- the layer-by-layer backward against whole-model autograd -------------------------------------------------
def _reference_scores(arch: str, skip: set[int], score: str) -> dict[int, float]:
    """Scores from one whole-model backward per row on the model with ``skip`` really removed (apply_plan_), the
    gradients at each block's output kept by autograd (``retain_grad``), parameter gradients in ``.grad``."""
    model = tiny_model(arch)
    n_layers = len(adapter_for(model).decoder_layers(model))
    kept = [i for i in range(n_layers) if i not in skip]
    if skip:
        hf_pruning.apply_plan_(model, [{"op": "remove_layers", "layers": sorted(skip)}])
    layers = adapter_for(model).decoder_layers(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers:
        for p in layer.parameters():
            p.requires_grad_(True)
    seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def keep(k):
        def hook(module, args, kwargs, out):
            h_out = out[0] if isinstance(out, tuple) else out
            h_out.retain_grad()
            seen.append((k, args[0] if args else kwargs["hidden_states"], h_out))
        return hook

    handles = [layer.register_forward_hook(keep(k), with_kwargs=True) for k, layer in enumerate(layers)]
    acc = [0.0] * len(layers)
    for row in CALIB:
        seen.clear()
        (model(row[None], labels=row[None], use_cache=False).loss / len(CALIB)).backward()
        for k, h_in, h_out in seen:
            g = h_out.grad.double()
            term = g * (h_out - h_in).detach().double()
            acc[k] += float({"output": g.pow(2), "contribution": term.abs(), "fisher": term.pow(2)}.get(score, g).sum())
    for h in handles:
        h.remove()
    out = {}
    for k, layer in enumerate(layers):
        params = list(layer.parameters())
        if score == "grad":
            out[kept[k]] = float(sum(p.grad.abs().double().sum() for p in params)) / sum(p.numel() for p in params)
        elif score == "taylor":
            out[kept[k]] = float(sum((p.detach() * p.grad).abs().double().sum() for p in params))
        else:
            out[kept[k]] = acc[k] ** 0.5 if score == "output" else acc[k]
    return out


@pytest.mark.parametrize("score", gradmap.scoring.SCORES)
@pytest.mark.parametrize("arch", ["llama", "gemma2", "opt"])
def test_blockwise_scores_equal_a_whole_model_backward(arch, score):
    """Every score of the layer-by-layer backward (skipped block 2 passed through) equals autograd on the whole
    model with block 2 removed; the ranking is the same."""
    model = tiny_model(arch)
    got = gradmap.gradient_scores(model, CALIB, {2}, score, tuple_out=False)
    expected = _reference_scores(arch, {2}, score)
    assert set(got) == set(expected) == {0, 1, 3, 4, 5}
    assert got == pytest.approx(expected, rel=1e-4)
    assert sorted(got, key=got.get) == sorted(expected, key=expected.get)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # nothing left behind, flags restored


def test_bf16_scores_accumulate_in_float32():
    """A bf16 model's scores follow the fp32 model's (weight gradients summed over batches in fp32, scalars in
    fp64) to bf16 precision, with the same ranking; none are lost to bf16 rounding of the sums."""
    fp32 = gradmap.gradient_scores(tiny_model("llama"), CALIB, set(), "taylor", tuple_out=False)
    bf16 = gradmap.gradient_scores(tiny_model("llama").to(torch.bfloat16), CALIB, set(), "taylor", tuple_out=False)
    assert bf16 == pytest.approx(fp32, rel=5e-2)
    assert sorted(bf16, key=bf16.get) == sorted(fp32, key=fp32.get)


def test_gradient_stores_can_live_on_disk(tmp_path):
    """``store_folder``: layer inputs and gradients on disk give the same scores, and the folder is left empty."""
    model = tiny_model("qwen2")
    in_memory = gradmap.gradient_scores(model, CALIB, {4}, "fisher", tuple_out=False)
    on_disk = gradmap.gradient_scores(model, CALIB, {4}, "fisher", tuple_out=False, store_folder=str(tmp_path))
    assert on_disk == pytest.approx(in_memory, rel=1e-12)
    assert not list(tmp_path.iterdir())


def test_compensation_statistics_are_streamed_one_row_at_a_time(monkeypatch):
    """The fit never sees more than one calibration row's tokens at once (no [tokens x d] matrix over all rows),
    and more than 8 rows are validated on 8 folds."""
    from hf_pruning.methods.depth.compensation_fit import FitStats

    seen = []
    real = FitStats.add

    def spy(self, fold, a, b, drift=None):
        seen.append((fold, a.shape[0]))
        return real(self, fold, a, b, drift)

    monkeypatch.setattr(FitStats, "add", spy)
    model = tiny_model("llama")
    hf_pruning.prune_(model, ShortGPTConfig(order=["2.block"], compensate=True), calibration=tokens(10, 24, seed=3))
    comp = model.hf_pruning_report["compensation"]
    assert comp["folds"] == 8 and {t for _, t in seen} == {24}
    assert sorted({f for f, _ in seen}) == list(range(8))


def test_compensation_runs_each_layer_once_per_stream():
    """One pass: the dense stream runs every layer, the pruned stream the kept layers from the first removal on."""
    model = tiny_model("llama")  # 6 layers
    hf_pruning.prune_(model, ShortGPTConfig(order=["2.block", "3.block"], compensate=True), calibration=tokens(10, 24, seed=3))
    assert model.hf_pruning_report["compensation"]["layer_forwards"] == 6 + 2  # pruned: layers 4 and 5


def _screen_gain(stats) -> float:
    from hf_pruning.methods.depth import compensation

    _, screen = compensation.choose_ridge_from_stats(stats.grouped(compensation.SCREEN_FOLDS), compensation.RIDGE_GRID)
    return min(screen["ridge_validation_mse"].values()) / max(screen["identity_validation_mse"], 1e-300)


def test_streamed_shortlist_equals_ranking_every_shift_first():
    """Layers arrive in layer order; the streamed shortlist keeps the same members and picks the same layer as
    ranking all shifts first and then validating the shortlist, keeping the statistics of the members only."""
    from hf_pruning.methods.depth import compensation
    from hf_pruning.methods.depth.compensation_fit import FitStats

    g = torch.Generator().manual_seed(0)
    for trial in range(12):
        layers, d, size = list(range(14)), 5, 4
        stats = {}
        for j in layers:
            s = FitStats.zeros(4, d)
            a = torch.randn(40, d, generator=g, dtype=torch.float64)
            noise = (0.2 + torch.rand(1, generator=g).item()) * torch.randn(40, d, generator=g, dtype=torch.float64)
            for f in range(4):
                s.add(f, a[f::4], a[f::4] * 1.3 + noise[f::4])
            stats[j] = s
        shifts = torch.rand(len(layers), generator=g, dtype=torch.float64) * (trial % 3 != 0)  # some: none drift
        means = {k: torch.zeros(1, dtype=torch.float64) for k in range(len(layers) + 2)}
        pruned = {k + 1: torch.tensor([float(shifts[k])]) for k in layers}
        moments = (means, pruned, dict.fromkeys(range(len(layers) + 2), 1.0))
        feeds = {j: j + 1 for j in layers}
        shortlist = compensation._Shortlist(size, feeds, relative=False, validate=True)
        for j in layers:
            shortlist.arrive(j, moments, lambda s=stats[j]: s)
        usable = [j for j in layers if shifts[j] > 0]
        top = sorted(usable, key=lambda j: (-float(shifts[j]), j))[:size]

        chosen = shortlist.chosen()
        if not top:
            assert chosen is None
            continue
        expected = min(top, key=lambda j: (_screen_gain(stats[j]), j))
        assert chosen[0] == expected and sorted(chosen[2]) == sorted(top)
        assert torch.equal(chosen[1].gram, stats[expected].gram) and torch.equal(chosen[1].cross, stats[expected].cross)
        assert len(shortlist.stats) == len(top) and shortlist.fitted >= len(top)
        shortlist.close()


@pytest.mark.parametrize("score, forwards, backwards", [("fisher", 8, 4), ("taylor", 9, 5)])
def test_gradient_pass_reruns_only_the_layers_it_must(score, forwards, backwards):
    """5 kept layers: 4 no-grad forwards below the top; the top layer runs once, with its graph, before the head;
    the middle ones are recomputed; the bottom one is rerun only for its weight gradients (``taylor``)."""
    counts = {}
    gradmap.gradient_scores(tiny_model("llama"), CALIB, {5}, score, tuple_out=False, counts=counts)
    assert counts == {"layer_forwards": forwards, "layer_backwards": backwards}
