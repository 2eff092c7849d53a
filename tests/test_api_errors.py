"""Public API, plan JSON, registry, and bad input: one clear error and the model left unchanged."""

from __future__ import annotations

import importlib
import json
import pkgutil
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model, tokens
from transformers import GPT2Config, GPT2LMHeadModel

import hf_pruning
from hf_pruning import PlanConfig, PlanError, PruningPlan
from hf_pruning.plan import OP_TYPES
from hf_pruning.remote import hf_pruning_surgery

EVERY_OP = [
    {"op": "remove_layers", "layers": [3, 1]},
    {"op": "remove_heads", "layer": 0, "heads": [2, 0]},
    {"op": "drop_attention", "layer": 1},
    {"op": "drop_mlp", "layer": 1},
    {"op": "value_only_attention", "layer": 2},
    {"op": "shrink_mlp", "layer": 2, "keep": [5, 1, 3], "bias": True},
    {"op": "scale_output", "layer": 0, "sublayer": "mlp", "alpha": 0.5},
    {"op": "add_linear", "layer": 0, "sublayer": "attention", "bias": False, "fused": True},
]


def test_plan_json_round_trip_covers_every_op():
    plan = PruningPlan.from_dict({"ops": EVERY_OP, "base": {"num_hidden_layers": 6, "layer_types": None}})
    assert {op.name for op in plan.ops} == set(OP_TYPES)
    again = PruningPlan.from_json(plan.to_json())
    assert again.to_dict() == plan.to_dict()
    assert plan.ops[0].layers == [1, 3]  # normalised: sorted, unique
    assert json.loads(plan.to_json())["format_version"] == hf_pruning.plan.PLAN_FORMAT_VERSION


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"ops": [{"op": "prune_everything"}]}, "unknown op 'prune_everything'"),
        ({"ops": [{"op": "drop_mlp", "layer": 1, "ratio": 2}]}, "unknown field"),
        ({"ops": [{"op": "remove_layers", "layers": []}]}, "empty"),
        ({"ops": [{"op": "scale_output", "layer": 0, "sublayer": "ffn", "alpha": 1}]}, "sublayer"),
        ({"ops": [{"op": "scale_output", "layer": 0, "sublayer": "mlp", "alpha": float("nan")}]}, "finite"),
        ({"ops": [{"op": "remove_heads", "layer": "one", "heads": [0]}]}, "integer"),
        ({"format_version": 7, "ops": []}, "newer than"),
        ({"ops": {}}, "must be a list"),
    ],
)
def test_malformed_plans_raise(bad, message):
    with pytest.raises(PlanError, match=message):
        PruningPlan.from_dict(bad)


