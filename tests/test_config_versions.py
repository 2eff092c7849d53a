"""Every registered method's config carries a ``config_version`` and round-trips through JSON; a config from a
newer version is refused with the way out; records saved before versions existed (and under renamed classes)
still read (docs/DESIGN-DECISIONS.md, "Configs, the registry and method names")."""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
from tiny_models import tiny_model

import hf_pruning
from hf_pruning import ConfigError, PruningConfig

#: non-default settings per method (a method without an entry must build with its defaults)
SAMPLES = {
    "finercut": dict(sublayer_ratio=0.3, granularity="attention", metric="kl", search="fast", exclude_front=0.25,
                     screen_fraction=0.25, rescore=2, cost_aware=True, compensate=True, ridge=0.5, solver="adam"),
    "flap": dict(param_ratio=0.1, metric="ifv", bias=False),
    "gradmap": dict(num_removals=2, compensate=False, score="taylor", mode="iterative"),
    "harp": dict(layers=[3, 5], alphas=[0.2, 0.0], grid=[0.0, 0.5, 1.0], search="naive", flap_ratio=0.05,
                 flap_metric="wifn"),
    "heads": dict(score="wanda", unit="query", param_ratio=0.1),
    "llm_barber": dict(sparsity=0.6, init="existing", dense_reference="path/to/dense", granularity="block",
                       threshold=0.3, metric="W", nm_rule="row", reconstruct=True, verify=True, one_pass=False,
                       blocksize=64, percdamp=0.05),
    "magnitude": dict(pattern="1:4"),
    "plan": dict(plan={"ops": [{"op": "drop_mlp", "layer": 1}, {"op": "remove_layers", "layers": [3]}]}),
    "shortgpt": dict(param_ratio=0.2, compensate=True, ridge=0.1, solver="adam"),
    "sleb": dict(num_removals=2, search="naive", order=["3.block", "1.block"]),
    "sparsegpt": dict(sparsity=0.7, blocksize=64, percdamp=0.05, one_pass=False),
    "taylor": dict(order=["2.block"], compensate=True),
    "wanda": dict(pattern="2:4", one_pass=False),
}

#: records as today's main wrote them into config.json (before config versions; model_cards/*/README.md)
OLD_RECORDS = [
    {"blocksize": 128, "dense_reference": None, "granularity": "output1", "init": "wanda", "method": "llm_barber",
     "metric": "WD", "nm_rule": "pairs", "one_pass": True, "pattern": "unstructured", "percdamp": 0.01,
     "reconstruct": False, "retain_reconstruction": False, "sparsity": 0.5, "threshold": 0.1, "verify": False},
    {"compensate": False, "method": "sleb", "num_removals": None, "order": ["17.block", "14.block", "13.block"],
     "param_ratio": 0.1333, "ridge": None, "search": "exact", "solver": "closed_form"},
    {"bias": True, "method": "flap", "metric": "wifv", "param_ratio": 0.0833, "ratio": None},
    {"method": "wanda", "one_pass": True, "pattern": "unstructured", "sparsity": 0.5},
    {"method": "plan", "plan": {"format_version": 1, "ops": [{"op": "drop_mlp", "layer": 1}], "base": None}},
]


def sample(method: str) -> PruningConfig:
    cls = hf_pruning.get_method(method).config_class
    try:
        return cls(**SAMPLES.get(method, {}))
    except ConfigError as err:
        pytest.fail(f"{cls.__name__}() needs settings: add non-default ones for {method!r} to SAMPLES in "
                    f"{__file__} ({err})")


@pytest.mark.parametrize("method", hf_pruning.list_methods())
def test_config_round_trips_through_json(method):
    config = sample(method)
    cls = type(config)
    data = config.to_dict()
    assert data["method"] == method and data["config_version"] == cls.config_version
    assert isinstance(cls.config_version, int) and cls.config_version >= 1
    again = PruningConfig.from_dict(json.loads(json.dumps(data)))
    assert type(again) is cls and again == config and again.to_dict() == data
    assert cls.from_dict(json.loads(json.dumps(data))) == config
    if method in SAMPLES:  # the sample really leaves the defaults where it can
        try:
            default = cls()
        except ConfigError:
            return
        changed = {k for k, v in SAMPLES[method].items() if getattr(default, k) != v}
        assert changed == set(SAMPLES[method]), f"{sorted(set(SAMPLES[method]) - changed)} are the defaults"


