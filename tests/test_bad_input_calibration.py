"""Calibration and training ids: one check, before anything changes, shared by every method and recovery."""

from __future__ import annotations

import pytest
import torch
from bad_input import ARCHS5, refused
from tiny_models import VOCAB, tiny_model, tiny_tokenizer, tokens

import hf_pruning
from hf_pruning import (
    CalibrationError,
    FinerCutConfig,
    FLAPConfig,
    GradMAPConfig,
    HARPConfig,
    HeadsConfig,
    LLMBarberConfig,
    MagnitudeConfig,
    PlanConfig,
    ShortGPTConfig,
    SLEBConfig,
    SparseGPTConfig,
    TaylorConfig,
    WandaConfig,
)
from hf_pruning.calibration import check_calibration

BUILD = r"hf_pruning\.calibration\.build_calibration\("
GOOD = tokens(2, 24, seed=3)

#: name -> (bad ids, what the message must say besides the build_calibration hint)
BAD = {
    "1d": (GOOD[0], [r"shape \(24,\)", r"\[n_samples, seq_len\]", r"ids\[None\]"]),
    "3d": (GOOD[None], [r"shape \(1, 2, 24\)", r"\[n_samples, seq_len\]"]),
    "float": (GOOD.float(), [r"dtype torch\.float32", "integer token ids"]),
    "bool": (GOOD > 50, [r"dtype torch\.bool", "integer token ids"]),
    "no_rows": (torch.empty(0, 24, dtype=torch.long), [r"0 row\(s\) of 24", "at least 1 row of at least 2 tokens"]),
    "no_tokens": (torch.empty(2, 0, dtype=torch.long), [r"2 row\(s\) of 0", "at least 2 tokens"]),
    "one_token": (GOOD[:, :1], [r"2 row\(s\) of 1 token", "at least 2 tokens"]),
    "id_too_large": (GOOD.clone().index_fill_(1, torch.tensor([3]), VOCAB),
                     [rf"2 id\(s\) outside \[0, {VOCAB}\)", f"to {VOCAB}", "model's own tokenizer"]),
    "negative_id": (GOOD.clone().index_fill_(1, torch.tensor([0]), -1), [r"outside \[0, 96\)", "from -1"]),
    "too_long": (torch.full((1, 300), 5), ["300 tokens, more than the model's context of 256",
                                           r"seq_len=256"]),
    "text": ("the quick brown fox", [r"is text \(str\)", r"build_calibration\(tokenizer, text=\.\.\.\)"]),
    "ragged_list": ([[5, 6, 7], [8, 9]], ["is a list", r"torch\.tensor\(rows, dtype=torch\.long\)"]),
    "numpy": (GOOD.numpy(), ["is a ndarray", r"\[n_samples, seq_len\]"]),
}


@pytest.mark.parametrize("arch", ARCHS5)
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_calibration_is_refused_before_any_change(arch, case):
    ids, patterns = BAD[case]
    model = tiny_model(arch)
    refused(model, lambda: hf_pruning.prune_(model, WandaConfig(), calibration=ids), CalibrationError,
            "^calibration ", *patterns, BUILD)


#: one config per registered method that reads calibration with these settings (a test fails on a new method)
METHOD_CONFIGS = {
    "magnitude": MagnitudeConfig(),
    "wanda": WandaConfig(),
    "sparsegpt": SparseGPTConfig(blocksize=32),
    "llm_barber": LLMBarberConfig(init="wanda"),
    "flap": FLAPConfig(ratio=0.2),
    "harp": HARPConfig(num_layers=2),
    "heads": HeadsConfig(score="wanda", per_layer=1),
    "plan": PlanConfig(plan={"ops": [{"op": "drop_mlp", "layer": 1}]}),
    "shortgpt": ShortGPTConfig(num_removals=1),
    "sleb": SLEBConfig(num_removals=1),
    "finercut": FinerCutConfig(num_removals=1),
    "taylor": TaylorConfig(num_removals=1),
    "gradmap": GradMAPConfig(num_removals=1),
}


def test_every_registered_method_has_a_config_here():
    assert sorted(METHOD_CONFIGS) == hf_pruning.list_methods(), "add the new method to METHOD_CONFIGS"


@pytest.mark.parametrize("arch", ["llama", "opt"])  # OPT took a 1-D tensor silently, LLaMA zeroed layer 0 first
@pytest.mark.parametrize("case", ["1d", "float", "id_too_large", "no_rows"])
@pytest.mark.parametrize("method", sorted(METHOD_CONFIGS))
def test_every_method_refuses_bad_calibration_and_changes_nothing(method, case, arch):
    ids, patterns = BAD[case]
    model = tiny_model(arch)
    refused(model, lambda: hf_pruning.prune_(model, METHOD_CONFIGS[method], calibration=ids), CalibrationError,
            *patterns, BUILD)