@pytest.mark.parametrize(
    "ops, message",
    [
        ([{"op": "remove_layers", "layers": [9]}], r"out of range; the model has 6 decoder layers"),
        ([{"op": "remove_layers", "layers": list(range(6))}], "remove all 6 decoder layers"),
        ([{"op": "remove_heads", "layer": 0, "heads": list(range(8))}], "use drop_attention"),
        ([{"op": "remove_heads", "layer": 0, "heads": [8]}], "head index"),
        ([{"op": "drop_mlp", "layer": 1}, {"op": "shrink_mlp", "layer": 1, "keep": [0]}], "no MLP left"),
        ([{"op": "drop_attention", "layer": 2}, {"op": "value_only_attention", "layer": 2}], "already 'none'"),
        ([{"op": "drop_attention", "layer": 2}, {"op": "scale_output", "layer": 2, "sublayer": "attention", "alpha": 2}],
         "no attention sublayer"),
        ([{"op": "shrink_mlp", "layer": 0, "keep": [500]}], "out of range"),
        ([{"op": "add_linear", "layer": 0, "sublayer": "mlp"}], r"tensors\['weight'\]"),
    ],
)
def test_impossible_plans_leave_the_model_unchanged(ops, message):
    model = tiny_model("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cls = type(model)
    with pytest.raises(PlanError, match=message):
        hf_pruning.apply_plan_(model, {"ops": [{"op": "drop_mlp", "layer": 5}, *ops]})  # valid first op too
    assert type(model) is cls
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert getattr(model.config, "pruning_plan", None) is None


def test_unsupported_architecture_lists_supported():
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(hf_pruning.UnsupportedArchitectureError, match="gpt2.*supported: gemma2, gemma3_text, llama, mistral, opt, qwen2, qwen3"):
        hf_pruning.apply_plan_(model, {"ops": [{"op": "drop_mlp", "layer": 0}]})


def test_quantized_model_is_refused_with_the_fix():
    model = tiny_model("llama")
    model.hf_quantizer = object()
    model.config.quantization_config = {"quant_method": "gguf"}
    with pytest.raises(hf_pruning.QuantizedModelError, match="gguf.*gguf_file"):
        hf_pruning.apply_plan_(model, {"ops": [{"op": "drop_mlp", "layer": 0}]})
    hf_pruning.clear_quantizer_(model)
    hf_pruning.apply_plan_(model, {"ops": [{"op": "drop_mlp", "layer": 0}]})


def test_prune_with_plan_config_records_provenance(tmp_path):
    model = tiny_model("mistral")
    hf_pruning.save_pretrained(model, tmp_path / "dense")
    model = hf_pruning.from_pretrained(tmp_path / "dense")
    x = tokens()
    model.prune_(PlanConfig(plan={"ops": [{"op": "drop_attention", "layer": 3}]}))
    assert model.config.pruning_config == [{"method": "plan", "config_version": 1,
                                            "plan": hf_pruning.get_plan(model).to_dict() | {"base": None}}]
    assert type(model).__name__ == "PrunedMistralForCausalLM"
    model.save_pretrained(tmp_path / "pruned")
    cfg = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert cfg["pruning_config"][0]["method"] == "plan"
    assert model(x).logits.shape == (2, 12, 96)


def test_method_registry_errors_and_config_round_trip():
    with pytest.raises(KeyError, match="unknown pruning method 'nope'; registered: .*plan"):
        hf_pruning.get_method("nope")
    cfg = PlanConfig(plan={"ops": [{"op": "drop_mlp", "layer": 0}]})
    again = hf_pruning.PruningConfig.from_dict(cfg.to_dict())
    assert isinstance(again, PlanConfig) and again.to_dict() == cfg.to_dict()
    with pytest.raises(hf_pruning.ConfigError, match="unknown field"):
        hf_pruning.PruningConfig.from_dict({"method": "plan", "plan": {}, "ratio": 0.5})
    with pytest.raises(PlanError):
        PlanConfig(plan={"ops": [{"op": "bogus"}]})


def test_every_method_folder_is_registered():
    import hf_pruning.methods as methods

    folders = [m.name for m in pkgutil.iter_modules(methods.__path__) if m.ispkg]
    for name in folders:
        module = importlib.import_module(f"hf_pruning.methods.{name}")
        config_classes = [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, hf_pruning.PruningConfig)]
        assert config_classes, f"methods/{name} exports no PruningConfig"
        if not any(cls.method for cls in config_classes):
            continue  # a family package (e.g. masks/): its configs are bases with no method key of their own
        for cls in config_classes:
            assert cls.method in hf_pruning.list_methods(), f"add methods/{name} to hf_pruning/methods/__init__.py"


def test_library_code_uses_logging_not_print():
    root = Path(hf_pruning.__file__).parent
    offenders = [str(p) for p in root.rglob("*.py") if "print(" in p.read_text() and p.name != "cli.py"]
    assert not offenders


@pytest.mark.parametrize("entry", ["modeling_hf_pruning", "configuration_hf_pruning"])
def test_remote_entry_files_import_every_sibling_they_need_directly(entry):
    """transformers < 5 copies only direct relative imports of the file it loads (modeling, or configuration
    alone for AutoConfig) next to it."""
    remote = Path(hf_pruning_surgery.__file__).parent
    text = (remote / f"{entry}.py").read_text()
    # the configuration needs everything but the model side (modeling and the surgery it calls)
    unneeded = {"__init__", entry} | ({"modeling_hf_pruning", "hf_pruning_surgery"} if entry.startswith("config") else set())
    siblings = [p.stem for p in remote.glob("*.py") if p.stem not in unneeded]
    missing = [s for s in siblings if f"from .{s} import" not in text]
    assert not missing


def test_remote_code_refuses_too_old_transformers(monkeypatch):
    import importlib.util

    import transformers

    path = Path(hf_pruning_surgery.__file__).parent / "configuration_hf_pruning.py"
    spec = importlib.util.spec_from_file_location("configuration_hf_pruning_copy", path)
    monkeypatch.setattr(transformers, "__version__", "4.45.2")
    with pytest.raises(ImportError, match=r"needs transformers >= 4.57, found 4.45.2; upgrade with: pip install -U"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
