"""The sparsity and ratio plots: the PNGs, the numbers they draw, the series they group rows into, the errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tiny_models import ARCHS, tiny_model

import hf_pruning

pytest.importorskip("matplotlib")
import matplotlib.image  # noqa: E402
import numpy as np  # noqa: E402

from hf_pruning.publish import plots  # noqa: E402
from hf_pruning.publish.plots import _ratio_series, _sparsity_matrix, ratio_plot, sparsity_plot  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "smollm2.json"


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plot functions save (still drawable after closing), in order."""
    figures = []
    save = plots._save

    def capture(plt, fig, path):
        figures.append(fig)
        return save(plt, fig, path)

    monkeypatch.setattr(plots, "_save", capture)
    return figures


def _check_png(path: Path, shape: tuple[int, int]) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)  # [h, w, 4] floats in [0, 1]
    assert image.shape == (*shape, 4)
    assert image[..., :3].std() > 0.05  # not a blank canvas
    assert not list(path.parent.glob("*.tmp.png"))


def _check_legend_inside(fig) -> None:
    fig.canvas.draw()
    box, legend = fig.bbox, fig.axes[0].get_legend().get_window_extent()
    assert box.x0 <= legend.x0 and legend.x1 <= box.x1 and box.y0 <= legend.y0 and legend.y1 <= box.y1


# ----- sparsity -------------------------------------------------------------------------------------------
def test_sparsity_matrix_of_a_hand_made_report():
    report = {"overall": 0.4, "layers": [{"attn.q": 0.5}, {"attn.q": 0.1, "mlp.up": 0.25}, {}]}
    kinds, matrix = _sparsity_matrix(report)
    assert kinds == ["attn.q", "mlp.up"]  # the fullest layer's order, though layer 0 lacks mlp.up
    np.testing.assert_array_equal(matrix, [[0.5, np.nan], [0.1, 0.25], [np.nan, np.nan]])


def test_sparsity_matrix_counts_the_zeros_set_by_hand():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[:16] = 0  # 16 of 64 rows: 1/4
        model.model.layers[3].mlp.down_proj.weight[:, :24] = 0  # 24 of 96 columns: 1/4
        model.model.layers[3].mlp.down_proj.weight[:32, 24:] = 0  # + 32 * 72 of 64 * 96: 3/8 more
    kinds, matrix = _sparsity_matrix(hf_pruning.sparsity_report(model))
    assert [k.rsplit(".", 1)[-1] for k in kinds] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"]
    expected = np.zeros((6, 7))
    expected[0, 0], expected[3, 6] = 0.25, 0.25 + 0.375
    np.testing.assert_array_equal(matrix, expected)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_sparsity_plot_of_a_magnitude_pruned_model_draws_the_report(arch, tmp_path, drawn):
    model = tiny_model(arch)
    hf_pruning.prune_(model, hf_pruning.MagnitudeConfig(sparsity=0.5))
    report = hf_pruning.sparsity_report(model)
    kinds, matrix = _sparsity_matrix(report)
    assert matrix.shape == (6, len(kinds)) and len(kinds) == (7 if arch == "llama" else 6)
    np.testing.assert_array_equal(matrix, 0.5)  # every matrix has an even size: exactly half zero
    path = sparsity_plot(model, tmp_path / "out" / "sparsity.png")
    assert path == tmp_path / "out" / "sparsity.png"
    _check_png(path, (540, 960))  # figsize (4 + 0.4 * 6, 3.6) at 150 dpi
    (fig,) = drawn
    ax = fig.axes[0]
    heights = np.array([p.get_height() for p in ax.patches]).reshape(len(kinds), 6).T  # [layers, kinds]
    np.testing.assert_array_equal(heights, matrix)
    assert [line.get_ydata()[0] for line in ax.get_lines()] == [report["overall"]]
    assert "q_proj" in [t.get_text() for t in ax.get_legend().get_texts()]
    _check_legend_inside(fig)


