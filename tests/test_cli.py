"""The hf-prune command line on a tiny saved model."""

from __future__ import annotations

import json

from tiny_models import tiny_model

import hf_pruning
from hf_pruning.cli import main


def test_apply_show_verify(tmp_path, capsys):
    hf_pruning.save_pretrained(tiny_model("qwen2"), tmp_path / "dense")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"ops": [{"op": "value_only_attention", "layer": 5}, {"op": "drop_mlp", "layer": 1}]}))
    assert main(["-q", "apply", str(tmp_path / "dense"), str(plan), str(tmp_path / "pruned")]) == 0
    assert "PrunedQwen2ForCausalLM" in capsys.readouterr().out
    assert main(["-q", "show", str(tmp_path / "pruned")]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["layers"][5]["attention"] == "value_only" and shown["layers"][1]["mlp"] == "none"
    assert len(shown["sparsity"]["layers"]) == 6 and 0 <= shown["sparsity"]["overall"] < 0.01
    assert main(["-q", "verify", str(tmp_path / "pruned")]) == 0
    assert "identical logits=True" in capsys.readouterr().out


def test_bad_plan_is_a_clear_error_with_exit_code_2(tmp_path, capsys):
    hf_pruning.save_pretrained(tiny_model("llama"), tmp_path / "dense")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"ops": [{"op": "remove_layers", "layers": [40]}]}))
    assert main(["-q", "apply", str(tmp_path / "dense"), str(plan), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "out of range" in err and "6 decoder layers" in err
    assert not (tmp_path / "out").exists()


def test_prune_with_method_flags_and_eval(tmp_path, capsys):
    from tiny_models import tiny_tokenizer

    hf_pruning.save_pretrained(tiny_model("gemma2"), tmp_path / "dense", tokenizer=tiny_tokenizer())
    plan = json.dumps({"ops": [{"op": "drop_mlp", "layer": 0}]})
    assert main(["-q", "prune", str(tmp_path / "dense"), str(tmp_path / "out"), "--method", "plan", "--plan", plan]) == 0
    capsys.readouterr()
    assert main(["-q", "eval", str(tmp_path / "out"), "--ppl", "default:evaluation", "--windows", "2", "--seq-len", "16",
                 "--tasks", "social_iqa", "--limit", "4", "--speed"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert "%|" not in captured.err  # quiet: no progress bars
    assert out["ppl"] > 1 and out["ppl_tokens"] == 32 and set(out["acc"]) == {"social_iqa"}
    assert out["speed"]["prefill_tok_s"] > 0


def test_unknown_method_and_bad_source_exit_2(tmp_path, capsys):
    assert main(["-q", "prune", "x", "y", "--method", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown pruning method 'nope'" in err
    assert "registered: finercut, flap, gradmap, harp, heads, llm_barber, magnitude, plan, shortgpt, sleb, sparsegpt, taylor, wanda" in err
    hf_pruning.save_pretrained(tiny_model("llama"), tmp_path / "dense")
    assert main(["-q", "eval", str(tmp_path / "dense"), "--ppl", "default"]) == 2
    assert "no tokenizer" in capsys.readouterr().err


def test_folder_that_is_not_a_model_exits_2(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a model")
    assert main(["-q", "eval", str(tmp_path), "--speed"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hf-prune: error:") and "config.json" in err


def test_prune_harp_and_heads_from_the_command_line(tmp_path, capsys):
    hf_pruning.save_pretrained(tiny_model("llama"), tmp_path / "dense")
    assert main(["-q", "prune", str(tmp_path / "dense"), str(tmp_path / "harp"), "--method", "harp",
                 "--layers", "[4, 5]", "--alphas", "[0.0, 0.5]"]) == 0
    capsys.readouterr()
    assert main(["-q", "show", str(tmp_path / "harp")]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [layer["attention"] for layer in shown["layers"][4:]] == ["none", "value_only"]
    assert main(["-q", "prune", str(tmp_path / "dense"), str(tmp_path / "heads"), "--method", "heads",
                 "--unit", "query", "--per-layer", "3"]) == 2
    assert "breaks the GQA groups" in capsys.readouterr().err
    assert not (tmp_path / "heads").exists()
