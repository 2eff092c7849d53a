"""A long layer-by-layer run resumes after a crash (``prune_(..., checkpoint_dir=...)``), and activations can live
on disk (``prune_(..., activations_dir=...)``) with the same result."""

from __future__ import annotations

import json
import os

import pytest
import torch
from offload_models import offload_hooks_in_place, offloaded_model
from tiny_models import tokens

import hf_pruning
from hf_pruning.engine import CheckpointMismatchError
from hf_pruning.methods.wanda import pruner as wanda_pruner

CALIB = tokens(6, 16, seed=5)
X = tokens(2, 12, seed=9)


def _weights(model):
    from accelerate.utils.modeling import get_state_dict_offloaded_model

    return {k: v.clone() for k, v in get_state_dict_offloaded_model(model).items()}


class Crash(RuntimeError):
    pass


def crashing_at(layer_fn, n: int):
    """``layer_fn`` that raises :class:`Crash` on its ``n``-th call (a power cut while that layer is pruned)."""
    calls = []

    def crashing(layer, *args, **kwargs):
        calls.append(layer)
        if len(calls) == n:
            raise Crash(f"power cut in call {n}")
        return layer_fn(layer, *args, **kwargs)

    return crashing


@pytest.mark.parametrize("mode", ["memory", "disk"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_a_crashed_run_resumes_to_the_same_model(method, mode, tmp_path, monkeypatch):
    config = hf_pruning.WandaConfig(sparsity=0.5) if method == "wanda" else hf_pruning.SparseGPTConfig(sparsity=0.5)
    want = hf_pruning.prune_(offloaded_model("llama", mode, str(tmp_path / "ref")), config, CALIB)

    model = offloaded_model("llama", mode, str(tmp_path / "run"))
    hooks = offload_hooks_in_place(model)
    pruner = __import__(f"hf_pruning.methods.{method}.pruner", fromlist=["x"])
    layer_fn = getattr(pruner, f"{method}_prune_layer_")
    folder = tmp_path / "checkpoint"
    monkeypatch.setattr(pruner, f"{method}_prune_layer_", crashing_at(layer_fn, 4))  # in layer 3
    with pytest.raises(Crash):
        hf_pruning.prune_(model, config, CALIB, checkpoint_dir=folder)
    progress = json.loads((folder / method / "progress.json").read_text())
    assert progress["done"] == 3

    resumed = []
    monkeypatch.setattr(pruner, f"{method}_prune_layer_", lambda layer, *a, **k: resumed.append(layer) or
                        layer_fn(layer, *a, **k))
    hf_pruning.prune_(model, config, CALIB, checkpoint_dir=folder)
    assert len(resumed) == 3  # layers 3, 4, 5 only
    got, ref = _weights(model), _weights(want)
    assert got.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-6, msg=key)
    torch.testing.assert_close(model(X).logits, want(X).logits, rtol=0, atol=1e-6)
    assert offload_hooks_in_place(model) == hooks
    assert not (folder / method).exists()  # removed once the run completed


def test_a_checkpoint_of_another_run_is_refused(tmp_path, monkeypatch):
    model = offloaded_model("llama", "memory", "")
    config = hf_pruning.WandaConfig(sparsity=0.5)
    original = wanda_pruner.wanda_prune_layer_
    monkeypatch.setattr(wanda_pruner, "wanda_prune_layer_", crashing_at(original, 2))
    with pytest.raises(Crash):
        hf_pruning.prune_(model, config, CALIB, checkpoint_dir=tmp_path)
    monkeypatch.setattr(wanda_pruner, "wanda_prune_layer_", original)
    other = offloaded_model("llama", "memory", "")
    with pytest.raises(CheckpointMismatchError, match=r"another run.*delete the folder"):
        hf_pruning.prune_(other, config, tokens(6, 16, seed=6), checkpoint_dir=tmp_path)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "shortgpt", "gradmap", "flap"])
def test_activations_on_disk_give_the_same_model(method, tmp_path):
    configs = {"wanda": hf_pruning.WandaConfig(sparsity=0.5), "sparsegpt": hf_pruning.SparseGPTConfig(sparsity=0.5),
               "shortgpt": hf_pruning.ShortGPTConfig(num_removals=2), "gradmap": hf_pruning.GradMAPConfig(num_removals=2),
               "flap": hf_pruning.FLAPConfig(ratio=0.2)}
    want = hf_pruning.prune_(offloaded_model("llama", "memory", ""), configs[method], CALIB)
    seen = []
    original = torch.save

    def spy(obj, path, *args, **kwargs):
        seen.append(str(path))
        return original(obj, path, *args, **kwargs)

    torch.save = spy
    try:
        got = hf_pruning.prune_(offloaded_model("llama", "memory", ""), configs[method], CALIB,
                                activations_dir=tmp_path / "acts")
    finally:
        torch.save = original
    assert any(p.startswith(str(tmp_path / "acts")) for p in seen)  # the activations went to files there
    assert got.config.pruning_plan == want.config.pruning_plan
    torch.testing.assert_close(got(X).logits, want(X).logits, rtol=0, atol=1e-6)
    assert not any(files for _, _, files in os.walk(tmp_path / "acts"))  # nothing left behind