@pytest.mark.parametrize("method", hf_pruning.list_methods())
def test_a_config_from_a_newer_version_is_refused_with_the_way_out(method):
    data = sample(method).to_dict()
    newer = {**data, "config_version": data["config_version"] + 1, "a_setting_from_the_future": 3}
    with pytest.raises(ConfigError, match=r"newer hf_pruning.*pip install -U hf_pruning") as err:
        PruningConfig.from_dict(newer)
    assert "a_setting_from_the_future" in str(err.value)
    with pytest.raises(ConfigError, match="newer hf_pruning"):  # even without keys it does not know
        PruningConfig.from_dict({**data, "config_version": data["config_version"] + 1})


def test_prune_refuses_a_newer_record_before_changing_the_model():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    record = {"method": "magnitude", "config_version": 99, "sparsity": 0.5}
    with pytest.raises(ConfigError, match="config_version 99, newer than the 1"):
        hf_pruning.prune_(model, record)
    assert all(v.equal(before[k]) for k, v in model.state_dict().items())


def test_unknown_keys_at_a_known_version_are_refused():
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['sparsty'\].*a typo"):
        PruningConfig.from_dict({"method": "wanda", "config_version": 1, "sparsty": 0.3})


@pytest.mark.parametrize("bad", ["1", 0, -1, 1.0, True, None])
def test_a_config_version_that_is_not_a_positive_integer_is_refused(bad):
    with pytest.raises(ConfigError, match="config_version must be an integer >= 1"):
        PruningConfig.from_dict({"method": "wanda", "config_version": bad})


@pytest.mark.parametrize("record", OLD_RECORDS, ids=[r["method"] for r in OLD_RECORDS])
def test_records_from_before_config_versions_still_read(record):
    config = PruningConfig.from_dict(record)
    assert type(config) is hf_pruning.get_method(record["method"]).config_class
    assert config.to_dict() == {**record, "config_version": 1}


def test_an_older_form_is_upgraded_by_the_class():
    @dataclass
    class RenamedConfig(PruningConfig):
        method: ClassVar[str] = "renamed_demo"
        config_version: ClassVar[int] = 2
        keep_ratio: float = field(default=0.5)  # version 1 called it "ratio"

        @classmethod
        def upgrade_fields(cls, data, version):
            data = dict(data)
            if version < 2 and "ratio" in data:
                data["keep_ratio"] = data.pop("ratio")
            return data

    old = RenamedConfig.from_dict({"method": "renamed_demo", "ratio": 0.25})
    assert old == RenamedConfig(keep_ratio=0.25)
    assert old.to_dict() == {"method": "renamed_demo", "config_version": 2, "keep_ratio": 0.25}
    with pytest.raises(ConfigError, match="unknown field"):  # version 2 has no "ratio"
        RenamedConfig.from_dict({"method": "renamed_demo", "config_version": 2, "ratio": 0.25})


def test_the_old_class_name_is_a_deprecated_alias():
    with pytest.warns(DeprecationWarning, match="BarberConfig was renamed hf_pruning.LLMBarberConfig"):
        old = hf_pruning.BarberConfig
    assert old is hf_pruning.LLMBarberConfig
    with pytest.warns(DeprecationWarning):
        from hf_pruning import BarberConfig  # noqa: F401
    assert "BarberConfig" not in hf_pruning.__all__ and "LLMBarberConfig" in hf_pruning.__all__
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name and the records under the unchanged key do not warn
        config = PruningConfig.from_dict({"method": "llm_barber", "threshold": 0.2})
    assert isinstance(config, hf_pruning.LLMBarberConfig)
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchConfig'"):
        hf_pruning.NoSuchConfig  # noqa: B018


def test_folder_class_and_key_agree():
    """Each method folder is named by its registry key, and its config class by the folder."""
    for method in hf_pruning.list_methods():
        cls = hf_pruning.get_method(method).config_class
        assert cls.__module__.startswith(f"hf_pruning.methods.{method}."), cls
        assert cls.__name__.lower() == method.replace("_", "") + "config", cls
        assert {f.name for f in dataclasses.fields(cls)}.isdisjoint({"method", "config_version"})
