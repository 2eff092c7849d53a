"""Model objects hf_pruning cannot prune in place are refused before anything changes, with the way out.

Also: the methods ``bind`` puts on a model make no reference cycle (``del model`` frees it at once).
"""

from __future__ import annotations

import copy
import gc
import pickle
import weakref

import pytest
import torch
from bad_input import ARCHS5, refused
from tiny_models import MODEL_CLASSES, tiny_config, tiny_model, tokens
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
)

import hf_pruning
from hf_pruning import UnsupportedModelError

DROP = {"ops": [{"op": "drop_mlp", "layer": 1}]}
CALIB = tokens(2, 16)


def both_entry_points(model):
    """The two ways in: a method through prune_ and a plan through apply_plan_."""
    return (lambda: hf_pruning.prune_(model, hf_pruning.MagnitudeConfig()),
            lambda: hf_pruning.apply_plan_(model, DROP))


# ----- heads other than a causal LM -------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS5)
def test_sequence_classification_model_is_refused(arch):
    config = tiny_config(arch)
    config.num_labels = 3
    model = AutoModelForSequenceClassification.from_config(config).eval()
    for call in both_entry_points(model):
        refused(model, call, UnsupportedModelError, r"ForSequenceClassification is not a causal language model",
                r"ForCausalLM", r"AutoModelForCausalLM\.from_pretrained")


@pytest.mark.parametrize("arch", ARCHS5)
def test_bare_base_model_is_refused(arch):
    model = AutoModel.from_config(tiny_config(arch)).eval()
    for call in both_entry_points(model):
        refused(model, call, UnsupportedModelError, r"Model is the bare decoder without its language-model head",
                r"AutoModelForCausalLM\.from_pretrained")


def test_a_subclass_of_the_causal_lm_class_is_accepted():
    class MyLlama(MODEL_CLASSES["llama"]):
        pass

    model = MyLlama(tiny_config("llama")).eval()
    hf_pruning.apply_plan_(model, {"ops": [{"op": "remove_layers", "layers": [1]}]})  # stock-expressible
    assert type(model) is MyLlama and model.config.num_hidden_layers == 5
    hf_pruning.apply_plan_(model, DROP)  # now Pruned<Arch>ForCausalLM, accepted again
    assert type(model).__name__ == "PrunedLlamaForCausalLM"
    hf_pruning.apply_plan_(model, {"ops": [{"op": "drop_mlp", "layer": 2}]})


def test_unsupported_architecture_keeps_its_error():
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50))
    for call in both_entry_points(model):
        refused(model, call, hf_pruning.UnsupportedArchitectureError, r"model_type 'gpt2'",
                r"supported: gemma2, gemma3_text, llama, mistral, opt, qwen2, qwen3")


def test_something_that_is_not_a_model_is_refused():
    model = torch.nn.Linear(4, 4)
    refused(model, lambda: hf_pruning.apply_plan_(model, DROP), UnsupportedModelError, "no transformers config",
            r"hf_pruning\.from_pretrained")


# ----- wrappers ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS5)
def test_torch_compile_wrapper_is_refused(arch):
    model = tiny_model(arch)
    compiled = torch.compile(model)  # lazy: nothing is compiled before the first call
    for call in both_entry_points(compiled):
        refused(compiled, call, UnsupportedModelError, "torch.compile wrapper", r"model\._orig_mod",
                "before compiling")
    assert type(model) is MODEL_CLASSES[arch]  # the wrapped model is not half converted either
    hf_pruning.apply_plan_(compiled._orig_mod, DROP)  # the way out works
    assert type(model).__name__.startswith("Pruned")


@pytest.mark.parametrize("arch", ARCHS5)
def test_peft_model_is_refused(arch):
    from peft import LoraConfig, get_peft_model

    model = tiny_model(arch)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=hf_pruning.lora_target_modules(model)))
    for call in both_entry_points(peft_model):
        refused(peft_model, call, UnsupportedModelError, r"a PEFT model \(PeftModel\)", r"merge_and_unload\(\)")
    merged = peft_model.merge_and_unload()  # the way out works
    hf_pruning.apply_plan_(merged, DROP)


def test_adapter_layers_in_a_plain_model_are_refused_also_through_the_bound_method():
    from peft import LoraConfig, get_peft_model, inject_adapter_in_model

    model = hf_pruning.apply_plan_(tiny_model("llama"), {"ops": [{"op": "drop_attention", "layer": 0}]})
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["v_proj"]))
    # PeftModel forwards unknown attributes to the wrapped model: its bound prune_ still sees the adapters
    refused(peft_model, lambda: peft_model.prune_(hf_pruning.MagnitudeConfig()), UnsupportedModelError,
            r"PEFT adapter layer\(s\)", r"merge_and_unload\(\)")
    plain = tiny_model("qwen2")
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj"]), plain)
    refused(plain, lambda: hf_pruning.apply_plan_(plain, DROP), UnsupportedModelError,
            r"PEFT adapter layer\(s\) \(e\.g\. model\.layers\.0\.self_attn\.q_proj\)", r"merge_and_unload\(\)")


