"""Configs, plans and command-line values: a clear error naming the problem and the way out, nothing changed."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import reprlib
from pathlib import Path

import numpy as np
import pytest
from bad_input import ARCHS5, refused
from tiny_models import tiny_model, tiny_tokenizer

import hf_pruning
from hf_pruning import ConfigError, PlanError, PruningConfig
from hf_pruning.cli import main
from hf_pruning.config import _field_kinds

DROP = {"ops": [{"op": "drop_mlp", "layer": 1}]}
CONFIG_CLASSES = r"hf_pruning\.WandaConfig.*hf_pruning\.HARPConfig|hf_pruning\.HARPConfig.*hf_pruning\.WandaConfig"


# ----- the config argument of prune_ -------------------------------------------------------------------------
@pytest.mark.parametrize("config, patterns", [
    ("wanda", [r"method name 'wanda'", r"hf_pruning\.WandaConfig\(\.\.\.\)", r"\{'method': 'wanda', \.\.\.\}"]),
    ("no-such-method", [r"got 'no-such-method' \(str\)", "the config's class picks the method", CONFIG_CLASSES]),
    (None, [r"got None \(NoneType\)", CONFIG_CLASSES]),
    (42, [r"got 42 \(int\)", CONFIG_CLASSES]),
    (hf_pruning.WandaConfig, [r"the class WandaConfig, not a config", r"WandaConfig\(\)"]),
    ({"sparsity": 0.5}, ["a dict config needs a 'method' key", r"\['sparsity'\]", "wanda", CONFIG_CLASSES]),
    ({"method": "nope"}, ["unknown pruning method 'nope'; registered: .*wanda"]),
    ({"method": "wanda", "ratio": 0.5}, [r"WandaConfig: unknown field\(s\) \['ratio'\]"]),
    ({"method": "sparsegpt", "percdamp": "x"}, [r"SparseGPTConfig: percdamp must be a finite number, got 'x' \(str\)"]),
])
def test_what_is_not_a_config_is_refused_with_the_config_classes(config, patterns):
    model = tiny_model("llama")
    refused(model, lambda: hf_pruning.prune_(model, config), ConfigError, *patterns)


def test_a_dict_with_a_method_is_the_json_form_of_a_config():
    model = tiny_model("opt")
    hf_pruning.prune_(model, {"method": "magnitude", "sparsity": 0.25})
    assert model.config.pruning_config[-1] == hf_pruning.MagnitudeConfig(sparsity=0.25).to_dict()
    again = tiny_model("opt")
    hf_pruning.prune_(again, model.config.pruning_config[-1])  # the record reproduces the result
    assert all(a.equal(b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


# ----- field types, checked generically from the dataclass annotations ----------------------------------------
#: keyword arguments that make each registered method's config valid (a test fails on a new method)
BASE_KWARGS = {
    "magnitude": {}, "wanda": {}, "sparsegpt": {}, "llm_barber": {}, "flap": {"ratio": 0.2},
    "harp": {"num_layers": 2}, "heads": {"per_layer": 1}, "plan": {"plan": DROP}, "shortgpt": {}, "sleb": {},
    "finercut": {}, "taylor": {}, "gradmap": {},
}
BAD_VALUES = {int: ["3", 2.5, True], float: ["x", math.inf, -math.inf, math.nan, True], bool: ["yes", 1],
              str: [3, ["a"]]}
EXPECTED = {int: "an integer", float: "a finite number", bool: r"true or false \(a bool\)", str: "a string"}


def _field_cases():
    cases = []
    for method in hf_pruning.list_methods():
        cls = hf_pruning.get_method(method).config_class
        for name, (scalar, is_list, _) in sorted(_field_kinds(cls).items()):
            values = [["x"], [math.inf]] if is_list and scalar is float else [["x"], [1.5]] if is_list else \
                BAD_VALUES[scalar]
            cases += [pytest.param(method, name, scalar, is_list, v, id=f"{method}.{name}={v!r}") for v in values]
    return cases


def test_every_registered_method_has_base_kwargs_here():
    assert sorted(BASE_KWARGS) == hf_pruning.list_methods(), "add the new method to BASE_KWARGS"


@pytest.mark.parametrize("method, name, scalar, is_list, value", _field_cases())
def test_a_wrong_typed_or_non_finite_field_names_the_field_the_value_and_the_type(method, name, scalar, is_list,
                                                                                   value):
    model = tiny_model("qwen2")
    cls = hf_pruning.get_method(method).config_class
    what = ("a list of finite numbers" if scalar is float else "a list of integers") if is_list else EXPECTED[scalar]
    data = {"method": method, **BASE_KWARGS[method], name: value}
    refused(model, lambda: hf_pruning.prune_(model, data), ConfigError, rf"^{cls.__name__}: {name} must be {what}",
            re.escape(f"got {reprlib.repr(value)} ({type(value).__name__})") + "$")
    with pytest.raises(ConfigError, match=rf"{cls.__name__}: {name} must be"):
        cls(**{**BASE_KWARGS[method], name: value})


def test_recovery_config_fields_are_checked_the_same_way():
    for kwargs, message in (({"lr": "fast"}, "lr must be a finite number, got 'fast'"),
                            ({"lr": math.inf}, "lr must be a finite number, got inf"),
                            ({"steps": 2.5}, "steps must be an integer, got 2.5"),
                            ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
                            ({"preserve_sparsity": "no"}, r"preserve_sparsity must be true or false")):
        with pytest.raises(ConfigError, match=message):
            hf_pruning.RecoveryConfig(**kwargs)


def test_numpy_numbers_and_paths_become_json_values(tmp_path):
    config = hf_pruning.SparseGPTConfig(sparsity=np.float32(0.25), blocksize=np.int64(32))
    assert type(config.sparsity) is float and type(config.blocksize) is int
    barber = hf_pruning.LLMBarberConfig(init="existing", dense_reference=tmp_path)
    assert barber.dense_reference == str(tmp_path)
    json.dumps([config.to_dict(), barber.to_dict()])
    assert PruningConfig.from_dict(config.to_dict()) == config


def test_every_float_field_of_a_config_is_type_checked():
    """The generic check sees every ``float``/``int``/``bool``/``str`` field: no subclass skips the base check."""
    for method in hf_pruning.list_methods():
        cls = hf_pruning.get_method(method).config_class
        numeric = [f.name for f in dataclasses.fields(cls) if f.name in _field_kinds(cls)]
        assert numeric or method == "plan", method
        for name in numeric:
            with pytest.raises(ConfigError, match=name):
                cls(**{**BASE_KWARGS[method], name: object()})


# ----- plans --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS5)
@pytest.mark.parametrize("alpha", ["Infinity", "-Infinity", "NaN"])
def test_non_finite_alpha_is_refused(arch, alpha):
    model = tiny_model(arch)
    text = '{"ops": [{"op": "scale_output", "layer": 0, "sublayer": "mlp", "alpha": %s}]}' % alpha
    shown = {"Infinity": "inf", "-Infinity": "-inf", "NaN": "nan"}[alpha]
    refused(model, lambda: hf_pruning.apply_plan_(model, text), PlanError,
            rf"scale_output: 'alpha' must be a finite number, got {shown}$")
    refused(model, lambda: hf_pruning.prune_(model, hf_pruning.PlanConfig(plan=json.loads(text))), PlanError,
            "'alpha' must be a finite number")


@pytest.mark.parametrize("plan, patterns", [
    ("plan.json", ["the plan 'plan.json' is neither JSON plan text", "nor an existing file",
                   "the path of a JSON plan file"]),
    ("drop_mlp 1", ["neither JSON plan text", "a dict or list of ops"]),
    ("", ["the plan is an empty string"]),
    ("x" * 5000, [r"the plan 'x+\.\.\.x+' is neither"]),  # a name too long for the file system, shortened
    ("{oops", ["the plan is not valid JSON: Expecting property name"]),
    ("[" * 100_000 + "]" * 100_000, ["the plan is nested too deeply", "a JSON object whose 'ops' is a list"]),
    ('{"ops": ' + "[" * 100_000 + "]" * 100_000 + "}", ["nested too deeply"]),
    ({"ops": [[[[[[[[[[[[]]]]]]]]]]]]}, [r"each op must be a JSON object with an 'op' key, got \[\[\[.*\.\.\..*\]$"]),
    ({"format_version": "1", "ops": []}, ["format_version must be a positive integer, got '1'"]),
    ({"base": [6], "ops": DROP["ops"]}, ["'base' must be a JSON object or null, got \\[6\\]"]),
])
def test_plan_text_that_is_no_plan_says_what_it_is(plan, patterns, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tiny_model("mistral")
    refused(model, lambda: hf_pruning.apply_plan_(model, plan), PlanError, *patterns)


def test_plan_files_that_are_no_plans(tmp_path):
    model = tiny_model("gemma2")
    refused(model, lambda: hf_pruning.apply_plan_(model, tmp_path), PlanError, "is a folder")
    (tmp_path / "bad.json").write_text("{oops")
    refused(model, lambda: hf_pruning.apply_plan_(model, tmp_path / "bad.json"), PlanError,
            r"the plan file '.*bad\.json' is not valid JSON")
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    refused(model, lambda: hf_pruning.apply_plan_(model, str(tmp_path / "deep.json")), PlanError,
            r"the plan file '.*deep\.json' is nested too deeply")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00")
    refused(model, lambda: hf_pruning.apply_plan_(model, tmp_path / "binary.json"), PlanError, "cannot read the plan file")
    refused(model, lambda: hf_pruning.PruningPlan.from_json("[" * 100_000), PlanError, "nested too deeply")


# ----- the command line: one line on stderr, exit code 2, nothing written -------------------------------------
@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli") / "dense"
    hf_pruning.save_pretrained(tiny_model("llama"), folder, tokenizer=tiny_tokenizer())
    return folder


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _cli_refuses(argv: list[str], out: Path, dense: Path, capsys, *patterns: str) -> None:
    before = _digest(dense)
    assert main(["-q", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert re.match(r"hf-prune( [a-z]+)?: error: ", last), err  # ours, or argparse's after its usage lines
    for pattern in patterns:
        assert pattern in last, (pattern, last)
    assert not out.exists() and _digest(dense) == before


def test_cli_plan_that_is_neither_json_nor_a_file(dense, tmp_path, capsys):
    _cli_refuses(["apply", str(dense), str(tmp_path / "missing.json"), str(tmp_path / "out")], tmp_path / "out",
                 dense, capsys, "is neither JSON plan text", "nor an existing file")


def test_cli_deeply_nested_plan(dense, tmp_path, capsys):
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    _cli_refuses(["apply", str(dense), str(tmp_path / "deep.json"), str(tmp_path / "out")], tmp_path / "out", dense,
                 capsys, "nested too deeply")


def test_cli_infinite_alpha(dense, tmp_path, capsys):
    (tmp_path / "inf.json").write_text('{"ops": [{"op": "scale_output", "layer": 0, "sublayer": "mlp", '
                                       '"alpha": Infinity}]}')
    _cli_refuses(["apply", str(dense), str(tmp_path / "inf.json"), str(tmp_path / "out")], tmp_path / "out", dense,
                 capsys, "'alpha' must be a finite number, got inf")


@pytest.mark.parametrize("argv, message", [
    (["eval", "{dense}", "--ppl", "default:evaluation", "--windows", "0"],
     "argument --windows: must be an integer >= 1, got 0"),
    (["eval", "{dense}", "--seq-len", "1"], "argument --seq-len: must be an integer >= 2, got 1"),
    (["prune", "{dense}", "{out}", "--method", "wanda", "--n-samples", "0"], "--n-samples: must be an integer >= 1"),
    (["prune", "{dense}", "{out}", "--method", "sparsegpt", "--percdamp", "x"],
     "argument --percdamp: invalid float value: 'x'"),
    (["prune", "{dense}", "{out}", "--method", "harp", "--num-layers", "1", "--alphas", "[Infinity]"],
     "HARPConfig: alphas must be a list of finite numbers or None, got [inf]"),
    (["prune", "{dense}", "{out}", "--method", "magnitude", "--sparsity", "nan"],
     "MagnitudeConfig: sparsity must be a finite number, got nan"),
    (["recover", "{dense}", "{out}", "--data", "{empty}"], "is empty"),
    (["recover", "{dense}", "{out}", "--eval-windows", "0"], "--eval-windows: must be an integer >= 1"),
])
def test_cli_values_are_checked_with_exit_code_2(argv, message, dense, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    out = tmp_path / "out"
    argv = [a.format(dense=dense, out=out, empty=tmp_path / "empty.txt") for a in argv]
    _cli_refuses(argv, out, dense, capsys, message)
