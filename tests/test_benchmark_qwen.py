"""The 1.5B benchmark's machinery on a tiny model: the code texts' split, two evaluation texts per row, the peer's
rows through the runner (the peer itself replaced by a stand-in that writes a pruned checkpoint), the grid."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from test_benchmark import write_books
from tiny_models import tiny_model, tiny_tokenizer

import benchmarks.grid as grid
import benchmarks.runner as runner
from benchmarks import peer, texts
from benchmarks.qwen_grid import QWEN_GRID, QwenBenchSettings
from benchmarks.report import markdown_table


@pytest.fixture()
def data_dir(tmp_path):
    return write_books(tmp_path)


def tiny_settings(data_dir) -> QwenBenchSettings:
    return QwenBenchSettings(calib_samples=2, calib_seq_len=16, depth_calib_samples=2, depth_calib_seq_len=16,
                             eval_windows=2, eval_seq_len=16, zero_shot_limit=4, prefill_tokens=16, decode_tokens=2,
                             speed_repeats=1, data_dir=str(data_dir))


def test_code_split_is_disjoint_sorted_and_covers_the_standard_library():
    cal, ev = texts.stdlib_modules("calibration"), texts.stdlib_modules("evaluation")
    assert cal == sorted(cal) and ev == sorted(ev) and not set(cal) & set(ev)
    assert {p.name for p in cal} >= {"argparse.py", "inspect.py"} and "os.py" in {p.name for p in ev}
    assert all(p.name[0] <= "m" for p in cal) and all(p.name[0] >= "n" for p in ev)
    assert texts.stdlib_code("calibration").count("def ") > 1000
    with pytest.raises(ValueError, match="calibration"):
        texts.stdlib_modules("train")


def test_spread_windows_pick_evenly_over_the_text():
    windows = torch.arange(100).view(100, 1)
    assert texts.spread_windows(windows, 5).flatten().tolist() == [0, 25, 50, 74, 99]
    assert texts.spread_windows(windows[:3], 5).shape == (3, 1)


def test_mixed_calibration_is_half_prose_half_code(data_dir):
    tok = tiny_tokenizer()
    s = tiny_settings(data_dir)
    calib = s.calibration(tok)
    assert calib.shape == (2, 16)
    from hf_pruning.calibration import build_calibration

    prose = build_calibration(tok, text=grid.books(str(data_dir), grid.CALIBRATION_BOOKS), n_samples=1, seq_len=16)
    code = build_calibration(tok, text=texts.stdlib_code("calibration"), n_samples=1, seq_len=16)
    assert torch.equal(calib, torch.cat([prose, code]))
    sets = s.evaluation_sets(tok)
    assert list(sets) == ["austen", "code"] and all(v.shape == (2, 16) for v in sets.values())


def _fake_peer(calls):
    """Stands in for llm-compressor: zeroes the lower half of every decoder linear's weights by magnitude and saves
    the model (tied embeddings are left out of the file, as transformers saves them)."""
    def prune(model_dir, calibration, method, settings, dtype, work_dir, python=None, threads=None):
        calls.append((method, settings, calibration.shape, dtype))
        model = torch.load(Path(model_dir) / "model.pt", weights_only=False)
        for module in model.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                w = module.weight.data
                w.masked_fill_(w.abs() <= w.abs().flatten().kthvalue(w.numel() // 2).values, 0)
        out = Path(work_dir) / "pruned"
        model.save_pretrained(out)
        return {"model_dir": str(out), "prune_s": 0.5, "peak_rss_mb": 100.0, "version": "stand-in"}
    return prune


def test_two_texts_and_peer_rows_through_the_runner(tmp_path, data_dir, monkeypatch):
    base, tok = tiny_model("llama"), tiny_tokenizer()
    folder = tmp_path / "dense"
    folder.mkdir()
    torch.save(base, folder / "model.pt")
    calls = []
    monkeypatch.setattr(peer, "peer_prune", _fake_peer(calls))
    rows = [("reference", "dense", {}), ("unstructured", "wanda", {"sparsity": 0.5}),
            ("peer", "llmcompressor_wanda", {"sparsity": 0.5})]
    path = tmp_path / "q.json"
    out = runner.BenchmarkRunner(path, tiny_settings(data_dir), grid=rows, model_name="tiny", model_dir=folder).run(
        lambda: copy.deepcopy(base).eval(), tok)
    by = {r["method"]: r for r in out["rows"]}
    assert all(r["error"] is None for r in out["rows"]), [r["error"] for r in out["rows"]]
    assert by["dense"]["ppl_code_ratio"] == 1.0 and by["dense"]["ppl_code"] == out["dense_extra_ppl"]["ppl_code"]
    for m in ("wanda", "llmcompressor_wanda"):
        assert by[m]["ppl_code_ratio"] == pytest.approx(by[m]["ppl_code"] / by["dense"]["ppl_code"])
        assert by[m]["params_removed"] == pytest.approx(0.5, abs=0.02)
    assert calls == [("wanda", {"sparsity": 0.5}, (2, 16), torch.float32)]
    assert by["llmcompressor_wanda"]["prune_s"] == 0.5 and by["llmcompressor_wanda"]["passes"] > 0
    assert out["model"] == "tiny" and out["calibration"]["code"]["python"]
    table = path.with_suffix(".md").read_text()
    assert "| ppl code | code/dense |" in table and "| llmcompressor_wanda |" in table


def test_qwen_grid_rows_are_known_methods_and_unique():
    from hf_pruning import PruningConfig, list_methods

    keys = [grid.row_key(m, st) for _, m, st in QWEN_GRID]
    assert len(keys) == len(set(keys))
    for _, method, settings in QWEN_GRID:
        if method in grid.PEER_METHODS or method == "dense":
            continue
        assert method in list_methods()
        PruningConfig.from_dict({"method": method, **{k: v for k, v in settings.items() if k != "recover"}})


def test_committed_qwen_table_is_generated_from_the_committed_rows():
    folder = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
    if not (folder / "qwen2.5-coder-1.5b.json").exists():
        pytest.skip("no 1.5B results committed yet")
    results = json.loads((folder / "qwen2.5-coder-1.5b.json").read_text())
    assert (folder / "qwen2.5-coder-1.5b.md").read_text() == markdown_table(results)
