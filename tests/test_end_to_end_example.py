"""examples/end_to_end.py on tiny models: prune -> evaluate -> recover -> save -> push (dry run) -> reload."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from tiny_models import tiny_model, tokens

import hf_pruning

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import end_to_end  # noqa: E402


@pytest.mark.parametrize(("arch", "method", "settings"), [("llama", "wanda", {"sparsity": 0.5}),
                                                          ("opt", "shortgpt", {"num_removals": 2})])
def test_end_to_end_example(arch, method, settings, tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)  # the dry run needs no token
    calib, eval_ids, train = tokens(batch=4, length=32), tokens(batch=2, length=32, seed=5), tokens(batch=8, length=32)
    out = end_to_end.main(tiny_model(arch), None, calib, eval_ids, train, out_dir=tmp_path / "out", method=method,
                          settings=settings, recovery_steps=6, repo_id="someone/tiny-e2e")
    assert out["reload_identical"]
    assert out["recovery"]["loss_last"] < out["recovery"]["loss_first"]
    assert {"config.json", "model.safetensors", "README.md"} <= set(out["push_files"])
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert "someone/tiny-e2e" in card.text and f"| {out['final_ppl']:.2f} |" in card.text
    assert {method, "lora_recovery"} <= set(card.data.tags)
    model = hf_pruning.from_pretrained(tmp_path / "out")
    if method == "wanda":  # the recovery kept the masks
        assert out["recovery"]["masked_targets"] > 0
        assert hf_pruning.sparsity_report(model)["overall"] == pytest.approx(0.5)
    else:
        assert model.config.num_hidden_layers == 4
