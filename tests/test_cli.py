"""The hf-prune command line on a tiny saved model."""

from __future__ import annotations

import json

from tiny_models import tiny_model

import hf_pruning
from hf_pruning.cli import main


def test_apply_show_verify(tmp_path, capsys):
    hf_pruning.save_pretrained(tiny_model("qwen2"), tmp_path / "dense")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"ops": [{"op": "value_only_attention", "layer": 5}, {"op": "drop_mlp", "layer": 1},
                                        {"op": "drop_attention", "layer": 0}]}))
    assert main(["-q", "apply", str(tmp_path / "dense"), str(plan), str(tmp_path / "pruned")]) == 0
    assert "PrunedQwen2ForCausalLM" in capsys.readouterr().out
    assert main(["-q", "show", str(tmp_path / "pruned")]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["layers"][5]["attention"] == "value_only" and shown["layers"][1]["mlp"] == "none"
    assert len(shown["sparsity"]["layers"]) == 6 and 0 <= shown["sparsity"]["overall"] < 0.01
    assert main(["-q", "verify", str(tmp_path / "pruned")]) == 0
    out = capsys.readouterr().out
    # what users run is checked too: the default forward with the cache, one-token steps and generate
    for check in ("identical logits", "default forward (cache on) agrees", "one-token steps through the cache agree",
                  "generate with/without cache agree", "generate matches the model in this process"):
        assert f"{check}=True" in out


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


def test_inspect_text_json_and_plots(tmp_path, capsys):
    model = hf_pruning.apply_plan_(tiny_model("llama"), {"ops": [
        {"op": "drop_mlp", "layer": 1}, {"op": "remove_heads", "layer": 3, "heads": [0, 1]},
        {"op": "remove_layers", "layers": [5]}]})
    hf_pruning.prune_(model, hf_pruning.MagnitudeConfig(sparsity=0.5))
    hf_pruning.save_pretrained(model, tmp_path / "m")
    assert main(["-q", "inspect", str(tmp_path / "m"), "--plots", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert "methods: magnitude" in out and "layers: 6 -> 5" in out
    lines = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in lines] == ["0", "1", "2", "3", "4"]
    assert lines[1][4] == "none" and lines[3][2:4] == ["6", "3"]  # no MLP in layer 1; layer 3 lost a KV group
    assert all(row[-1] == "50.00%" for row in lines if row[4] != "none")
    assert (tmp_path / "plots" / "removal_map.png").exists() and (tmp_path / "plots" / "sparsity.png").exists()
    assert main(["-q", "inspect", str(tmp_path / "m"), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["summary"]["layers"] == {"before": 6, "after": 5} and shown["summary"]["mlp"]["none"] == 1


def test_recover_command_keeps_masks_and_reports_perplexity(tmp_path, capsys):
    from tiny_models import tiny_tokenizer

    model = hf_pruning.prune_(tiny_model("llama"), hf_pruning.MagnitudeConfig(pattern="2:4"))
    hf_pruning.save_pretrained(model, tmp_path / "sparse", tokenizer=tiny_tokenizer())
    assert main(["-q", "recover", str(tmp_path / "sparse"), str(tmp_path / "out"), "--steps", "3",
                 "--seq-len", "32", "--batch-size", "2", "--eval", "default:evaluation", "--eval-windows", "2",
                 "--eval-seq-len", "32"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["masked_targets"] == report["targets"] > 0 and report["ppl_after"] > 0
    recovered = hf_pruning.from_pretrained(tmp_path / "out")
    assert hf_pruning.sparsity_report(recovered)["overall"] == 0.5
    assert recovered.config.pruning_config[-1]["method"] == "lora_recovery"
    card = (tmp_path / "out" / "README.md").read_text()
    assert "perplexity before recovery" in card and f"{report['ppl_after']:.2f}" in card
    assert main(["-q", "recover", str(tmp_path / "sparse"), str(tmp_path / "bad"), "--target-modules",
                 '["nothing_like_this"]']) == 2
    assert "no linear layer" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_bench_and_cards_say_where_they_went(capsys):
    """The benchmark is not installed with the package: the old subcommands exit 2 and name the make targets."""
    for argv, command in ((["bench", "--quick"], "bench"), (["-q", "cards"], "cards")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"`hf-prune {command}` moved" in err and f"make {command}" in err
        assert "python -m benchmarks." in err


def test_prune_offloaded_with_activations_on_disk_and_a_checkpoint(tmp_path, capsys):
    """``--max-memory`` loads the model offloaded (layers on disk), ``--activations-dir`` and ``--checkpoint-dir``
    reach prune_; the result equals the in-memory command's."""
    import torch
    from tiny_models import tiny_tokenizer, tokens

    hf_pruning.save_pretrained(tiny_model("llama"), tmp_path / "dense", tokenizer=tiny_tokenizer())
    common = ["--method", "wanda", "--sparsity", "0.5", "--n-samples", "4", "--seq-len", "16"]
    assert main(["-q", "prune", str(tmp_path / "dense"), str(tmp_path / "mem"), *common]) == 0
    assert main(["-q", "prune", str(tmp_path / "dense"), str(tmp_path / "off"), *common, "--max-memory", "cpu=1KB",
                 "--offload-folder", str(tmp_path / "offload"), "--activations-dir", str(tmp_path / "acts"),
                 "--checkpoint-dir", str(tmp_path / "ckpt")]) == 0
    assert list((tmp_path / "offload").glob("*.dat"))  # the weights were offloaded and edits written there
    assert not (tmp_path / "ckpt" / "wanda").exists()  # the finished run's checkpoint is gone
    ids = tokens(2, 12)
    mem = hf_pruning.from_pretrained(tmp_path / "mem")
    off = hf_pruning.from_pretrained(tmp_path / "off")
    torch.testing.assert_close(off(ids).logits, mem(ids).logits, rtol=0, atol=1e-6)