@pytest.mark.parametrize("method", [m for m, c in METHOD_CONFIGS.items()
                                    if hf_pruning.get_method(m).needs_calibration and c.uses_calibration()])
def test_missing_calibration_is_refused_with_the_way_to_build_it(method):
    model = tiny_model("qwen2")
    refused(model, lambda: hf_pruning.prune_(model, METHOD_CONFIGS[method]), CalibrationError,
            f"method '{method}' needs calibration token ids", BUILD)


@pytest.mark.parametrize("case", ["1d", "float", "id_too_large", "too_long"])
def test_bad_compensation_calibration_is_refused(case):
    ids, patterns = BAD[case]
    model = tiny_model("gemma2")
    config = ShortGPTConfig(num_removals=1, compensate=True)
    refused(model, lambda: hf_pruning.prune_(model, config, calibration=GOOD, compensation_calibration=ids),
            CalibrationError, "^compensation_calibration ", *patterns, BUILD)


def test_method_specific_minimum_is_still_checked_before_any_change():
    model = tiny_model("mistral")  # 8 tokens pass the shared check but are too few for FinerCut's screening
    refused(model, lambda: hf_pruning.prune_(model, FinerCutConfig(num_removals=1), calibration=tokens(2, 8)),
            ValueError, "too short to score a removal", "seq_len=256")


def test_valid_ids_pass_and_other_integer_dtypes_become_long():
    model = tiny_model("llama")
    assert check_calibration(model, GOOD) is GOOD
    as_int32 = check_calibration(model, GOOD.int())
    assert as_int32.dtype == torch.long and torch.equal(as_int32, GOOD)
    hf_pruning.prune_(model, WandaConfig(), calibration=GOOD.int())  # runs: the methods get int64 ids
    assert model.hf_pruning_report["sparsity"]["overall"] == pytest.approx(0.5, abs=0.01)


# ----- recovery data ----------------------------------------------------------------------------------------
RECOVERY_BAD = {
    "none": (None, [r"recovery needs training data, got None"]),
    "empty_list": ([], [r"recovery needs training data, got \[\]"]),
    "empty_string": ("", ["recovery needs training data, got ''"]),
    "empty_texts": (["", "  "], [r"a list of 2 empty text\(s\)"]),
    "list_of_ids": ([[5, 6, 7], [8, 9]], [r"a list of \['list'\]", "list of texts"]),
    "number": (3, ["of type int is not supported"]),
    "no_rows": (torch.empty(0, 16, dtype=torch.long), [r"^recovery data has shape \(0, 16\)"]),
    "float": (GOOD.float(), ["^recovery data has dtype torch.float32"]),
    "id_too_large": (torch.full((4, 16), 10_000), [r"outside \[0, 96\)", "from 10000 to 10000"]),
    "1d": (GOOD[0], [r"shape \(24,\)", r"ids\[None\]"]),
}


@pytest.mark.parametrize("case", sorted(RECOVERY_BAD))
def test_bad_recovery_data_is_refused_before_training(case):
    data, patterns = RECOVERY_BAD[case]
    model = hf_pruning.prune_(tiny_model("llama"), MagnitudeConfig())
    refused(model, lambda: hf_pruning.recover_(model, data, tokenizer=tiny_tokenizer(), steps=1), CalibrationError,
            *patterns, "token ids|build_calibration")
    assert not any("lora" in name for name, _ in model.named_modules())


def test_recovery_text_shorter_than_one_window_says_what_to_change():
    model = tiny_model("opt")
    refused(model, lambda: hf_pruning.recover_(model, ["the end of it"], tokenizer=tiny_tokenizer(), seq_len=64,
                                               steps=1),
            hf_pruning.calibration.NotEnoughTextError, "fewer than one window of 64", "more text or use shorter windows")


def test_recovery_refuses_bad_eval_ids_and_settings_before_training():
    model = tiny_model("qwen2")
    refused(model, lambda: hf_pruning.recover_(model, GOOD, eval_ids=GOOD.float(), steps=1), CalibrationError,
            "^eval_ids has dtype torch.float32")
    refused(model, lambda: hf_pruning.recover_(model, GOOD, step=1), hf_pruning.ConfigError,
            r"unknown recovery setting\(s\) \['step'\]", "known: .*'steps'")
    refused(model, lambda: hf_pruning.recover_(model, GOOD, lr=float("inf")), hf_pruning.ConfigError,
            "RecoveryConfig: lr must be a finite number, got inf")
    refused(model, lambda: hf_pruning.recover_(model, GOOD, config={"steps": 1}), hf_pruning.ConfigError,
            "must be a hf_pruning.RecoveryConfig, got dict")