@pytest.mark.parametrize("arch", ARCHS)
def test_sparsity_plot_for_every_architecture(arch, tmp_path):
    model = tiny_model(arch)
    hf_pruning.prune_(model, hf_pruning.MagnitudeConfig(pattern="2:4"))
    _check_png(sparsity_plot(model, tmp_path / "s.png", title=arch), (540, 960))


def test_sparsity_plot_of_a_restructured_model_leaves_the_missing_modules_empty(tmp_path, drawn):
    model = tiny_model("opt")
    hf_pruning.apply_plan_(model, {"ops": [{"op": "drop_attention", "layer": 1}, {"op": "drop_mlp", "layer": 2},
                                           {"op": "remove_layers", "layers": [4]}]})
    hf_pruning.prune_(model, hf_pruning.MagnitudeConfig(sparsity=0.25))
    report = hf_pruning.sparsity_report(model)
    kinds, matrix = _sparsity_matrix(report)
    assert matrix.shape == (5, 6)
    attn = [kinds.index(f"self_attn.{p}") for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
    mlp = [kinds.index("fc1"), kinds.index("fc2")]
    assert np.isnan(matrix[1, attn]).all() and np.isnan(matrix[2, mlp]).all()
    assert np.isnan(matrix).sum() == 6
    np.testing.assert_allclose(matrix[~np.isnan(matrix)], 0.25, atol=1e-3)
    _check_png(sparsity_plot(report, tmp_path / "r.png"), (540, 900))  # the report dict works too; 5 layers
    heights = np.array([p.get_height() for p in drawn[0].axes[0].patches]).reshape(6, 5).T  # [layers, kinds]
    np.testing.assert_array_equal(heights, matrix)  # the gaps sit at the dropped sublayers


def test_sparsity_plot_of_an_empty_report_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no decoder-layer linears"):
        sparsity_plot({"overall": 0.0, "layers": []}, tmp_path / "e.png")
    assert not (tmp_path / "e.png").exists()


# ----- ratio ----------------------------------------------------------------------------------------------
def _row(method, settings, x, ppl, acc=None, group="unstructured", error=None):
    return {"group": group, "method": method, "settings": settings, "params_removed": x, "ppl": ppl,
            "acc_retained": acc, "error": error}


HAND = {"model": "tiny", "rows": [
    _row("dense", {}, 0.0, 10.0, 1.0, group="reference"),
    _row("magnitude", {"sparsity": 0.5}, 0.5, 40.0, 0.8),
    _row("magnitude", {"sparsity": 0.3}, 0.3, 20.0),
    _row("magnitude", {"pattern": "2:4"}, 0.5, 80.0, 0.7),
    _row("gradmap", {"param_ratio": 0.1}, 0.1, 15.0, 0.9, group="depth"),
    _row("gradmap", {"param_ratio": 0.1, "compensate": False}, 0.1, 25.0, group="depth"),
    _row("llm_barber", {"sparsity": 0.5, "init": "wanda"}, 0.5, 30.0),
    _row("sleb", {"param_ratio": 0.2}, 0.2, 12.0, 0.95, group="depth", error="RuntimeError: out of memory"),
    _row("taylor", {"param_ratio": 0.2}, 0.2, None, group="depth"),
    _row("shortgpt", {"param_ratio": 0.2}, 0.2, math.nan, group="depth"),
    _row("flap", {"param_ratio": 0.2}, None, 14.0, group="attention"),
]}


def test_rows_group_into_series_by_method_and_non_amount_settings():
    reference, series = _ratio_series(HAND)
    assert reference == 10.0
    assert series == {
        "magnitude": [(0.3, 20.0), (0.5, 40.0)],  # sorted by params removed
        "magnitude 2:4": [(0.5, 80.0)],
        "gradmap": [(0.1, 15.0)],
        "gradmap no compensate": [(0.1, 25.0)],
        "llm_barber init=wanda": [(0.5, 30.0)],
    }  # the error, the missing, the NaN perplexity and the missing params_removed are all skipped
    assert list(series) == ["magnitude", "magnitude 2:4", "gradmap", "gradmap no compensate", "llm_barber init=wanda"]
    reference, series = _ratio_series(HAND, "acc_retained")
    assert reference == 1.0
    assert series == {"magnitude": [(0.5, 0.8)], "magnitude 2:4": [(0.5, 0.7)], "gradmap": [(0.1, 0.9)]}


def test_ratio_plot_of_a_hand_made_results_dict(tmp_path, drawn):
    path = ratio_plot(HAND, tmp_path / "ppl.png", title="hand")
    _check_png(path, (825, 1800))  # figsize (12, 5.5) at 150 dpi
    ax = drawn[0].axes[0]
    assert ax.get_yscale() == "log" and ax.get_title() == "hand"
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"magnitude", "magnitude 2:4", "gradmap", "gradmap no compensate", "llm_barber init=wanda",
                          "dense (10)"}
    assert list(lines["magnitude"].get_xdata()) == [0.3, 0.5] and list(lines["magnitude"].get_ydata()) == [20.0, 40.0]
    assert list(lines["dense (10)"].get_ydata()) == [10.0, 10.0]
    _check_legend_inside(drawn[0])
    ratio_plot(HAND, tmp_path / "acc.png", metric="acc_retained")
    assert drawn[1].axes[0].get_yscale() == "linear"


