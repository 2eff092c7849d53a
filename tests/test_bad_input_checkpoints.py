"""Tampered and future checkpoints: reloading fails loudly instead of filling weights with random values."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import ARCHS, tiny_model, tokens
from transformers import AutoModelForCausalLM

import hf_pruning
from hf_pruning.publish.verify import reload_in_fresh_process

PLAN = {"ops": [{"op": "drop_attention", "layer": 0}, {"op": "drop_mlp", "layer": 2}]}


def _saved(tmp_path, arch="llama", plan=PLAN):
    model = hf_pruning.apply_plan_(tiny_model(arch), plan)
    path = tmp_path / "pruned"
    hf_pruning.save_pretrained(model, path)
    return model, path


def _edit_config(path, edit):
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def _snapshot(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


@pytest.mark.parametrize("arch", ARCHS)
def test_a_lost_op_is_refused_naming_the_missing_weights(tmp_path, arch):
    model, path = _saved(tmp_path, arch)
    reloaded = AutoModelForCausalLM.from_pretrained(path)  # untouched: loads and agrees
    with torch.no_grad():
        assert torch.equal(reloaded(tokens()).logits, model(tokens()).logits)
    _edit_config(path, lambda c: c["pruning_plan"]["ops"].pop(0))  # the drop_attention op is gone
    before = _snapshot(path)
    with pytest.raises(ValueError, match="do not match the architecture") as err:
        AutoModelForCausalLM.from_pretrained(path)
    assert "missing keys" in str(err.value) and "self_attn" in str(err.value) and "config.json" in str(err.value)
    assert _snapshot(path) == before  # a failed load writes nothing


def test_an_added_op_is_refused_naming_the_unexpected_weights(tmp_path):
    _, path = _saved(tmp_path, "qwen2")
    _edit_config(path, lambda c: c["pruning_plan"]["ops"].append({"op": "drop_attention", "layer": 4}))
    with pytest.raises(ValueError, match="unexpected keys: .*layers.4.self_attn"):
        AutoModelForCausalLM.from_pretrained(path)


def test_a_lost_op_is_refused_without_hf_pruning_too(tmp_path):
    _, path = _saved(tmp_path, "mistral")
    _edit_config(path, lambda c: c["pruning_plan"]["ops"].pop(1))
    with pytest.raises(RuntimeError, match="do not match the architecture"):
        reload_in_fresh_process(path, tokens(batch=1, length=4))


def test_loading_info_is_still_returned_when_asked(tmp_path):
    _, path = _saved(tmp_path, "opt")
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert type(model).__name__ == "PrunedOPTForCausalLM" and not info["missing_keys"]


def test_a_plan_from_a_newer_format_names_the_upgrade(tmp_path):
    _, path = _saved(tmp_path, "gemma2")
    _edit_config(path, lambda c: c["pruning_plan"].update(format_version=99))
    with pytest.raises(hf_pruning.PlanError, match="newer than"):
        AutoModelForCausalLM.from_pretrained(path)


def test_an_edited_layer_count_is_refused(tmp_path):
    _, path = _saved(tmp_path, "llama", {"ops": [{"op": "drop_mlp", "layer": 1}, {"op": "remove_layers", "layers": [3]}]})
    _edit_config(path, lambda c: c.update(num_hidden_layers=6))
    with pytest.raises(ValueError, match="edited by hand"):
        AutoModelForCausalLM.from_pretrained(path)


@pytest.mark.parametrize("where, message", [
    ("missing/folder", "no such folder: .*missing/folder; and it cannot be a Hub repo id"),
    ("empty", "holds no config.json, so it is not a saved model"),
    ("file.txt", "is a file; a model is a folder"),
])
def test_a_source_that_is_not_a_model_names_itself(tmp_path, where, message, capsys):
    from hf_pruning.cli import main

    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    source = str(tmp_path / where)
    with pytest.raises(FileNotFoundError, match=message):
        hf_pruning.from_pretrained(source)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(["-q", "show", source]) == 2
    assert main(["-q", "prune", source, str(tmp_path / "out"), "--method", "magnitude"]) == 2
    err = capsys.readouterr().err
    assert "Repo id must be in the form" not in err and err.count("hf-prune: error:") == 2
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no output folder left behind
