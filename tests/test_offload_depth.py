"""ShortGPT, SLEB and FinerCut on offloaded models: in memory, with CPU offload and with disk offload they find the
same plan and give the same logits, accelerate's hooks stay on the modules that remain; the layer runner's
streams live in activation stores (a folder on disk gives the same order) and each layer is onloaded once per
chunk of rows, not once per candidate."""

from __future__ import annotations

import os

import pytest
import torch
from offload_models import MODES, offloaded_model
from tiny_models import ARCHS, tiny_model, tokens

import hf_pruning
from hf_pruning import FinerCutConfig, ShortGPTConfig, SLEBConfig
from hf_pruning.engine import offload_hook
from hf_pruning.methods.depth import runner as depth_runner
from hf_pruning.methods.finercut import finercut_search, removal_score

CALIB = tokens(batch=4, length=16, seed=3)
X = tokens(batch=2, length=12, seed=9)
CONFIGS = {"shortgpt": ShortGPTConfig(num_removals=2), "sleb": SLEBConfig(num_removals=2),
           "finercut": FinerCutConfig(num_removals=3)}


def _hooked(model) -> set[int]:
    return {id(m) for m in model.modules() if offload_hook(m) is not None}


@pytest.mark.parametrize("arch", ARCHS)
def test_memory_cpu_and_disk_offload_prune_alike(arch, tmp_path):
    for method, config in CONFIGS.items():
        results = {}
        for mode in MODES:
            model = offloaded_model(arch, mode, str(tmp_path / f"{method}-{mode}"))
            hooked = _hooked(model)
            assert (len(hooked) > 0) == (mode != "memory")
            hf_pruning.prune_(model, config, calibration=CALIB)
            with torch.no_grad():
                logits = model(X, use_cache=False).logits
            # every module that kept its place in the model keeps accelerate's hook
            remaining = {id(m) for m in model.modules()} & hooked
            assert remaining and remaining <= _hooked(model) if hooked else not _hooked(model)
            results[mode] = (model.config.pruning_plan, model.hf_pruning_report["order"], logits)
        plan, order, logits = results["memory"]
        for mode in ("cpu", "disk"):
            assert results[mode][0] == plan and results[mode][1] == order, (method, mode)
            torch.testing.assert_close(results[mode][2], logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["gemma2"])
def test_streams_on_disk_and_checkpoints_give_the_same_search(arch, tmp_path):
    """The runner's stores on disk (files in the folder while the search runs, none left after), every layer or
    every sqrt(L)-th layer kept, one row or four scored together: the same order and bitwise the same scores."""
    model = tiny_model(arch)
    calib = tokens(batch=6, length=16, seed=4)
    seen = []

    def stop_after(k):
        def stop(removed):
            seen.append(len([f for f in os.listdir(tmp_path) if f.endswith(".pt")]))
            return len(removed) >= k
        return stop

    for config in (FinerCutConfig(num_removals=3), SLEBConfig(num_removals=2).as_finercut()):
        k = config.num_removals
        ref = finercut_search(model, config, calib, progress=False, stop=stop_after(k))["steps"]
        for options in (dict(store_folder=str(tmp_path)), dict(store_folder=str(tmp_path), keep_every="sqrt"),
                        dict(keep_every=2, chunk_rows=4)):
            seen.clear()
            steps = finercut_search(model, config, calib, progress=False, stop=stop_after(k), **options)["steps"]
            assert [(s.candidate, s.score) for s in steps] == [(s.candidate, s.score) for s in ref], options
            if "store_folder" in options:
                assert seen[0] > 0  # the streams and the dense reference are files while the search runs
                assert not os.listdir(tmp_path)  # and are removed when it ends


def test_each_layer_is_onloaded_once_per_chunk_per_step(monkeypatch, tmp_path):
    """On a disk-offloaded model scored 4 rows a chunk (as on an accelerator), a search step onloads each layer
    at most once per chunk for the first chunk and twice for the others (pilots, then the rest), whatever the
    number of candidates."""
    model = offloaded_model("llama", "disk", str(tmp_path))
    layers = depth_runner.adapter_for(model).decoder_layers(model)
    counts: dict[int, int] = {}
    real = depth_runner.onloaded

    def counting(module):
        counts[id(module)] = counts.get(id(module), 0) + 1
        return real(module)

    monkeypatch.setattr(depth_runner, "onloaded", counting)
    calib = tokens(batch=8, length=16, seed=4)  # 2 chunks of 4 rows
    steps = 2
    finercut_search(model, FinerCutConfig(num_removals=steps), calib, progress=False, chunk_rows=4)
    chunks = 2
    # the first refresh, then per step: the scoring and (from the second step on) the refresh after a removal
    most = 1 + steps * (2 * chunks - 1) + (steps - 1)
    assert max(counts[id(layer)] for layer in layers) <= most, [counts[id(layer)] for layer in layers]
    assert sum(counts.values()) > 0


def test_removal_score_on_a_disk_offloaded_model_equals_memory(tmp_path):
    memory = offloaded_model("qwen2", "memory", str(tmp_path / "m"))
    disk = offloaded_model("qwen2", "disk", str(tmp_path / "d"))
    removed = ["4.mlp", "2.block"]
    assert removal_score(disk, CALIB, removed) == removal_score(memory, CALIB, removed)


def test_runner_rows_with_checkpoints_on_disk_equal_every_layer_in_memory(tmp_path):
    """``cache[l][s]`` (the per-row view the compensation reads) is the same stream whether every layer's inputs
    are kept in memory or every other layer's on disk (the others recomputed once, then kept until a refresh)."""
    model = tiny_model("mistral")
    removed = [depth_runner.Candidate(2, "attention"), depth_runner.Candidate(3, "block")]
    full = depth_runner.DepthRunner(model, CALIB, removed=removed)
    sparse = depth_runner.DepthRunner(model, CALIB, removed=removed, store_folder=str(tmp_path), keep_every=2)
    assert sorted(sparse.stores) == [0, 2, 4, 6] and os.listdir(tmp_path)
    for mine, ref in zip(sparse.cache, full.cache):
        assert len(mine) == len(ref) == CALIB.shape[0]
        for a, b in zip(mine, ref):
            assert torch.equal(a, b)
    sparse.close()
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("mode", ["memory", "cpu", "disk"])
def test_rows_are_scored_one_at_a_time_unless_offloaded_weights_run_on_an_accelerator(mode, tmp_path, monkeypatch):
    """Layers that run on the CPU, in memory or offloaded to RAM or disk, score one row per chunk (the branch and
    bound cuts more; re-reading a layer costs less than a row's compute); offloaded weights that run on an
    accelerator go a store batch at a time, each chunk onloading every layer once."""
    import hf_pruning.engine.offload as offload

    model = offloaded_model("llama", mode, str(tmp_path))
    assert not offload.onload_bound(model)
    runner = depth_runner.DepthRunner(model, CALIB)
    try:
        assert runner.chunk_rows == 1
    finally:
        runner.close()
    monkeypatch.setattr(offload, "execution_device", lambda module: torch.device("cuda"))
    assert offload.onload_bound(model) is (mode != "memory")