def test_ratio_plot_of_the_real_benchmark_results(tmp_path, drawn):
    results = json.loads(RESULTS.read_text())
    reference, series = _ratio_series(results)
    dense = [r for r in results["rows"] if r["method"] == "dense"]
    assert reference == dense[0]["ppl"]
    assert sum(len(points) for points in series.values()) == len(results["rows"]) - len(dense)  # no errors there
    assert [x for x, _ in series["sleb"]] == pytest.approx([0.1333, 0.2333], abs=1e-3)
    # one series per distinguishing setting, one point per row of it (counted from the file, not hard-coded)
    def n_rows(method, pick):
        return sum(1 for r in results["rows"] if r["method"] == method and pick(r["settings"]))

    assert len(series["sleb compensate"]) == n_rows("sleb", lambda st: st.get("compensate")) >= 1
    assert len(series["wanda 2:4"]) == 1
    # param_ratio and sublayer_ratio are both amounts: one series; cost_aware is a setting: its own series
    assert len(series["finercut"]) == n_rows("finercut", lambda st: not st.get("cost_aware")) == 3
    assert len(series["finercut cost_aware"]) == n_rows("finercut", lambda st: st.get("cost_aware")) >= 1
    for metric in ("ppl", "acc_retained"):
        _check_png(ratio_plot(RESULTS, tmp_path / f"{metric}.png", metric=metric), (825, 1800))
    ratio_plot(str(RESULTS), tmp_path / "str.png")  # a str path works too
    for fig in drawn:
        _check_legend_inside(fig)
        assert len(fig.axes[0].get_lines()) == len(series) + 1


@pytest.mark.parametrize("results, metric, message", [
    (HAND, "speed", "unknown metric 'speed'"),
    ({"rows": [HAND["rows"][0]]}, "ppl", "no plottable rows for 'ppl': 1 rows, 0 with an error"),
    ({"rows": HAND["rows"][7:]}, "ppl", "no plottable rows for 'ppl': 4 rows, 4 with an error"),
    ({"rows": HAND["rows"][5:7]}, "acc_retained", "no plottable rows for 'acc_retained': 2 rows, 2 with"),
    ({"model": "x"}, "ppl", "need a 'rows' list"),
])
def test_ratio_plot_errors_name_the_problem(results, metric, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        ratio_plot(results, tmp_path / "x.png", metric=metric)
    assert not (tmp_path / "x.png").exists()


def test_series_labels_name_the_distinguishing_settings():
    from hf_pruning.publish.plots import _series_label

    assert _series_label("wanda", {"pattern": "2:4"}) == "wanda 2:4"
    assert _series_label("gradmap", {"param_ratio": 0.2, "compensate": False}) == "gradmap no compensate"
    assert _series_label("shortgpt", {"param_ratio": 0.2, "recover": {"steps": 5}}) == "shortgpt + LoRA recovery"