def test_recovery_refuses_a_wrapped_model():
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    refused(peft_model, lambda: hf_pruning.recover_(peft_model, CALIB, steps=1), UnsupportedModelError,
            r"merge_and_unload\(\)")
    compiled = torch.compile(tiny_model("opt"))
    refused(compiled, lambda: hf_pruning.recover_(compiled, CALIB, steps=1), UnsupportedModelError,
            r"model\._orig_mod")


# ----- weights that are not in memory -----------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS5)
def test_meta_model_is_refused(arch):
    with torch.device("meta"):
        model = MODEL_CLASSES[arch](tiny_config(arch))
    for call in both_entry_points(model):
        refused(model, call, UnsupportedModelError, "meta device", "load real weights first",
                r"hf_pruning\.from_pretrained")


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_recovery_refuses_an_offloaded_model(arch, tmp_path):
    """Pruning accepts offloaded weights (tests/test_offload_*.py); LoRA recovery trains all layers at once and
    refuses them, saying how to get a model it can train."""
    from offload_models import offloaded_model

    for mode in ("cpu", "disk"):
        model = offloaded_model(arch, mode, str(tmp_path / mode))
        expected = model(tokens()).logits
        refused(model, lambda model=model: hf_pruning.recover_(model, CALIB, steps=1), UnsupportedModelError,
                r"offloaded by accelerate", "reload it without offloading")
        assert torch.equal(model(tokens()).logits, expected)  # still a working model


# ----- the bound methods make no reference cycle ------------------------------------------------------------
@pytest.fixture
def no_gc():
    """The garbage collector is off during the test: only reference counting may free a model."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@pytest.mark.parametrize("arch", ARCHS5)
def test_del_frees_a_pruned_model_without_the_garbage_collector(arch, no_gc):
    model = hf_pruning.prune_(tiny_model(arch), hf_pruning.WandaConfig(), calibration=CALIB)
    model.apply_plan_({"ops": [{"op": "drop_attention", "layer": 2}]})  # bound methods, Pruned class
    assert callable(model.prune_) and callable(model.save_pretrained) and callable(model.push_to_hub)
    ref = weakref.ref(model)
    del model
    assert ref() is None


def test_del_frees_a_loaded_model_without_the_garbage_collector(tmp_path, no_gc):
    hf_pruning.save_pretrained(tiny_model("llama"), tmp_path / "dense")
    model = hf_pruning.from_pretrained(tmp_path / "dense")
    model.prune_(hf_pruning.MagnitudeConfig())
    ref = weakref.ref(model)
    del model
    assert ref() is None


def test_bound_methods_work_on_a_model_nothing_else_holds(tmp_path):
    hf_pruning.save_pretrained(tiny_model("qwen2"), tmp_path / "dense")
    model = hf_pruning.from_pretrained(tmp_path / "dense").prune_(hf_pruning.MagnitudeConfig())  # a chained call
    assert model.config.pruning_config[-1]["method"] == "magnitude"
    hf_pruning.apply_plan_(tiny_model("qwen2"), DROP).save_pretrained(tmp_path / "pruned")
    assert (tmp_path / "pruned" / "config.json").is_file()


def test_only_bound_models_get_the_methods_and_the_class_keeps_its_own():
    from transformers import PreTrainedModel

    bound = hf_pruning.apply_plan_(tiny_model("llama"), {"ops": [{"op": "remove_layers", "layers": [0]}]})
    plain = tiny_model("llama")  # the same class, never given to hf_pruning
    assert type(bound) is type(plain)
    assert not hasattr(plain, "prune_") and not hasattr(plain, "apply_plan_")
    assert plain.save_pretrained.__func__ is PreTrainedModel.save_pretrained
    assert type(bound).save_pretrained is PreTrainedModel.save_pretrained  # what hf_pruning.save_pretrained calls
    assert bound.save_pretrained.__func__ is hf_pruning.save_pretrained
    assert bound.push_to_hub.__func__ is hf_pruning.push_to_hub


def test_bound_methods_follow_copies_and_pickles():
    model = hf_pruning.apply_plan_(tiny_model("mistral"), DROP)
    twin = copy.deepcopy(model)
    twin.apply_plan_({"ops": [{"op": "drop_mlp", "layer": 3}]})  # prunes the copy, not the original
    assert len(hf_pruning.get_plan(twin)) == 2 and len(hf_pruning.get_plan(model)) == 1
    again = pickle.loads(pickle.dumps(model))
    again.prune_(hf_pruning.PlanConfig(plan={"ops": [{"op": "drop_mlp", "layer": 4}]}))
    assert len(hf_pruning.get_plan(again)) == 2 and len(hf_pruning.get_plan(model)) == 1
    assert model.prune_.__doc__ == hf_pruning.prune_.__doc__
