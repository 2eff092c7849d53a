"""The recipe for a new method (docs/DESIGN-DECISIONS.md, "Adding a method"): one folder under
hf_pruning/methods/ plus one import line. A throwaway method's folder is written to a temporary directory,
made a subpackage of ``hf_pruning.methods`` and imported (the import line); it then prunes, records, round-trips
and saves like a built-in one, and is gone from the registry afterwards."""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest
import torch
from tiny_models import tiny_model, tokens

import hf_pruning
import hf_pruning.methods
from hf_pruning import registry

NAME = "drop_last_mlps"

#: the method's folder, written the way a built-in method's is (relative imports into the package)
FOLDER = {
    "__init__.py": '''
        """Drop the MLP sublayer of the last decoder layers (a throwaway method for the recipe test)."""

        from .config import DropLastMLPsConfig
        from .pruner import run_drop_last_mlps

        __all__ = ["DropLastMLPsConfig", "run_drop_last_mlps"]
        ''',
    "config.py": '''
        """Configuration of drop_last_mlps."""

        from __future__ import annotations

        from dataclasses import dataclass, field
        from typing import ClassVar

        from ...config import ConfigError, PruningConfig


        @dataclass
        class DropLastMLPsConfig(PruningConfig):
            """Drop the MLP of the last ``count`` decoder layers."""

            method: ClassVar[str] = "drop_last_mlps"
            card_text: ClassVar[str] = "Drop-last-MLPs: the MLP sublayers of the last layers removed."
            count: int = field(default=1, metadata={"help": "how many of the last layers lose their MLP"})

            def __post_init__(self):
                super().__post_init__()  # field types first
                if self.count < 1:
                    raise ConfigError(f"count must be >= 1, got {self.count}")
        ''',
    "pruner.py": '''
        """Orchestration of drop_last_mlps: a plan of drop_mlp ops."""

        from __future__ import annotations

        from ...plan import PruningPlan
        from ...registry import PruningResult, register_method
        from .config import DropLastMLPsConfig


        @register_method("drop_last_mlps", DropLastMLPsConfig, needs_calibration=False)
        def run_drop_last_mlps(model, config: DropLastMLPsConfig, calibration=None) -> PruningResult:
            n = model.config.num_hidden_layers
            ops = [{"op": "drop_mlp", "layer": i} for i in range(n - config.count, n)]
            return PruningResult(plan=PruningPlan.from_dict({"ops": ops}), report={"dropped": config.count})
        ''',
}


@pytest.fixture
def throwaway_method(tmp_path, monkeypatch):
    """Write the folder, put it on ``hf_pruning.methods``' path, import it; undo all of it afterwards."""
    folder = tmp_path / NAME
    folder.mkdir()
    for file, text in FOLDER.items():
        (folder / file).write_text(textwrap.dedent(text).lstrip())
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))  # registrations land in a copy
    monkeypatch.setattr(hf_pruning.methods, "__path__", [*hf_pruning.methods.__path__, str(tmp_path)])
    try:
        yield importlib.import_module(f"hf_pruning.methods.{NAME}")  # the recipe's one import line
    finally:
        for module in [m for m in sys.modules if m == f"hf_pruning.methods.{NAME}" or
                       m.startswith(f"hf_pruning.methods.{NAME}.")]:
            del sys.modules[module]
        if hasattr(hf_pruning.methods, NAME):
            delattr(hf_pruning.methods, NAME)


def test_a_method_added_by_the_recipe_prunes_records_round_trips_and_saves(throwaway_method, tmp_path):
    config_class = throwaway_method.DropLastMLPsConfig
    assert NAME in hf_pruning.list_methods()
    assert hf_pruning.get_method(NAME).config_class is config_class

    config = config_class(count=2)
    data = config.to_dict()
    assert data == {"method": NAME, "config_version": 1, "count": 2}
    assert hf_pruning.PruningConfig.from_dict(data) == config

    model = hf_pruning.prune_(tiny_model("llama"), config)  # no calibration: the method says it needs none
    ops = hf_pruning.get_plan(model).to_dict()["ops"]
    assert ops == [{"op": "drop_mlp", "layer": 4}, {"op": "drop_mlp", "layer": 5}]
    assert model.config.pruning_config == [data]
    assert model.hf_pruning_report == {"dropped": 2}

    by_dict = hf_pruning.prune_(tiny_model("llama"), {"method": NAME, "count": 2})  # the JSON form
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(by_dict(x).logits, model(x).logits, rtol=0, atol=0)

    hf_pruning.save_pretrained(model, tmp_path / "pruned")
    assert "1. Drop-last-MLPs: the MLP sublayers of the last layers removed." in (tmp_path / "pruned" / "README.md").read_text()
    again = hf_pruning.from_pretrained(tmp_path / "pruned")
    assert hf_pruning.get_plan(again).to_dict()["ops"] == ops
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, model(x).logits, rtol=0, atol=1e-6)


def test_the_throwaway_method_is_gone_afterwards():
    """Runs after the recipe test (file order): the registry and the package are as they were."""
    assert NAME not in hf_pruning.list_methods()
    assert not hasattr(hf_pruning.methods, NAME)
    assert not any(m.startswith(f"hf_pruning.methods.{NAME}") for m in sys.modules)
    with pytest.raises(KeyError, match=f"unknown pruning method '{NAME}'"):
        hf_pruning.PruningConfig.from_dict({"method": NAME, "count": 1})
