"""Every ``examples/prune_*.py`` script: ``main`` on tiny models prunes as its method promises, returns finite
numbers and saves a folder that reloads to the same logits; the scripts also start as plain commands."""

from __future__ import annotations

import importlib
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model, tokens

import hf_pruning
from hf_pruning.remote.hf_pruning_surgery import adapter_for, inspect_model

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))  # how the scripts find ``common`` when run from their folder

CALIB = tokens(batch=4, length=32, seed=3)
EVAL_IDS = tokens(batch=2, length=32, seed=4)


def sparsity_is(target):
    def check(model, dense_states, result):
        assert hf_pruning.sparsity_report(model)["overall"] == pytest.approx(target, abs=0.01)
        assert result["sparsity"] == result["report"]["sparsity"]["overall"] == pytest.approx(target, abs=0.01)
        assert result["params_after"] == result["params_before"]  # masks zero weights, nothing is deleted
    return check


def blocks_removed(n):
    def check(model, dense_states, result):
        assert model.config.num_hidden_layers == len(dense_states) - n
        assert len(inspect_model(model)) == len(dense_states) - n
    return check


def sublayers_removed(n):
    def check(model, dense_states, result):
        states = inspect_model(model)
        gone = sum(s.attention == "none" for s in states) + sum(s.mlp == "none" for s in states)
        assert gone + 2 * (len(dense_states) - len(states)) == n  # a whole layer counts as its two sublayers
    return check


def top_layers_value_only(n):
    def check(model, dense_states, result):
        states = inspect_model(model)
        assert all(s.attention == "full" for s in states[:-n])
        assert all(s.attention in ("value_only", "none") for s in states[-n:])  # alpha 0 drops the sublayer
        layers = adapter_for(model).decoder_layers(model)
        assert not any(name.endswith("q_proj") for layer in layers[-n:] for name, _ in layer.named_modules())
        assert any(name.endswith("q_proj") for name, _ in layers[0].named_modules())
        assert result["report"]["accounting"]["kv_removed_fraction"] == pytest.approx(n / len(states))
    return check


def mlp_narrower(model, dense_states, result):
    states = inspect_model(model)
    assert sum(s.mlp_width for s in states) < sum(s.mlp_width for s in dense_states)
    assert all(s.attention == "full" for s in states)


def one_group_per_layer(model, dense_states, result):
    for before, after in zip(dense_states, inspect_model(model), strict=True):
        assert after.kv_heads == before.kv_heads - 1
        assert after.q_heads == before.q_heads - before.q_heads // before.kv_heads


#: (script, architecture, main settings sized for 6-layer tiny models, what must have changed)
CASES = [
    ("prune_magnitude", "llama", {"sparsity": 0.5}, sparsity_is(0.5)),
    ("prune_magnitude", "opt", {"pattern": "2:4"}, sparsity_is(0.5)),
    ("prune_wanda", "llama", {"sparsity": 0.6}, sparsity_is(0.6)),
    ("prune_sparsegpt", "llama", {"sparsity": 0.5, "blocksize": 32}, sparsity_is(0.5)),
    ("prune_llm_barber", "llama", {"sparsity": 0.5, "threshold": 0.5}, sparsity_is(0.5)),
    ("prune_finercut", "llama", {"sublayer_ratio": 0.25}, sublayers_removed(3)),
    ("prune_finercut", "qwen2", {"sublayer_ratio": 0.25, "search": "fast"}, sublayers_removed(3)),
    ("prune_shortgpt", "llama", {"num_removals": 2}, blocks_removed(2)),
    ("prune_sleb", "llama", {"num_removals": 2}, blocks_removed(2)),
    ("prune_taylor", "llama", {"param_ratio": 0.3}, blocks_removed(2)),  # 2 of 6 equal blocks: 1/3 >= 0.3
    ("prune_gradmap", "llama", {"num_removals": 2}, blocks_removed(2)),
    ("prune_gradmap", "opt", {"num_removals": 1, "mode": "one_shot"}, blocks_removed(1)),
    ("prune_harp", "llama", {"num_layers": 2, "grid": [0.0, 0.5, 1.0]}, top_layers_value_only(2)),
    ("prune_harp", "qwen2", {"num_layers": 2, "flap_match": True}, top_layers_value_only(2)),
    ("prune_flap", "llama", {"param_ratio": 0.1}, mlp_narrower),
    ("prune_heads", "llama", {"per_layer": 1, "score": "wanda"}, one_group_per_layer),
]


def _logits(model):
    with torch.no_grad():
        return model(EVAL_IDS, use_cache=False).logits


@pytest.mark.parametrize(("script", "arch", "settings", "check"), CASES,
                         ids=[f"{script}-{arch}" for script, arch, *_ in CASES])
def test_example_prunes_saves_and_reloads(tmp_path, script, arch, settings, check):
    model = tiny_model(arch)
    dense_states = inspect_model(model)
    out_dir = tmp_path / script
    result = importlib.import_module(script).main(model=model, calibration=CALIB, eval_ids=EVAL_IDS,
                                                  out_dir=out_dir, **settings)
    assert result["out_dir"] == str(out_dir)
    assert math.isfinite(result["dense_ppl"]) and math.isfinite(result["pruned_ppl"])
    assert result["pruned_ppl"] != result["dense_ppl"]
    assert result["params_after"] == hf_pruning.parameter_count(model) <= result["params_before"]
    assert result["report"] is model.hf_pruning_report and result["method"] in script
    check(model, dense_states, result)
    reloaded = hf_pruning.from_pretrained(out_dir).eval()
    assert type(reloaded).__name__ == result["model_class"]
    assert torch.equal(_logits(reloaded), _logits(model))
    assert reloaded.hf_pruning_evaluation["ppl"] == result["pruned_ppl"]  # the card quotes the measured numbers
    assert f"| {result['pruned_ppl']:.2f} |" in (out_dir / "README.md").read_text()


def test_every_example_script_is_tested():
    scripts = {path.stem for path in EXAMPLES.glob("prune_*.py")}
    assert scripts == {script for script, *_ in CASES}, "add a CASES row for every examples/prune_*.py"


def test_scripts_run_as_commands_and_take_their_settings_as_flags():
    out = subprocess.run([sys.executable, str(EXAMPLES / "prune_harp.py"), "--help"], capture_output=True,
                         text=True, check=True, cwd=EXAMPLES.parent).stdout
    assert "--num-layers" in out and "--flap-match" in out and "--out-dir" in out and "--model" not in out


def test_command_line_values_and_missing_tokenizer():
    import common

    assert [common._value(v) for v in ("4", "0.25", "true", "None", "2:4", "0,0.5,1")] == [
        4, 0.25, True, None, "2:4", [0, 0.5, 1]]
    with pytest.raises(ValueError, match="without a tokenizer"):
        common.prepare(model=tiny_model("llama"), config=hf_pruning.WandaConfig())


def test_scripts_reach_the_smollm2_loader_without_the_repository_on_the_path(monkeypatch):
    """The loader lives in the repository's benchmarks/ (not installed): with the repository root off ``sys.path``
    (a script run as ``python examples/x.py``), ``common`` still finds it (``make demo`` on a fresh clone)."""
    import common

    root = EXAMPLES.parent
    monkeypatch.setattr(sys, "path", [p for p in sys.path if Path(p or ".").resolve() != root])
    for name in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
        monkeypatch.delitem(sys.modules, name)
    loader = common.smollm2_loader()
    assert (loader.__module__, loader.__name__) == ("benchmarks.assets", "load_smollm2")
    assert str(root) in sys.path
