"""HARP, FLAP and head pruning, ``apply_plan_`` and saving on models whose weights accelerate offloads.

Every case runs the same tiny model in memory, with every weight offloaded to a CPU weights map
(``accelerate.cpu_offload``) and with the upper decoder layers offloaded to disk (``device_map``), and checks:
the same plan, logits equal to 1e-6, every offload hook of a module the plan kept still in place (and its
weights back on ``meta``: nothing left onloaded), and, for one method per architecture, that the saved result
reloads with ``device_map="auto"`` and ``dtype="auto"`` and gives the same logits.
"""

from __future__ import annotations

import pytest
import torch
from offload_models import offloaded_model
from tiny_models import ARCHS, tiny_model, tokens
from transformers import AutoModelForCausalLM

import hf_pruning
from hf_pruning.engine import offload_hook

OFFLOADED = ("cpu", "disk")
METHODS = {
    "harp": {"method": "harp", "num_layers": 2, "grid": [0.0, 0.5, 1.0]},
    "harp_flap": {"method": "harp", "num_layers": 2, "grid": [0.0, 0.5, 1.0], "flap_ratio": 0.1},
    "flap": {"method": "flap", "ratio": 0.2},
    "heads": {"method": "heads", "score": "wanda", "unit": "group", "per_layer": 1},
}
#: the method whose saved result each architecture reloads
SAVED = dict(zip(ARCHS, ["harp_flap", "heads", "flap", "harp", "harp_flap", "flap"]))
PLAN = {
    "ops": [
        {"op": "drop_attention", "layer": 0},
        {"op": "remove_heads", "layer": 1, "heads": [1, 2, 3]},
        {"op": "drop_mlp", "layer": 2},
        {"op": "shrink_mlp", "layer": 3, "keep": list(range(0, 96, 2)), "bias": True},
        {"op": "add_linear", "layer": 3, "sublayer": "mlp", "bias": True},
        {"op": "value_only_attention", "layer": 4},
        {"op": "scale_output", "layer": 4, "sublayer": "attention", "alpha": 0.4},
        {"op": "drop_mlp", "layer": 5},
        {"op": "remove_layers", "layers": [2]},
    ]
}
CALIB = tokens(4, 16, seed=1)
pytestmark = pytest.mark.filterwarnings("ignore:Attempting to save a model with offloaded modules")
X = tokens()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(X, use_cache=False).logits


def _hooked(model) -> list:
    """The modules whose weights an accelerate hook offloads."""
    return [m for m in model.modules() if offload_hook(m) is not None]


def _hooks_kept(model, before: list) -> bool:
    """Every module offloaded before that the model still holds keeps its hook, offloading again (weights on
    ``meta``, nothing left onloaded); no other module got one."""
    alive = {id(m) for m in model.modules()}
    kept = [m for m in before if id(m) in alive]
    ok = all(offload_hook(m) is not None and offload_hook(m).offload for m in kept)
    ok &= all(p.device.type == "meta" for m in kept for p in m.parameters(recurse=False))
    return ok and {id(m) for m in _hooked(model)} == {id(m) for m in kept}


def _plan():
    plan = hf_pruning.PruningPlan.from_dict(PLAN)
    g = torch.Generator().manual_seed(0)
    plan.ops[4].tensors = {"weight": torch.eye(64) + 0.02 * torch.randn(64, 64, generator=g),
                           "bias": 0.1 * torch.randn(64, generator=g)}
    return plan


def _run(arch, mode, folder, change):
    model = offloaded_model(arch, mode, str(folder))
    before = _hooked(model)
    change(model)
    return model, hf_pruning.get_plan(model).to_dict(), _logits(model), _hooks_kept(model, before)


def _parity(arch, tmp_path, change):
    _, plan, logits, _ = _run(arch, "memory", tmp_path, change)
    models = {}
    for mode in OFFLOADED:
        model, got_plan, got, kept = _run(arch, mode, tmp_path / mode, change)
        assert got_plan == plan, mode
        torch.testing.assert_close(got, logits, atol=1e-6, rtol=0)
        assert kept, f"{mode}: an offload hook was lost or a module left onloaded"
        models[mode] = model
    return models, logits


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ARCHS)
def test_method_parity_in_memory_cpu_and_disk_offload(arch, method, tmp_path):
    models, logits = _parity(arch, tmp_path, lambda m: hf_pruning.prune_(m, METHODS[method], CALIB))
    if method != SAVED[arch]:
        return
    for mode, model in models.items():  # the saved result reloads as an offloaded model would be loaded
        path = tmp_path / f"saved-{mode}"
        model.save_pretrained(path)
        again = AutoModelForCausalLM.from_pretrained(path, device_map="auto", dtype="auto")
        assert again.dtype == torch.float32
        torch.testing.assert_close(_logits(again), logits, atol=1e-6, rtol=0)
        assert hf_pruning.get_plan(again).to_dict() == hf_pruning.get_plan(model).to_dict()


@pytest.mark.parametrize("arch", ARCHS)
def test_hand_written_plan_on_offloaded_models(arch, tmp_path):
    """Drops, head removal, sliced MLPs with a bias, a fused (Gemma2: attached) compensation, value-only
    attention with a scale and a layer removal: the edits reach the offloaded copies."""
    models, logits = _parity(arch, tmp_path, lambda m: hf_pruning.apply_plan_(m, _plan()))
    if arch == "gemma2":  # the attached compensation (in memory beside offloaded weights) is saved too
        for mode, model in models.items():
            model.save_pretrained(tmp_path / f"saved-{mode}")
            again = AutoModelForCausalLM.from_pretrained(tmp_path / f"saved-{mode}", device_map="auto", dtype="auto")
            torch.testing.assert_close(_logits(again), logits, atol=1e-6, rtol=0)


def test_from_pretrained_keeps_the_checkpoints_dtype(tmp_path):
    """A bf16 checkpoint loads, prunes and saves in bf16; dtype= still overrides."""
    tiny_model("llama").to(torch.bfloat16).save_pretrained(tmp_path / "dense")
    model = hf_pruning.from_pretrained(tmp_path / "dense")
    assert model.dtype == torch.bfloat16
    assert hf_pruning.from_pretrained(tmp_path / "dense", dtype=torch.float32).dtype == torch.float32
    model.apply_plan_(_plan())
    model.save_pretrained(tmp_path / "pruned")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", device_map="auto", dtype="auto")
    assert again.dtype == torch.bfloat16
    assert torch.equal(_logits(again), _logits(model))
