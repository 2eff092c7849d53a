"""Save -> reload like an outside user: a fresh process where hf_pruning cannot be imported."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from tiny_models import ARCHS, tiny_model, tokens
from transformers import AutoModelForCausalLM

import hf_pruning
from hf_pruning.publish.verify import reload_in_fresh_process

STRUCTURAL = {
    "ops": [
        {"op": "drop_attention", "layer": 0},
        {"op": "remove_heads", "layer": 1, "heads": [1, 2, 3]},
        {"op": "value_only_attention", "layer": 4},
        {"op": "drop_mlp", "layer": 2},
        {"op": "shrink_mlp", "layer": 3, "keep": list(range(0, 96, 2)), "bias": True},
        {"op": "scale_output", "layer": 4, "sublayer": "attention", "alpha": 0.4},
        {"op": "remove_layers", "layers": [5]},
    ]
}

def run_outside(path: Path, x: torch.Tensor, tmp_path: Path | None = None) -> dict:
    out = reload_in_fresh_process(path, x, max_new_tokens=6)
    return {"logits": out["logits"], "gen": out["generated"], "gen_nocache": out["generated_no_cache"]}


def prune_and_save(arch: str, plan: dict, path: Path):
    model = hf_pruning.apply_plan_(tiny_model(arch), plan)
    hf_pruning.save_pretrained(model, path)
    x = tokens()
    with torch.no_grad():
        logits = model(x, use_cache=False).logits
    gen = model.generate(x[:1], max_new_tokens=6, do_sample=False)
    return model, x, logits, gen


@pytest.mark.parametrize("arch", ARCHS)
def test_structural_reload_without_hf_pruning(arch, tmp_path):
    _, x, logits, gen = prune_and_save(arch, STRUCTURAL, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    family = arch.replace("_postln", "")
    assert cfg["model_type"] == f"hf_pruning_{family}"
    assert cfg["auto_map"]["AutoModelForCausalLM"].startswith("modeling_hf_pruning.")
    assert cfg["pruning_plan"]["format_version"] == hf_pruning.plan.PLAN_FORMAT_VERSION
    assert cfg["hf_pruning_version"] == hf_pruning.__version__
    assert cfg["num_hidden_layers"] == 5 and cfg["pruning_plan"]["base"]["num_hidden_layers"] == 6
    assert (tmp_path / "m" / "model.safetensors").exists()
    out = run_outside(tmp_path / "m", x, tmp_path)
    assert torch.equal(out["logits"], logits)
    assert torch.equal(out["gen"], gen) and torch.equal(out["gen_nocache"], gen)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "opt"])
def test_reload_through_registered_auto_classes(arch, tmp_path):
    """With hf_pruning installed no trust_remote_code is needed."""
    model, x, logits, _ = prune_and_save(arch, STRUCTURAL, tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    assert type(again).__module__.startswith("hf_pruning.")
    with torch.no_grad():
        assert torch.equal(again(x, use_cache=False).logits, logits)
    assert hf_pruning.get_plan(again).to_dict() == hf_pruning.get_plan(model).to_dict()


@pytest.mark.parametrize("arch", ARCHS)
def test_stock_expressible_saves_as_stock_class(arch, tmp_path):
    plan = {"ops": [
        {"op": "remove_layers", "layers": [1, 3]},
        {"op": "scale_output", "layer": 2, "sublayer": "mlp", "alpha": 0.8},
        {"op": "add_linear", "layer": 0, "sublayer": "attention"},
    ]}
    if arch == "gemma2":  # a matrix cannot fold into Gemma2's post-norm: keep the plan stock-expressible
        plan["ops"].pop()
    model = tiny_model(arch)
    p = hf_pruning.PruningPlan.from_dict(plan)
    for op in p.ops:
        if op.name == "add_linear":
            op.tensors["weight"] = torch.eye(64) * 0.9
    hf_pruning.apply_plan_(model, p)
    assert not type(model).__name__.startswith("Pruned")
    hf_pruning.save_pretrained(model, tmp_path / "m")
    files = os.listdir(tmp_path / "m")
    assert not [f for f in files if f.endswith(".py")]
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == arch.replace("_postln", "") and "auto_map" not in cfg
    assert cfg["num_hidden_layers"] == 4
    x = tokens()
    out = run_outside(tmp_path / "m", x, tmp_path)
    with torch.no_grad():
        assert torch.equal(out["logits"], model(x, use_cache=False).logits)


def test_pruning_a_reloaded_model_composes(tmp_path):
    first = {"ops": [{"op": "remove_layers", "layers": [0]}]}
    second = {"ops": [{"op": "drop_attention", "layer": 2}, {"op": "remove_heads", "layer": 0, "heads": [4]}]}
    model = hf_pruning.apply_plan_(tiny_model("qwen2"), first)
    hf_pruning.save_pretrained(model, tmp_path / "a")
    loaded = hf_pruning.from_pretrained(tmp_path / "a")
    loaded.apply_plan_(second)
    loaded.save_pretrained(tmp_path / "b")
    plan = json.loads((tmp_path / "b" / "config.json").read_text())["pruning_plan"]
    assert [op["op"] for op in plan["ops"]] == ["remove_layers", "drop_attention", "remove_heads"]
    assert plan["base"]["num_hidden_layers"] == 6
    x = tokens()
    out = run_outside(tmp_path / "b", x, tmp_path)
    with torch.no_grad():
        assert torch.equal(out["logits"], loaded(x, use_cache=False).logits)


def test_newer_plan_format_fails_clearly(tmp_path):
    prune_and_save("llama", STRUCTURAL, tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["pruning_plan"]["format_version"] = 99
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="format_version 99.*upgrade hf_pruning"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "m")


def test_save_is_atomic(tmp_path, monkeypatch):
    model = hf_pruning.apply_plan_(tiny_model("llama"), STRUCTURAL)
    target = tmp_path / "m"
    hf_pruning.save_pretrained(model, target)
    before = sorted(os.listdir(target))

    def boom(*args, **kwargs):
        raise KeyboardInterrupt("interrupted while writing")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", boom, raising=False)
    with pytest.raises(KeyboardInterrupt):
        hf_pruning.save_pretrained(model, target)
    assert sorted(os.listdir(target)) == before  # the previous save is intact
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folder left behind
    with pytest.raises(KeyboardInterrupt):
        hf_pruning.save_pretrained(model, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
